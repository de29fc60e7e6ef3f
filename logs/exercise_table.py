"""Read the logs of logs/exercises.sh and print what each exercise's question reads, per run, as a markdown table:
    python logs/exercise_table.py ex-2-1111.log ex-2-2.log ex-1-1111.log ex-1-2.log"""
import re, sys

def sections(text):
    """{command: output} for each '=== command' ... '=== rc N' block (a repeated command gets ' #2')."""
    out = {}
    for m in re.finditer(r"^=== (.*?)\n(.*?)^=== rc (\d+)", text, re.S | re.M):
        cmd = re.sub(r" --seed \d+| --run runs/ex-\d-\d+(-\w+)?|runs/ex-\d-\d+/", " ", m[1]).split()
        key = ("trap " if cmd[1].startswith("trap") else "") + " ".join(cmd[2:])
        assert m[3] == "0", (key, m[3])
        key = key + " #2" if key in out else key
        out[key] = m[2]
    return out

num = lambda pat, s, i=0: float(re.findall(pat, s)[i])
LD = r"L_D ([\d.]+)"
VAL = r"train-disc \| valid \| " + LD
RESC = r"ppl rescored ([\d.]+)"
VALID_LINE = "train-disc | valid |"
BASE = r"base q0 [^|]*\| ([\d.]+)"

