"""The lab's lessons, one row per number, one column per run (threads x seed), from logs/lab.sh's logs:
    python logs/lab_table.py logs/lab/*.log
Each lesson is printed with its effect (the smallest value over the runs of the quantity the lesson is about) and
its spread (max - min over the runs): a lesson counts when it holds in every run and its effect is at least 3 times
its spread, or when the answer asked for is a sign or an order that holds in every run."""
import re, sys
from pathlib import Path

def steps(text):
    """The log cut at each `=== command` line: {command: its output}."""
    parts = re.split(r"^=== (.+)$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2) if not parts[i].startswith("rc ")}

def table(out):
    """finetune's table: {row name: (valid, test)}, and the first progress line's kl of the KL arm."""
    out = out[:out.index("a CE + KL step costs")]               # its own table, not analyze's after it
    rows = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"^\| (base q0|CE-only control|CE \+ 1 KL).*? \| "
                                                                 r"([\d.]+) \| ([\d.]+) \|", out, re.M)}
    kl10 = re.search(r"finetune\[kl\] \| epoch +1 \| step +10/.* kl ([\d.]+)", out)
    val_kl = dict(re.findall(r"finetune\[(ce|kl)\] \| validation at step +50 .*KL\(q\|\|p_hat\) ([-\d.]+)", out))
    return rows, float(kl10[1]) if kl10 else None, {k: float(v) for k, v in val_kl.items()}

def baselines(out):
    b = {"rescored": re.search(r"^\| rescored.*? \| ([\d.]+) \| ([\d.]+) \|", out, re.M),
         "tempered": re.search(r"temperature ([\d.]+) fitted on validation \| ([\d.]+) \| ([\d.]+) \|", out),
         "boot": re.search(r"best on validation \((.*), test ppl [\d.]+\): ([-+\d.]+)% perplexity", out)}
    rare = {m[1]: [float(v) for v in m[2].split()] for m in re.finditer(r"^ *(\d+-\d+|>=\d+|0) +\d+ +((?:[-+\d.]+ +)"
                                                                        r"{6}[-+\d.]+)$", out, re.M)}
    return b, rare

def one(path):
    s, r = steps(Path(path).read_text()), {}
    get = lambda prefix: next(v for k, v in s.items() if k.startswith(prefix))
    pipe = get("python lmdisc.py pipeline")
    ev = {m[1]: m[2] for m in re.finditer(r"evaluate \| (learned on|valid|test)[^|]*\| (.*)", get("python lmdisc.py "
                                                                                                   "evaluate"))}
    for name, line in ev.items():
        r[f"1 L_D on {name}"] = float(re.search(r"L_D ([\d.]+)", line)[1])
        base, resc = map(float, re.search(r"ppl base ([\d.]+) \| ppl rescored ([\d.]+)", line).groups())
        r[f"1 rescoring's gain on {name}, %"] = 100 * (1 - resc / base)
        a, b = map(float, re.search(r"acc real ([\d.]+) q0 ([\d.]+)", line).groups())
        r[f"1 acc real + acc q0 on {name}"] = a + b
    r["1 L_D: valid - learned on"] = r["1 L_D on valid"] - r["1 L_D on learned on"]
    fts = {"1e-4": pipe, "1e-3": get("python lmdisc.py finetune --lr 1e-3"), "1e-2": get("python lmdisc.py finetune "
                                                                                          "--lr 1e-2 --seed")}
    for lr, out in fts.items():
        rows, kl10, vkl = table(out)
        r[f"3 valid, control, lr {lr}"], r[f"3 valid, CE + KL, lr {lr}"] = rows["CE-only control"][0], rows["CE + 1 KL"][0]
        r[f"3 test, control, lr {lr}"], r[f"3 test, CE + KL, lr {lr}"] = rows["CE-only control"][1], rows["CE + 1 KL"][1]
        r[f"3 valid KL(q||p_hat) after, control, lr {lr}"], r[f"3 valid KL(q||p_hat) after, CE + KL, lr {lr}"] = \
            vkl["ce"], vkl["kl"]
        r[f"4 kl, first progress line, lr {lr}"] = kl10
    r["3 valid KL(q||p_hat) at q0"] = float(re.search(r"validation at step +0 .*KL\(q\|\|p_hat\) ([\d.]+)", pipe)[1])
    rows, kl10, _ = table(get("python trap"))
    r["4 kl, first progress line, the trap"], r["4 valid, CE + KL, the trap"] = kl10, rows["CE + 1 KL"][0]
    r["4 test, CE + KL, the trap"] = rows["CE + 1 KL"][1]
    for lr, out in (("1e-4", pipe), ("1e-2", get("python lmdisc.py analyze"))):
        b, rare = baselines(out)
        r[f"5 test, rescored, lr {lr}"] = float(b["rescored"][2])
        r[f"5 T of the tempered control, lr {lr}"], r[f"5 test, tempered control, lr {lr}"] = float(
            b["tempered"][1]), float(b["tempered"][3])
        r[f"5 CE + KL vs the best baseline on validation, %, lr {lr}"] = float(b["boot"][2])
        r[f"5 the best baseline on validation, lr {lr}"] = b["boot"][1].split(",")[0].split(" = ")[0]
        for bucket, v in rare.items():
            for k, m in ((4, "rescored"), (5, "control"), (6, "kl")):
                r[f"6 d {m}, bucket {bucket}, lr {lr}"] = v[k]
    rows, _, _ = table(get("python lmdisc.py finetune --lr 1e-2 --disc"))
    r["7 valid, CE + KL toward q0 (s = 0), lr 1e-2"], r["7 test, CE + KL toward q0 (s = 0), lr 1e-2"] = rows["CE + 1 KL"]
    for split in ("valid", "test"):
        c, kl, s0 = (r[f"3 {split}, control, lr 1e-2"], r[f"3 {split}, CE + KL, lr 1e-2"],
                     r[f"7 {split}, CE + KL toward q0 (s = 0), lr 1e-2"])
        r[f"7 share of CE + KL's gain over the control that s = 0 also gets, {split}"] = (c - s0) / (c - kl)
    r["ok"] = all(re.search(r"=== rc (\d+)", x)[1] == "0" for x in [Path(path).read_text()])
    return r

