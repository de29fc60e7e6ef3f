"""One picture of what phase 3 does, from the JSON and CSV files a run wrote (matplotlib, for this script only):
left, both arms' validation perplexity over the steps of a fine-tune; middle, their validation KL(q || p_hat);
one line style per lr; right, how far p_hat (rescoring), the control and CE + KL moved the mean test log-probability
of words from q0, by how often the word occurs in the training text (analyze's rare_words.csv).
    pip install matplotlib
    python logs/phase3_picture.py OUT.png TITLE RARE_WORDS_CSV FINETUNE_FOLDER [FINETUNE_FOLDER ...]
Each FINETUNE_FOLDER holds ce.json and kl.json (a fine-tune's arms); its lr is read from their history. The README's
picture (the lab's runs at lr 1e-4 and 1e-2, one thread of an AMD EPYC, their files copied to logs/lab/picture/):
    python logs/phase3_picture.py logs/phase3.png "phase 3 on tiny: python lmdisc.py pipeline, then finetune --lr 1e-2 \
        and analyze --finetune runs/tiny/finetune-lr-0.01 (validated at steps 0 and 50)" \
        logs/lab/picture/finetune-lr-0.01/rare_words.csv logs/lab/picture/finetune logs/lab/picture/finetune-lr-0.01"""
import csv, json, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")                               # no screen needed
import matplotlib.pyplot as plt

out, title, rare, folders = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), [Path(f) for f in sys.argv[4:]]
fig, (ppl_ax, kl_ax, rare_ax) = plt.subplots(1, 3, figsize=(15, 4.4))
styles = ["-", "--", ":", "-."]
for folder, style in zip(folders, styles):
    for arm, color, name in (("ce", "tab:gray", "CE-only control"), ("kl", "tab:red", "CE + KL")):
        history = json.loads((folder / f"{arm}.json").read_text())["history"]
        lr = history[0]["lr"]
        steps = [h["step"] for h in history]
        ppl_ax.plot(steps, [h["valid_ppl"] for h in history], style, color=color, marker="o", ms=3,
                    label=f"{name}, lr {lr:g}")
        kl_ax.plot(steps, [h["valid_kl"] for h in history], style, color=color, marker="o", ms=3)
ppl_ax.set(xlabel="fine-tuning step", ylabel="validation perplexity (lower is better)", title="perplexity")
kl_ax.set(xlabel="fine-tuning step", ylabel="validation KL(q || p_hat)", title="distance to p_hat")
ppl_ax.legend(fontsize=8)

rows = list(csv.DictReader(rare.open()))
x = range(len(rows))
for k, (key, color, name) in enumerate((("delta_rescored", "tab:blue", "p_hat (rescoring)"),
                                        ("delta_control", "tab:gray", "CE-only control"),
                                        ("delta_kl", "tab:red", "CE + KL"))):
    rare_ax.bar([i + (k - 1) * 0.27 for i in x], [float(r[key]) for r in rows], 0.27, color=color, label=name)
rare_ax.axhline(0, color="black", lw=0.6)
rare_ax.set_xticks(list(x), [f"{r['bucket']}\n({int(r['tokens']):,})" for r in rows], fontsize=8)
rare_ax.set(xlabel="times the word occurs in the training text (test tokens)",
            ylabel="mean log-probability minus q0's",
            title=f"where p_hat and the arms move words (lr {json.loads((rare.parent / 'kl.json').read_text())['history'][0]['lr']:g})")
rare_ax.legend(fontsize=8)
fig.suptitle(title)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