def row(text):
    s, r = sections(text), {}
    pipe = s["pipeline"]
    ev = s["evaluate --checkpoint lm.pt --disc disc.pt"]
    L = [num(LD, ev, i) for i in range(3)]
    acc = [tuple(map(float, a)) for a in re.findall(r"acc real ([\d.]+) q0 ([\d.]+)", ev)]
    r[1] = f"L_D learned-on {L[0]:.5f}, valid {L[1]:.5f}, test {L[2]:.5f}; acc {acc[1][0]:.3f} + {acc[1][1]:.3f} = {sum(acc[1]):.3f} (test {sum(acc[2]):.3f})"
    ms = lambda out, ph: [float(x) for x in re.findall(ph + r" \| epoch.*?([\d.]+) ms/batch", out)]
    exact, samp = ms(pipe, "train-disc"), ms(s["train-disc --negatives sample"], "train-disc")
    r[2] = (f"valid L_D {num(VAL, s['train-disc --negatives sample']):.5f} sampled vs "
            f"{num(VAL, pipe):.5f} exact; {sum(samp)/len(samp):.1f} vs {sum(exact)/len(exact):.1f} ms/batch")
    syn = re.search(r"train-disc \| valid \|.*KL\(q0\|\|p_hat\) \+([\d.]+).*true KL\(q0\|\|p\) \+([\d.]+).*MSE\(s\) \+([\d.]+)",
                    s["pipeline --data synthetic"])
    r[3] = f"KL(q0‖p_hat) {syn[1]} vs true {syn[2]} (MSE(s) {syn[3]})"
    def arms(out):                                  # valid / test of control and KL arm, T, bootstrap
        rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line[2:].split()[0] != "model"]
        g = lambda name: next((c[1], c[2]) for c in rows if c[0][2:].startswith(name))
        return dict(ce=g("CE-only control"), kl=g("CE + "), resc=g("rescored"), T=g("CE-only control, temperature"),
                    t=re.search(r"temperature ([\d.]+) fitted", out)[1],
                    boot=re.search(r"worse\), 95% interval .*?\(|: ([+-][\d.]+%) perplexity", out)[0],
                    best=re.search(r"best on validation \((.*?), test ppl", out)[1])
    a4, a3, a2 = arms(pipe), arms(s["finetune --lr 1e-3"]), arms(s["finetune --lr 1e-2"])
    vv = lambda a, k: a[k][0]
    r[5] = (f"valid ce {vv(a4,'ce')} / {vv(a3,'ce')} / {vv(a2,'ce')}; kl {vv(a4,'kl')} / {vv(a3,'kl')} / {vv(a2,'kl')} "
            f"(lr 1e-4 / 1e-3 / 1e-2)")
    cur = s["curves finetune-lr-0.01/ce.pt finetune-lr-0.01/kl.pt"]
    kl = [float(x) for x in re.findall(r"step +\d+ +([\d.]+)", cur.split("training kl")[1])]
    ce = [float(x) for x in re.findall(r"step +\d+ +([\d.]+)", cur.split("validation")[0])]
    vkl = lambda out, arm: re.findall(r"finetune\[" + arm + r"\] \| validation at step +\d+ .*KL\(q\|\|p_hat\) ([\d.]+)", out)
    r["5c"] = (f"lr 1e-2: training kl {kl[0]:.4f} -> {kl[-1]:.4f}; valid KL(q‖p_hat) {vkl(pipe, 'ce')[0]} at step 0 -> "
               + ", ".join(f"lr {lr}: ctl {vkl(o, 'ce')[-1]} kl {vkl(o, 'kl')[-1]}" for lr, o in
                           (("1e-4", pipe), ("1e-3", s["finetune --lr 1e-3"]), ("1e-2", s["finetune --lr 1e-2"]))))
    w03, w3 = arms(s["finetune --lr 1e-2 --kl-weight 0.3"]), arms(s["finetune --lr 1e-2 --kl-weight 3"])
    r[6] = f"valid 0.3 / 1 / 3: {vv(w03,'kl')} / {vv(a2,'kl')} / {vv(w3,'kl')}; test {w03['kl'][1]} / {a2['kl'][1]} / {w3['kl'][1]}; rescored {a2['resc'][0]} / {a2['resc'][1]}"
    trap = next(v for k, v in s.items() if k.startswith("trap"))
    at, k0 = arms(trap), lambda out: num(r"finetune\[kl\] \| epoch.*? kl ([\d.]+)", out)
    r[7] = (f"CE + KL {at['kl'][0]} / {at['kl'][1]} vs {a2['kl'][0]} / {a2['kl'][1]}; first kl line {k0(trap):.4f} vs "
            f"{k0(s['finetune --lr 1e-2']):.4f}")
    r[8] = " ; ".join(f"lr {lr}: test resc {a['resc'][1]}, T {a['T'][1]} (T {a['t']}), kl {a['kl'][1]}, ctl {a['ce'][1]}; {a['boot']} vs {a['best']}"
                      for lr, a in (("1e-4", a4), ("1e-2", a2)))
    lstm, temp = s["train-disc --split valid-a --epochs 5"], s["train-disc --arch temperature --lr 1e-2 --split valid-a --epochs 5"]
    ep = lambda out: [float(x) for x in re.findall(r"validation at step +\d+ \| " + LD, out)]
    el, et = ep(lstm), ep(temp)
    evl = s["evaluate --checkpoint lm.pt --disc disc-epochs-5-split-valid-a.pt"]
    evt = s["evaluate --checkpoint lm.pt --disc disc-lr-0.01-epochs-5-arch-temperature-split-valid-a.pt"]
    amean = lambda out: re.findall(r"([+-][\d.]+)(?:,|;|$)", re.search(r"mean a\(c\).*", out)[0])
    r[9] = (f"LSTM valid L_D by epoch {' '.join(f'{x:.4f}' for x in el)}; temperature {' '.join(f'{x:.4f}' for x in et)}; "
            f"evaluate learned/other/test LSTM {' / '.join(f'{num(LD, evl, i):.5f}' for i in range(3))}, temperature "
            f"{' / '.join(f'{num(LD, evt, i):.5f}' for i in range(3))}; a(c) sure / between / unsure / overall {' '.join(amean(temp))}")
    an = s["analyze"]
    b = {m[0]: m[1:] for m in re.findall(r"^ *(\S+) +\d+ +(?:-[\d.]+ +){4}([+-][\d.]+) +([+-][\d.]+) +([+-][\d.]+)$", an, re.M)}
    r[10] = "; ".join(f"{k}: resc {v[0]}, ctl {v[1]}, kl {v[2]}" for k, v in b.items())
    t11 = s["train-disc --arch temperature --lr 1e-2"]
    r[11] = (f"a(c) sure / between / unsure / overall {' '.join(amean(t11))}; valid L_D {num(VAL, t11):.5f} vs LSTM "
             f"{num(VAL, pipe):.5f}; rescored valid {num(RESC, t11.split(VALID_LINE)[1]):.2f} vs "
             f"{a4['resc'][0]} (base {re.search(BASE, pipe)[1]})")
    models = ("lm.pt", "finetune/ce.pt", "finetune/kl.pt", "finetune-lr-0.01/ce.pt", "finetune-lr-0.01/kl.pt")
    gen = [s[f"generate --checkpoint {m} --words 25"].strip().replace("\n", " <eos> ").split() for m in models]
    part = lambda a, b: next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), "none of 25")
    r[13] = ("word where each sample parts from q0's: lr 1e-4 control " + str(part(gen[0], gen[1])) + ", KL arm " +
             str(part(gen[0], gen[2])) + "; lr 1e-2 control " + str(part(gen[0], gen[3])) + ", KL arm " +
             str(part(gen[0], gen[4])))
    return r

runs = [row(open(p).read()) for p in sys.argv[1:]]
print("| exercise | " + " | ".join(sys.argv[1:]) + " |\n|---|" + "---|" * len(runs))
for k in runs[0]:
    print(f"| {k} | " + " | ".join(str(r[k]) for r in runs) + " |")
