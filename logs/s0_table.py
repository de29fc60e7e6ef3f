"""The s = 0 control's table from logs of logs/s0_control.sh:  python logs/s0_table.py logs/s0-control/*.log
Per run and lr: test perplexity (first 20,000 tokens) of the control, CE + KL toward the LSTM discriminator's p_hat,
CE + KL toward q0 itself (s = 0), and the two baselines; valid beside each in the full print."""
import re, sys

def tables(text):
    """{(lr, disc kind): {row name: (valid, test)}} from each `finetune` or `pipeline` step of one log."""
    out = {}
    for step in text.split("\n=== ")[1:]:
        cmd, rows = step.splitlines()[0], {}
        for line in step.splitlines():
            c = line.split(" | ")
            if line.startswith("| ") and len(c) == 4 and c[1][0].isdigit():
                rows[c[0][2:]] = (float(c[1]), float(c[2]))
        if rows:
            lr = re.search(r"--lr (\S+)", cmd)
            out[(lr[1] if lr else "1e-4", "s = 0" if "constant" in cmd else "LSTM")] = rows
    return out

print("| run (threads, seed) | lr | control | CE + KL, LSTM s | CE + KL, s = 0 | control + T | rescored (LSTM s) |")
print("|---|---|---:|---:|---:|---:|---:|")
for path in sys.argv[1:]:
    t = tables(open(path).read())
    for lr in ("1e-4", "1e-2"):
        a, b = t[(lr, "LSTM")], t[(lr, "s = 0")]
        pick = lambda rows, start: next(v for k, v in rows.items() if k.startswith(start))
        assert pick(a, "CE-only control") == pick(b, "CE-only control"), "the controls must be the same run"
        cells = [pick(a, "CE-only control"), pick(a, "CE + "), pick(b, "CE + "),
                 pick(a, "CE-only control, temperature"), pick(a, "rescored")]
        print(f"| {path.split('/')[-1][:-4]} | {lr} | " + " | ".join(f"{v:.2f} / {t_:.2f}" for v, t_ in cells) + " |")
