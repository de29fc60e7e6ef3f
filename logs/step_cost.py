"""Where the time of a CE + KL step goes, against a CE-only step, at `small`'s sizes (2x200 LSTM, V = 10,000,
batch 20 x 35, an LSTM discriminator 1x200), on random weights: the cost of a step does not depend on them.
Run from the project folder: OMP_NUM_THREADS=2 python logs/step_cost.py"""
import sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lmdisc as L

torch.manual_seed(0)
V, p = 10_000, L.PRESETS["small"]
q, q0 = L.LSTMLM(V, **p["lm"]), L.LSTMLM(V, **p["lm"]).eval()
disc = L.LSTMDiscriminator(V, **p["disc"]).eval()
opt = torch.optim.Adam(q.parameters(), lr=1e-4)
x, y = torch.randint(V, (35, 20)), torch.randint(V, (35, 20))
h = lambda m: m.init_hidden(20)
parts = {}

def timed(name, fn):
    t0 = time.perf_counter()
    out = fn()
    parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
    return out

def step(kl: bool):
    q.train()
    log_q = timed("CE pass, forward", lambda: torch.log_softmax(q(x, h(q))[0], -1))
    if kl:
        with torch.no_grad():
            log_q0 = timed("q0, forward (no graph)", lambda: torch.log_softmax(q0(x, h(q0))[0], -1))
            s = timed("discriminator, forward (no graph)", lambda: disc(x, h(disc))[0])
        with L.no_dropout(q):                       # as finetune_arm: training mode, every dropout at 0
            log_q_kl = timed("KL pass, forward", lambda: torch.log_softmax(q(x, h(q))[0], -1))
        loss = timed("finetune_loss (CE + KL over V)", lambda: L.finetune_loss(log_q, y, log_q_kl, log_q0, s, 1.0)[0])
    else:                                           # the control's loss, as finetune_arm computes it
        loss = timed("CE", lambda: F.nll_loss(log_q.flatten(0, -2), y.flatten()))
    opt.zero_grad(set_to_none=True)
    timed("backward", loss.backward)
    timed("clip + Adam step", lambda: (nn.utils.clip_grad_norm_(q.parameters(), 0.25), opt.step()))

for kl in (False, True, False, True):                   # A/B/A/B, 30 steps each after 5 of warm-up
    for _ in range(5):
        step(kl)
    parts = {}
    t0 = time.perf_counter()
    for _ in range(30):
        step(kl)
    total = (time.perf_counter() - t0) / 30
    print(("CE + KL" if kl else "CE only") + f" step: {1000 * total:.1f} ms | " +
          " | ".join(f"{k} {1000 * v / 30:.1f}" for k, v in parts.items()))