def lessons(r):
    """Each lesson as one number per run: a difference or a ratio inside the run (the same batches, seed and CPU)."""
    L = {}
    L["1 L_D below chance on valid (2 ln 2 - L_D)"] = 1.38629 - r["1 L_D on valid"]
    L["1 L_D below chance on test"] = 1.38629 - r["1 L_D on test"]
    L["1 L_D: valid - learned-on text"] = r["1 L_D: valid - learned on"]
    L["1 rescoring's gain: learned-on text - valid, points of %"] = (r["1 rescoring's gain on learned on, %"] -
                                                                   r["1 rescoring's gain on valid, %"])
    for lr in ("1e-4", "1e-3", "1e-2"):
        L[f"3 valid: control - CE + KL, lr {lr}"] = r[f"3 valid, control, lr {lr}"] - r[f"3 valid, CE + KL, lr {lr}"]
        L[f"3 valid KL(q||p_hat) after: control - CE + KL, lr {lr}"] = (
            r[f"3 valid KL(q||p_hat) after, control, lr {lr}"] - r[f"3 valid KL(q||p_hat) after, CE + KL, lr {lr}"])
    L["3 valid KL(q||p_hat): control after lr 1e-2 / at q0"] = (r["3 valid KL(q||p_hat) after, control, lr 1e-2"] /
                                                               r["3 valid KL(q||p_hat) at q0"])
    for arm in ("control", "CE + KL"):
        v = {lr: r[f"3 valid, {arm}, lr {lr}"] for lr in ("1e-4", "1e-3", "1e-2")}
        L[f"3 the lr best on valid, {arm}"] = min(v, key=v.get)
    L["4 first line's kl: the trap / dropout-free, lr 1e-2"] = (r["4 kl, first progress line, the trap"] /
                                                               r["4 kl, first progress line, lr 1e-2"])
    L["4 valid: the trap - dropout-free, lr 1e-2"] = r["4 valid, CE + KL, the trap"] - r["3 valid, CE + KL, lr 1e-2"]
    L["4 test: the trap - dropout-free, lr 1e-2"] = r["4 test, CE + KL, the trap"] - r["3 test, CE + KL, lr 1e-2"]
    for lr in ("1e-4", "1e-2"):
        t = {"rescored": r[f"5 test, rescored, lr {lr}"], "tempered": r[f"5 test, tempered control, lr {lr}"],
             "CE+KL": r[f"3 test, CE + KL, lr {lr}"], "control": r[f"3 test, control, lr {lr}"]}
        L[f"5 test, best to worst, lr {lr}"] = " < ".join(sorted(t, key=t.get))
        L[f"5 CE + KL vs the best baseline, %, lr {lr}"] = r[f"5 CE + KL vs the best baseline on validation, %, lr {lr}"]
        L[f"5 (control - CE + KL) / (control - rescored), test, lr {lr}"] = (t["control"] - t["CE+KL"]) / (
            t["control"] - t["rescored"])
    for b in ("1-10", "10-100", "1000-10000", ">=10000"):
        L[f"6 d rescored, bucket {b}"] = r[f"6 d rescored, bucket {b}, lr 1e-4"]
        L[f"6 d kl - d control, bucket {b}, lr 1e-4"] = (r[f"6 d kl, bucket {b}, lr 1e-4"] -
                                                         r[f"6 d control, bucket {b}, lr 1e-4"])
    for split in ("valid", "test"):
        L[f"7 share of the gain s = 0 also gets, {split}"] = r[
            f"7 share of CE + KL's gain over the control that s = 0 also gets, {split}"]
    L["7 test: toward q0 - toward p_hat, lr 1e-2"] = (r["7 test, CE + KL toward q0 (s = 0), lr 1e-2"] -
                                                      r["3 test, CE + KL, lr 1e-2"])
    return L

runs = {Path(p).stem.replace("lab-", ""): one(p) for p in sys.argv[1:] if p != "--raw"}
if "--raw" not in sys.argv:
    runs = {k: lessons(v) for k, v in runs.items()}
keys = list(next(iter(runs.values())))
print(f"{'quantity':<66} " + " ".join(f"{n:>9}" for n in runs) + f" {'min':>9} {'max':>9} {'spread':>8} "
      f"{'min/spread':>10}")
for k in keys:
    vals = [r.get(k) for r in runs.values()]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        effect = min(vals) if min(vals) > 0 else -max(vals) if max(vals) < 0 else 0.0     # the same sign in all
        print(f"{k:<66} " + " ".join(f"{v:9.4f}" for v in vals) + f" {min(vals):9.4f} {max(vals):9.4f} "
              f"{max(vals) - min(vals):8.4f} {effect / max(max(vals) - min(vals), 1e-12):10.1f}")
    else:
        print(f"{k:<66} " + " | ".join(str(v) for v in vals))
