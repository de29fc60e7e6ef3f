"""The tables of one run of logs/route.sh: the LM's gap, the lr grid (both arms), the seeds and the s = 0 control at
the chosen lr, and what `analyze` printed beside each. Reads the run folder's JSON files and the route's log.
Run from the project folder:   python logs/route_table.py RUN logs/route/PRESET.log"""
import json, re, sys
from pathlib import Path

run, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
gap = re.search(r"learned on \(train, ([\d,]+) tokens\) ([\d.]+) \| whole splits: valid ([\d.]+) \| test ([\d.]+)", log)
if gap:
    print(f"gap | dropout-free ppl: learned-on text ({gap[1]} tokens) {gap[2]} | valid {gap[3]} | test {gap[4]} | "
          f"valid / learned-on {float(gap[3]) / float(gap[2]):.3f}")

def arms(folder: Path) -> dict:
    return json.loads((folder / "finetune.json").read_text())["arms"]

def lr_of(name: str):
    if name == "finetune":
        return 1e-4
    m = re.fullmatch(r"finetune-lr-([\d.e+-]+)", name)
    return float(m[1]) if m else None

grid = sorted((lr_of(f.name), f) for f in run.glob("finetune*") if lr_of(f.name) and (f / "finetune.json").exists())
print("\n| lr | control valid / test (kept step) | CE + KL valid / test (kept step) | CE + KL - control, valid |")
print("|---|---|---|---|")
for lr, f in grid:
    a = arms(f)
    c, k = a["ce"], a["kl"]
    print(f"| {lr:g} | {c['valid_ppl']:.2f} / {c['test_ppl']:.2f} ({c['best_step']}) | {k['valid_ppl']:.2f} / "
          f"{k['test_ppl']:.2f} ({k['best_step']}) | {k['valid_ppl'] - c['valid_ppl']:+.2f} |")
if grid:
    base = arms(grid[0][1])["ce"]["base_valid_ppl"]
    print(f"(base q0 valid {base:.2f}; a kept step 0 hands back q0)")

chosen = re.search(r"=== chosen on validation: lr (\S+)", log)
if chosen:
    lr = float(chosen[1])
    stem = "finetune" if lr == 1e-4 else f"finetune-lr-{lr:.15g}"
    print(f"\nat lr {lr:g}: | run | control valid / test | CE + KL valid / test |\n|---|---|---|")
    for name, label in ((stem, "seed 1111"), (stem + "-seed-2", "seed 2"), (stem + "-seed-3", "seed 3"),
                        (stem + "-disc-arch-constant", "s = 0 control (seed 1111)")):
        if (run / name / "finetune.json").exists():
            a = arms(run / name)
            print(f"| {label} | {a['ce']['valid_ppl']:.2f} / {a['ce']['test_ppl']:.2f} | {a['kl']['valid_ppl']:.2f} / "
                  f"{a['kl']['test_ppl']:.2f} |")
    for block in log.split("\n=== ")[1:]:
        if block.startswith("python lmdisc.py analyze"):
            folder = block.split("--finetune ")[1].split()[0]
            lines = [l for l in block.splitlines() if l.startswith(("| rescored", "| CE-only control, temperature",
                                                                    "baselines |"))]
            print(f"\nanalyze {folder}:\n" + "\n".join(lines))
