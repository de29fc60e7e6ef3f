"""Tests for lmdisc.py. Run: python -m pytest -q   (one estimator function: python -m pytest -q -k reverse_kl)

The estimator tests come first: each checks a function of section 4 against an independent float64 computation
(a closed-form KL of small categoricals, a hand-derived gradient), the best check a student can find for the
method. Then the models, the phases end to end on a synthetic corpus made on the fly (no download), and the
behaviour a user relies on: one line for every error, no file replaced that the program did not write, resume
after Ctrl-C or SIGTERM. Tests that need the real Penn Treebank look in ptb/ and ../shared/ptb and skip, saying
so, if neither has it.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmdisc as L

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)
L.PTB_URL = (HERE / "no-such-mirror").as_uri() + "/"   # no test reaches the network, even by mistake


def find_ptb() -> Path | None:
    for d in (HERE / "ptb", HERE.parent / "shared" / "ptb"):
        if all((d / f"ptb.{s}.txt").exists() for s in L.SPLITS):
            return d
    return None


needs_ptb = pytest.mark.skipif(find_ptb() is None, reason="Penn Treebank not found in ptb/ or ../shared/ptb "
                                                          "(run `python lmdisc.py download`)")


def random_log_probs(*shape, generator=None):
    return torch.log_softmax(torch.randn(*shape, dtype=torch.float64, generator=generator) * 2, -1)


# ------------------------------------------------------------------------------------- the estimator -------------

def test_reverse_kl_equals_closed_form_with_the_exact_ratio():
    g = torch.Generator().manual_seed(0)
    log_p, log_q0, log_q = (random_log_probs(5, 7, generator=g) for _ in range(3))
    s = log_p - log_q0                                       # the Bayes-optimal discriminator
    kl_q0_p = (log_q0.exp() * (log_q0 - log_p)).sum(-1)     # closed form KL(q0 || p)
    kl_q_p = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(L.reverse_kl(log_q0, log_q0, s), kl_q0_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(L.reverse_kl(log_q, log_q0, s), kl_q_p, rtol=0, atol=1e-12)
    assert (kl_q_p > 0.01).all()                             # non-trivial values
    torch.testing.assert_close(L.log_p_hat(log_q0, s), log_p, rtol=0, atol=1e-12)
    # any s, not only the exact ratio: p_hat normalised by hand, q0 exp(s) / sum_w q0 exp(s)
    s = torch.randn(5, 7, dtype=torch.float64, generator=g)
    p_hat = log_q0.exp() * s.exp() / (log_q0.exp() * s.exp()).sum(-1, keepdim=True)
    torch.testing.assert_close(L.reverse_kl(log_q, log_q0, s), (log_q.exp() * (log_q - p_hat.log())).sum(-1),
                               rtol=0, atol=1e-12)


def test_ratio_calibration_zero_only_for_exact_ratio():
    g = torch.Generator().manual_seed(1)
    log_p, log_q0 = random_log_probs(4, 6, generator=g), random_log_probs(4, 6, generator=g)
    s = log_p - log_q0
    torch.testing.assert_close(L.ratio_calibration(log_q0, s), torch.zeros(4, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert (L.ratio_calibration(log_q0, s + 0.3) - 0.3).abs().max() < 1e-12   # a constant shift shows exactly
    perturbed = s + 0.5 * torch.randn(s.shape, dtype=torch.float64, generator=g)
    assert L.ratio_calibration(log_q0, perturbed).abs().min() > 1e-3


def test_discriminator_loss_at_zero_logits_is_chance():
    g = torch.Generator().manual_seed(2)
    log_q0 = random_log_probs(3, 5, generator=g)
    s = torch.zeros(3, 5, dtype=torch.float64)
    assert abs(L.discriminator_loss(s, torch.tensor([0, 1, 2]), log_q0).item() - L.CHANCE_L_D) < 1e-12


def expected_disc_loss(s, log_p, log_q0):
    """E_{w_real ~ p}[L_D] computed independently: sum_w p log sig(s) and q0 log sig(-s)."""
    return -(log_p.exp() * F.logsigmoid(s) + log_q0.exp() * F.logsigmoid(-s)).sum(-1).mean()


def expected_loss_via_discriminator_loss(s, log_p, log_q0):
    """E_{w_real ~ p}[L_D], through discriminator_loss itself: every possible real word, weighted by p(w|c)."""
    n_ctx, V = log_p.shape
    return sum(log_p[c, w].exp() * L.discriminator_loss(s[c:c + 1], torch.tensor([w]), log_q0[c:c + 1])
               for c in range(n_ctx) for w in range(V)) / n_ctx


def test_discriminator_loss_minimiser_is_the_log_ratio():
    """Minimising the expected loss over a free table of logits (one row per context) lands on log p - log q0.
    Expected over the real word rather than sampled, so that the test checks the loss, not sampling noise."""
    g = torch.Generator().manual_seed(3)
    log_p, log_q0 = random_log_probs(3, 6, generator=g), random_log_probs(3, 6, generator=g)
    s = torch.zeros(3, 6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([s], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_loss_via_discriminator_loss(s, log_p, log_q0)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(s.detach(), log_p - log_q0, rtol=0, atol=1e-6)


def test_discriminator_loss_matches_independent_expectation():
    """discriminator_loss averaged over every possible real word (weighted by p) equals the closed form."""
    g = torch.Generator().manual_seed(4)
    log_p, log_q0 = random_log_probs(3, 6, generator=g), random_log_probs(3, 6, generator=g)
    s = torch.randn(3, 6, dtype=torch.float64, generator=g)
    torch.testing.assert_close(expected_loss_via_discriminator_loss(s, log_p, log_q0),
                               expected_disc_loss(s, log_p, log_q0), rtol=0, atol=1e-12)


def train_table(log_p, log_q0, negatives, steps, lr, seed, batch=64):
    """SGD on a free table of logits with real words sampled from p, through discriminator_loss itself."""
    g = torch.Generator().manual_seed(seed)
    n_ctx, V = log_p.shape
    s = torch.zeros(n_ctx, V, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([s], lr=lr)
    ctx = torch.arange(n_ctx).repeat_interleave(batch)
    for step in range(steps):
        target = torch.multinomial(log_p.exp()[ctx], 1, generator=g).squeeze(-1)
        loss = L.discriminator_loss(s[ctx], target, log_q0[ctx], negatives, 1, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == steps // 2:                  # anneal: the sampled variant needs a small final step size
            for group in opt.param_groups:
                group["lr"] = lr / 10
    return s.detach()


def test_exact_and_sampled_negatives_reach_the_same_point_sampled_is_noisier():
    g = torch.Generator().manual_seed(5)
    log_p, log_q0 = random_log_probs(2, 5, generator=g), random_log_probs(2, 5, generator=g)
    truth = log_p - log_q0
    weight = 0.5 * (log_p.exp() + log_q0.exp())     # where the loss constrains s
    err = lambda s: ((s - truth) ** 2 * weight).sum(-1).mean().item()
    s_exact = train_table(log_p, log_q0, "exact", 3000, 20.0, seed=0)
    s_sample = train_table(log_p, log_q0, "sample", 3000, 20.0, seed=0)
    assert err(s_exact) < 0.01 and err(s_sample) < 0.03

    # gradient variance at one point over fresh draws: exact negatives remove the q0 half of the noise
    s0 = torch.zeros(1, 5, dtype=torch.float64)
    target = torch.tensor([0])

    def grad(neg, seed):
        s = s0.clone().requires_grad_(True)
        L.discriminator_loss(s, target, log_q0[:1], neg, 1, torch.Generator().manual_seed(seed)).backward()
        return s.grad
    var = lambda neg: torch.stack([grad(neg, k) for k in range(200)]).var(0).sum().item()
    assert var("exact") < 1e-20 and var("sample") > 0.01


def test_tabular_discriminator_recovers_true_reverse_kl():
    """Finite samples of p (2000 per context) -> a tabular discriminator -> KL(q0 || p_hat) near KL(q0 || p)."""
    g = torch.Generator().manual_seed(6)
    log_p, log_q0 = random_log_probs(3, 6, generator=g), random_log_probs(3, 6, generator=g)
    true_kl = (log_q0.exp() * (log_q0 - log_p)).sum(-1)
    s = train_table(log_p, log_q0, "exact", 2000, 20.0, seed=1, batch=64)
    est = L.reverse_kl(log_q0, log_q0, s)
    assert true_kl.min() > 0.2                               # the test is not about tiny numbers
    assert ((est - true_kl).abs() / true_kl).max() < 0.15    # stated tolerance: 15% relative per context


def test_log_p_hat_and_reverse_kl_ignore_a_constant_added_to_s_and_log_z_moves_by_it():
    """p_hat = q0 exp(s) / Z: a context-wide constant in s cancels in p_hat and shows up, exactly, in log Z."""
    g = torch.Generator().manual_seed(12)
    log_q0, s = random_log_probs(4, 9, generator=g), torch.randn(4, 9, dtype=torch.float64, generator=g)
    shift = torch.randn(4, 1, dtype=torch.float64, generator=g)          # one constant per context
    torch.testing.assert_close(L.log_p_hat(log_q0, s + shift), L.log_p_hat(log_q0, s), rtol=0, atol=1e-12)
    torch.testing.assert_close(L.ratio_calibration(log_q0, s + shift) - L.ratio_calibration(log_q0, s),
                               shift.squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(L.reverse_kl(log_q0, log_q0, s + shift), L.reverse_kl(log_q0, log_q0, s),
                               rtol=0, atol=1e-12)


def test_reverse_kl_gradient_at_q_equal_q0_is_q0_times_mean_s_minus_s():
    """Section 4's comment: at q = q0, d KL(q || p_hat) / d z_k = q0_k (E_q0[s] - s_k), z the logits of q."""
    g = torch.Generator().manual_seed(13)
    log_q0, s = random_log_probs(5, 8, generator=g), torch.randn(5, 8, dtype=torch.float64, generator=g)
    z = log_q0.clone().requires_grad_(True)                               # logits whose softmax is q0
    L.reverse_kl(torch.log_softmax(z, -1), log_q0, s).sum().backward()
    q0 = log_q0.exp()
    mean_s = (q0 * s).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, q0 * (mean_s - s), rtol=0, atol=1e-12)
    # a descent step raises q0 exactly where s is above its q0-mean: the words q0 under-estimates
    assert torch.equal(z.grad < 0, s > mean_s)


def test_reverse_kl_gradient_matches_formula():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    log_q0, s = random_log_probs(4, 9, generator=g), torch.randn(4, 9, dtype=torch.float64, generator=g)
    kl = L.reverse_kl(torch.log_softmax(z, -1), log_q0, s)
    kl.sum().backward()
    log_q = torch.log_softmax(z.detach(), -1)
    lp = torch.log_softmax(log_q0 + s, -1)
    analytic = log_q.exp() * (log_q - lp - kl.detach().unsqueeze(-1))    # q_k (log q_k - log p_hat_k - KL)
    torch.testing.assert_close(z.grad, analytic, rtol=0, atol=1e-12)


def test_finetune_loss_is_ce_plus_weighted_estimator():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 2, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 6, (3, 2), generator=g)
    log_q0, s = random_log_probs(3, 2, 6, generator=g), torch.randn(3, 2, 6, dtype=torch.float64, generator=g)
    ce = -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).mean()
    log_q = torch.log_softmax(logits, -1)
    loss0, ce0, _ = L.finetune_loss(log_q, y, log_q, log_q0, s, 0.0)
    torch.testing.assert_close(loss0, ce)
    torch.testing.assert_close(ce0, ce)
    loss, _, kl = L.finetune_loss(log_q, y, log_q, log_q0, s, 0.7)
    expected_kl = L.reverse_kl(torch.log_softmax(logits, -1), log_q0, s).mean()
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(loss, ce + 0.7 * expected_kl)


def test_kl_term_moves_q_toward_p():
    g = torch.Generator().manual_seed(9)
    log_p, log_q0 = random_log_probs(4, 8, generator=g), random_log_probs(4, 8, generator=g)
    z = log_q0.clone().requires_grad_(True)                  # q starts at q0
    opt = torch.optim.SGD([z], lr=2.0)
    kl_true = lambda: (torch.log_softmax(z, -1).exp() * (torch.log_softmax(z, -1) - log_p)).sum(-1)
    before = kl_true().detach()
    for _ in range(50):
        loss = L.reverse_kl(torch.log_softmax(z, -1), log_q0, log_p - log_q0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = kl_true().detach()
    assert (after < 0.5 * before).all()


# ------------------------------------------------------------------------------------------------- data ----------

def write_splits(d: Path, train: str, valid: str, test: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, text in zip(L.SPLITS, (train, valid, test)):
        (d / f"ptb.{split}.txt").write_text(text)
    return d


def test_batchify_and_get_batch_layout():
    data = torch.arange(26)                       # 26 ids, 4 columns of 6; the last 2 ids do not fit
    b = L.batchify(data, 4)
    assert b.shape == (6, 4)
    assert b[:, 0].tolist() == [0, 1, 2, 3, 4, 5]          # each column is contiguous text
    assert b[0].tolist() == [0, 6, 12, 18]
    x, y = L.get_batch(b, 0, 2)
    assert x.tolist() == [[0, 6, 12, 18], [1, 7, 13, 19]]
    assert y.tolist() == [[1, 7, 13, 19], [2, 8, 14, 20]]  # targets: one row below
    x, y = L.get_batch(b, 4, 2)                    # the last batch is shorter: only row 5 is left as a target
    assert x.tolist() == [[4, 10, 16, 22]] and y.tolist() == [[5, 11, 17, 23]]


def test_vocab_eos_and_unk(tmp_path):
    c = L.load_corpus(write_splits(tmp_path, "a b <unk>\nb c\n", "a z\n", "c\n"))
    assert c.vocab == ["a", "b", "<unk>", "<eos>", "c"]     # order of first appearance; <eos> ends each line
    assert c.valid.tolist() == [0, 2, 3]                     # z is not a training word: <unk>
    assert c.test.tolist() == [4, 3]


def test_unknown_word_without_unk_names_word_file_and_line(tmp_path):
    with pytest.raises(L.LmdiscError, match=r"ptb.test.txt:2: word 'q'"):
        L.load_corpus(write_splits(tmp_path, "a b\n", "a\n", "a\nb q\n"))


@needs_ptb
def test_real_ptb_statistics():
    c = L.load_corpus(find_ptb())
    assert len(c.vocab) == 10_000
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (929_589, 73_760, 82_430)


# ---------------------------------------------------------------------------------------------- models ----------

def test_tied_weights_are_one_tensor():
    m = L.LSTMLM(50, 16, 16, 2, 0.0)
    assert m.decoder.weight is m.encoder.weight
    assert sum(p.numel() for p in m.parameters()) == 50 * 16 + 50 + 2 * 4 * 16 * (16 + 16 + 2)


def test_a_few_hundred_steps_lower_the_loss():
    torch.manual_seed(0)
    m = L.LSTMLM(10, 16, 16, 1, 0.0)
    data = L.batchify(torch.arange(2000) % 10, 4)          # 0 1 2 ... 9 0 1 ...: each word predicts the next
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for step in range(200):
        x, y = L.get_batch(data, (step * 10) % (data.size(0) - 11), 10)
        loss = F.cross_entropy(m(x, m.init_hidden(4))[0].flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 and sum(losses[-20:]) / 20 < 0.2


class ConstantLM(torch.nn.Module):
    """An "LM" whose prediction is given: logits[t, b] for position (t, b). Stands in for q0 in the tests."""

    def __init__(self, log_q0):
        super().__init__()
        self.log_q0 = log_q0

    def init_hidden(self, bsz):
        return (torch.zeros(1),)

    def forward(self, x, hidden):
        return self.log_q0[: x.size(0)], hidden


def test_temperature_discriminator_is_q0_to_a_power_times_word_factors():
    """p_hat = q0^(1 + a(c)) exp(b_class(w)) / Z with a(c) linear in q0's entropy and top log-probability, against
    a float64 form written out by hand; zero-initialised it is chance (s = 0)."""
    g = torch.Generator().manual_seed(10)
    V = 7
    log_q0 = random_log_probs(3, 2, V, generator=g)
    word_class = torch.tensor([0, 1, 1, 2, 3, 3, 10])
    disc = L.TemperatureDiscriminator(ConstantLM(log_q0), word_class).double()
    x = torch.zeros(3, 2, dtype=torch.long)
    assert disc(x, disc.init_hidden(2))[0].abs().max() == 0
    w_a, w_h, w_m, c_a = 0.2, -0.1, 0.05, 0.3
    b = torch.randn(11, dtype=torch.float64, generator=g)
    with torch.no_grad():
        disc.gate.weight.copy_(torch.tensor([[w_h, w_m], [0.0, 0.0]]))
        disc.gate.bias.copy_(torch.tensor([w_a, c_a]))
        disc.bias.copy_(b)
    s, _ = disc(x, disc.init_hidden(2))
    q0 = log_q0.exp()
    a = w_a + w_h * -(q0 * log_q0).sum(-1, keepdim=True) + w_m * log_q0.max(-1, keepdim=True).values
    unnormalised = q0 ** (1 + a) * b[word_class].exp()
    torch.testing.assert_close(L.log_p_hat(log_q0, s), (unnormalised / unnormalised.sum(-1, keepdim=True)).log())
    torch.testing.assert_close(s - (a * log_q0 + b[word_class]), torch.full_like(s, c_a))   # s0: a constant shift
    assert sum(p.numel() for p in disc.parameters()) == 17


def test_temperature_discriminator_learns_that_q0_is_overconfident():
    """Data p = q0^0.7 (normalised): q0 is too sharp everywhere. Minimising the exact expected L_D over the
    temperature discriminator's parameters must find a = -0.3 and bring KL(q0 || p_hat) to the true KL."""
    g = torch.Generator().manual_seed(11)
    V = 30
    log_q0 = random_log_probs(256, 1, V, generator=g)
    log_p = torch.log_softmax(0.7 * log_q0, -1)
    disc = L.TemperatureDiscriminator(ConstantLM(log_q0), torch.zeros(V, dtype=torch.long)).double()
    opt = torch.optim.Adam(disc.parameters(), lr=0.05)
    x = torch.zeros(256, 1, dtype=torch.long)
    for _ in range(400):
        s, _ = disc(x, disc.init_hidden(1))
        # E_{w ~ p}[-log sigmoid(s)] + E_{w ~ q0}[-log sigmoid(-s)]: the loss with infinitely many real samples
        loss = (-(log_p.exp() * F.logsigmoid(s)).sum(-1) - (log_q0.exp() * F.logsigmoid(-s)).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        s = disc(x, disc.init_hidden(1))[0] - disc.bias[0]           # a(c) log q0(w|c) + s0(c)
    a = (s[..., 1] - s[..., 0]) / (log_q0[..., 1] - log_q0[..., 0])
    true_kl = (log_q0.exp() * (log_q0 - log_p)).sum(-1).mean()
    assert ((a + 0.3).abs() < 0.02).all()                    # found: a = -0.30 +- 0.005 in every context
    assert L.reverse_kl(log_q0, log_q0, s).mean() == pytest.approx(float(true_kl), rel=0.05)


def test_count_classes_are_roughly_logarithmic():
    text = torch.tensor([1] + [2] * 2 + [3] * 5 + [4] * 9 + [5] * 40)
    assert L.count_classes(text, 6).tolist() == [0, 1, 1, 2, 2, 4]   # BIAS_EDGES 1, 3, 10, 30, 100, ...


def test_validation_halves_never_let_phase_2_or_3_validate_on_the_discriminators_text():
    corpus = L.Corpus(["a"], torch.arange(100, 120), torch.arange(11), torch.arange(3))
    for split, learns, checks in (("valid-a", range(0, 5), range(5, 11)), ("valid-b", range(5, 11), range(0, 5))):
        text, valid, name = L.DISC_TEXTS[split](corpus)
        assert text.tolist() == list(learns) and valid.tolist() == list(checks) and "half of valid" in name
    text, valid, name = L.DISC_TEXTS["train"](corpus)
    assert text is corpus.train and valid is corpus.valid and name == "valid"


# ------------------------------------------------------------------ the strongest baseline (section 14) ------

class TableLM(torch.nn.Module):
    """A bigram "LM" with fixed logits: q(.|c) = softmax(table[previous word])."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def init_hidden(self, bsz):
        return ()

    def forward(self, x, hidden):
        return self.table[x], hidden


def test_temperature_moments_are_the_derivatives_of_the_nll():
    g = torch.Generator().manual_seed(3)
    log_q, y = random_log_probs(7, 5, 12, generator=g), torch.randint(12, (7, 5), generator=g)
    beta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    nll = lambda b: sum(-b * log_q[i, j, y[i, j]] + torch.logsumexp(b * log_q[i, j], 0)
                        for i in range(7) for j in range(5))
    d1, = torch.autograd.grad(nll(beta), beta, create_graph=True)
    d2, = torch.autograd.grad(d1, beta)
    for a, b in zip(L.temperature_moments(log_q, y, 0.8), (nll(beta), d1, d2)):
        assert float(a) == pytest.approx(b.item(), rel=1e-9)


def test_temperature_scaling_recovers_a_known_temperature():
    """Text drawn from q^0.6 (normalised) of a fixed bigram model q: fitting beta on it must find 0.6."""
    g = torch.Generator().manual_seed(5)
    V, n = 20, 60_000
    table = torch.randn(V, V, generator=g) * 2
    true = torch.softmax(0.6 * torch.log_softmax(table, -1), -1)
    words = [0]
    for u in torch.rand(n, generator=g).tolist():
        words.append(min(int(torch.searchsorted(true[words[-1]].cumsum(0), torch.tensor(u))), V - 1))
    assert L.fit_temperature(TableLM(table), L.batchify(torch.tensor(words), 10)) == pytest.approx(0.6, abs=0.02)


def test_sentences_of_targets_follow_the_stream_order():
    tokens = torch.tensor([3, 4, 0, 5, 0, 6, 7, 8, 0, 9, 0, 2, 2, 0, 1, 0, 4, 4, 0, 0, 5, 6])
    source = L.batchify(tokens, 3)
    sentence_at = [sum(int(t == 0) for t in tokens[:k]) for k in range(len(tokens))]
    rows = source.size(0)
    # source[r, j] is token j * rows + r; the targets in stream order are source[1:] read row by row
    want = [sentence_at[j * rows + r] for r in range(1, rows) for j in range(3)]
    assert L.sentence_of_targets(source, 0).tolist() == want
    targets, _ = L.test_log_probs([TableLM(torch.zeros(10, 10))], source)
    assert targets.tolist() == [int(source[r, j]) for r in range(1, rows) for j in range(3)]


def test_paired_bootstrap_is_exact_for_a_constant_gap_and_zero_for_a_model_against_itself():
    g = torch.Generator().manual_seed(2)
    nll = torch.rand(500, generator=g, dtype=torch.float64) * 6
    sentence = torch.arange(500) // 7
    same = L.paired_bootstrap(nll, nll, sentence)
    assert same["change"] == 0 and same["low"] == 0 and same["high"] == 0
    gap = L.paired_bootstrap(nll - 0.01, nll, sentence)     # every token 0.01 nats better: exp(-0.01) each draw
    for k in ("change", "low", "high"):
        assert gap[k] == pytest.approx(math.expm1(-0.01), rel=1e-9)
    noisy = L.paired_bootstrap(nll + 0.1 * torch.randn(500, generator=g, dtype=torch.float64), nll, sentence)
    assert noisy["low"] < noisy["change"] < noisy["high"] and noisy["sentences"] == 72


# ------------------------------------------------------------------------- end to end on a synthetic corpus ------

def run_cli(*argv) -> int:
    return L.main([str(a) for a in argv])


def cudnn_rule(monkeypatch):
    """cuDNN's rule on the CPU: an LSTM run in eval mode while it builds a graph cannot be back-propagated on a GPU
    ("cudnn RNN backward can only be called in training mode"), so here it raises at once."""
    forward = torch.nn.LSTM.forward
    def checked(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if not self.training and out[0].requires_grad:
            raise RuntimeError("cudnn RNN backward can only be called in training mode")
        return out
    monkeypatch.setattr(torch.nn.LSTM, "forward", checked)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`pipeline` with the `tiny` preset (train, train-disc, finetune, analyze) on a small synthetic corpus (a few
    seconds), under cuDNN's rule: every phase must also run on an NVIDIA GPU."""
    root = tmp_path_factory.mktemp("synthetic")
    L.make_synthetic(root / "data", n_words=50, tokens=(30_000, 6_000, 6_000))
    r = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        cudnn_rule(mp)
        assert run_cli("pipeline", "--data", root / "data", "--run", r) == 0
    return r


def test_the_emulated_cudnn_rule_refuses_a_graph_through_an_lstm_in_eval_mode(monkeypatch):
    lstm = torch.nn.LSTM(3, 3)
    cudnn_rule(monkeypatch)
    lstm(torch.randn(2, 1, 3))                                # training mode: allowed
    with torch.no_grad():
        lstm.eval()(torch.randn(2, 1, 3))                     # no graph: allowed
    with pytest.raises(RuntimeError, match="training mode"):
        lstm.eval()(torch.randn(2, 1, 3))


def test_the_kl_pass_is_the_eval_mode_model_computed_in_training_mode():
    """no_dropout gives eval mode's numbers bit for bit, draws no random number, and restores every dropout."""
    q = L.LSTMLM(20, 8, 8, 2, 0.5)
    x = torch.randint(20, (5, 3))
    want = q.eval()(x, q.init_hidden(3))[0]                  # (with a graph: without, the CPU kernel differs)
    rng = torch.get_rng_state()
    with L.no_dropout(q.train()):
        got = q(x, q.init_hidden(3))[0]
    assert got.requires_grad and torch.equal(got, want) and torch.equal(torch.get_rng_state(), rng)
    assert q.training and q.drop.p == 0.5 and q.rnn.dropout == 0.5


def test_finetune_writes_a_table_of_five_models(run):
    result = json.loads((run / "finetune" / "finetune.json").read_text())
    rows = [line for line in result["table"].splitlines() if line.startswith("| ") and "ppl" not in line]
    assert [r.split(" | ")[0][2:9] for r in rows] == ["base q0", "CE-only", "CE + 1 ", "rescore", "CE-only"]
    assert set(result["arms"]) == {"ce", "kl"} and result["bootstrap"]["sentences"] > 10


def test_synthetic_discriminator_beats_chance_and_estimates_the_true_kl(run):
    valid = json.loads((run / "disc.json").read_text())["valid"]
    assert valid["L_D"] < L.CHANCE_L_D - 0.01 and valid["true KL(q0||p)"] > 0.05
    # the estimated reverse KL starts at 0 (s = 0) and must move toward the true, positive value without
    # overshooting it by much (a 1x64 LSTM after 43 steps gets a quarter of the way)
    assert 0.1 * valid["true KL(q0||p)"] < valid["KL(q0||p_hat)"] < 1.5 * valid["true KL(q0||p)"]


def test_both_arms_start_from_q0_and_the_control_differs_only_by_the_kl_term(run):
    ce, kl = (L.load_checkpoint(run / "finetune" / f"{a}.pt") for a in ("ce", "kl"))
    assert ce["result"]["base_valid_ppl"] == kl["result"]["base_valid_ppl"]
    assert ce["key"] | {"arm": "kl"} == kl["key"]          # same settings, seed, q0 and discriminator


def test_both_arms_see_identical_batches_and_dropout_masks(run, tmp_path, monkeypatch):
    """The KL arm's own code path (weight 1, its extra passes of q, q0 and s) with the KL term multiplied by 0 must
    end bit for bit where the control ends: the same batches, and no random draw that would shift the dropout
    masks (a torch.rand(()) added inside reverse_kl makes this test fail)."""
    lm_ck, disc_ck = L.load_checkpoint(run / "lm.pt"), L.load_checkpoint(run / "disc.pt", "disc")
    corpus = L.prepare_corpus(lm_ck["data"])
    cfg = L.PRESETS["tiny"]["finetune"]
    args = (lm_ck, corpus, L.load_lm(lm_ck, corpus, "cpu"), None, L.batchify(corpus.train, 20),
            L.eval_data(corpus.valid, "cpu", cfg.eval_tokens), cfg)
    q0 = args[2]
    disc = L.load_disc(disc_ck, lm_ck, q0, corpus, "cpu")
    args = args[:3] + (disc,) + args[4:]
    ce = L.finetune_arm("ce", tmp_path, {"t": 1}, *args, 1.0, 7, "cpu")
    reverse_kl = L.reverse_kl
    monkeypatch.setattr(L, "reverse_kl", lambda *a: 0 * reverse_kl(*a))
    kl0 = L.finetune_arm("kl", tmp_path, {"t": 1}, *args, 1.0, 7, "cpu")
    a, b = L.load_checkpoint(tmp_path / "ce.pt")["model"], L.load_checkpoint(tmp_path / "kl.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and ce["valid_ppl"] == kl0["valid_ppl"]
    assert ce["best_step"] == kl0["best_step"] > 0             # it trained: the weights moved from q0


def test_the_kl_read_on_a_pass_with_dropout_exceeds_the_dropout_free_pass(run):
    """The dropout trap, measured at step 0 (q = q0): the same weights read with dropout are further from p_hat."""
    lm_ck, disc_ck = L.load_checkpoint(run / "lm.pt"), L.load_checkpoint(run / "disc.pt", "disc")
    corpus = L.prepare_corpus(lm_ck["data"])
    q0 = L.load_lm(lm_ck, corpus, "cpu")
    disc = L.load_disc(disc_ck, lm_ck, q0, corpus, "cpu")
    q = L.LSTMLM(**lm_ck["config"])
    q.load_state_dict(lm_ck["model"])
    x, _ = L.get_batch(L.batchify(corpus.train, 20), 0, 35)
    with torch.no_grad():
        log_q0 = torch.log_softmax(q0(x, q0.init_hidden(20))[0], -1)
        s = disc(x, disc.init_hidden(20))[0]
        kl = lambda m: L.reverse_kl(torch.log_softmax(m(x, q.init_hidden(20))[0], -1), log_q0, s).mean()
        on_eval, on_dropout = kl(q.eval()), kl(q.train())
    assert on_dropout > on_eval * 1.05 and on_eval > 0


def test_analyze_buckets_add_up_to_the_test_tokens(run, capsys):
    result = L.run_analyze(run, run / "finetune")
    assert sum(r["tokens"] for r in result["rows"]) == L.eval_data(
        L.load_corpus(L.load_checkpoint(run / "lm.pt")["data"]).test, "cpu", 20_000)[1:].numel()
    assert (run / "finetune" / "rare_words.csv").read_text().startswith("bucket,tokens,logp_base")
    assert "d kl" in capsys.readouterr().out


def test_a_finished_phase_is_up_to_date_and_other_settings_get_their_own_files(run, capsys):
    before = (run / "disc.pt").stat().st_mtime_ns
    assert run_cli("train-disc", "--run", run) == 0
    assert "is up to date" in capsys.readouterr().out and (run / "disc.pt").stat().st_mtime_ns == before
    data = L.load_checkpoint(run / "lm.pt")["data"]
    assert run_cli("train", "--data", data, "--run", run, "--lr", 5) == 1      # phase 1: one output per run folder
    assert "made with other settings" in capsys.readouterr().err
    assert run_cli("finetune", "--run", run, "--kl-weight", 0.5, "--seed", 1111) == 0
    assert (run / "finetune-kl-weight-0.5" / "finetune.json").exists()       # a variant never overwrites
    assert run_cli("finetune", "--run", run, "--seed", 2) == 0
    assert (run / "finetune-seed-2" / "finetune.json").exists()              # another seed than the LM's


def test_the_card_command_after_the_pipeline_prints_its_table(run, capsys):
    assert run_cli("finetune", "--run", run, "--lr", "1e-4") == 0
    out = capsys.readouterr().out
    assert "finetune.pt is up to date" in out and "| CE + 1 KL" in out


def test_finetune_refuses_a_discriminator_of_another_lm(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert run_cli("train", "--data", L.load_checkpoint(run / "lm.pt")["data"], "--run", other, "--seed", 5) == 0
    assert run_cli("finetune", "--run", other, "--disc", run / "disc.pt") == 1
    assert "belongs to another LM" in capsys.readouterr().err


def test_evaluate_with_a_discriminator_reads_whole_splits(run, capsys):
    assert run_cli("evaluate", "--checkpoint", run / "lm.pt", "--disc", run / "disc.pt") == 0
    out = capsys.readouterr().out
    assert "evaluate | valid, 6," in out and "learned on (train)" in out
    assert "ppl rescored" in out and "true KL(q0||p)" in out


def test_the_learned_on_view_scores_exactly_the_tokens_an_epoch_reads():
    text, loop = torch.arange(10_000), L.Loop(lr=1.0, max_tokens=1_400, bptt=35, batch_size=20)
    data = L.batchify(text, loop.batch_size)
    read = torch.cat([torch.cat(L.get_batch(data, i * loop.bptt, loop.bptt)) for i in range(2)])   # 1,400 // 700
    learned = L.learned_text(text, L.normalised(loop))
    assert set(learned.tolist()) == set(read.flatten().tolist()) and learned.numel() == 71 * 20
    assert learned[:71].tolist() == list(range(71))            # column 0's first 71 rows: the text's first 71 ids
    assert torch.equal(L.learned_text(text, L.normalised(L.Loop(lr=1.0))), text)


def test_temperature_discriminator_end_to_end_on_half_of_valid(run, capsys):
    assert run_cli("train-disc", "--run", run, "--arch", "temperature", "--split", "valid-a", "--lr", "1e-2",
                   "--epochs", 3) == 0
    out = capsys.readouterr().out
    assert "a(c) = " in out and "mean a(c) where q0 is most sure" in out and "validates on second half" in out
    path = run / "disc-lr-0.01-epochs-3-arch-temperature-split-valid-a.pt"
    ck = L.load_checkpoint(path, "disc")
    assert ck["model"]["word_class"].tolist() == L.count_classes(L.load_corpus(L.load_checkpoint(
        run / "lm.pt")["data"]).train, 51).tolist()          # counted on the LM's text, not the one it learns on
    assert run_cli("finetune", "--run", run, "--disc", path) == 0
    assert "| model | second half of valid ppl" in capsys.readouterr().out


def test_generate_and_top_words(run, capsys):
    assert run_cli("generate", "--checkpoint", run / "lm.pt", "--words", 20, "--prompt", "w1 w2") == 0
    assert capsys.readouterr().out.startswith("w1 w2 ")
    assert run_cli("top-words", "--run", run, "--prompt", "w1", "--k", 5) == 0
    out = capsys.readouterr().out.splitlines()
    assert "top 5 words of q0" in out[-7] and all(len(line.split()) == 8 for line in out[-5:])
    assert run_cli("generate", "--checkpoint", run / "lm.pt", "--prompt", "   ") == 1
    assert capsys.readouterr().err == "error: --prompt has no words\n"


def test_curves_draw_each_phases_record_on_one_scale(run, capsys, monkeypatch):
    """Each trained phase keeps its validations and the means of its progress lines; `curves` draws them as bars
    from 1 mark (the lowest value of a series, over all files) to 40 (the highest), and only bars without matplotlib."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # as on a machine without it: import fails
    arms = [run / "finetune" / "ce.pt", run / "finetune" / "kl.pt"]
    assert run_cli("curves", *arms) == 0
    out = capsys.readouterr().out
    kl = json.loads((run / "finetune" / "kl.json").read_text())
    steps = [c["step"] for c in kl["curve"]]       # tiny: a line every 10 steps and at the epoch's end
    assert steps == [10, 20, 30, 40, steps[-1]] and all(set(c) == {"step", "ce", "kl"} for c in kl["curve"])
    assert [h["step"] for h in kl["history"]] == [0, steps[-1]] and "picture" not in out
    ce = json.loads((run / "finetune" / "ce.json").read_text())   # KL(q || p_hat) on validation, both arms: at
    assert ce["history"][0]["valid_kl"] == kl["history"][0]["valid_kl"] > 0          # step 0 both are q0
    assert kl["history"][1]["valid_kl"] < ce["history"][1]["valid_kl"]              # the KL arm ends nearer p_hat
    series = out.split("\n", 1)[1]                                 # the first series: training ce, control then KL arm
    bars = [line.split() for line in series.split("validation valid_ppl")[0].splitlines()
            if line.strip().startswith("step")]
    assert len(bars) == 10 and {len(b[3]) for b in bars} >= {1, 40}
    assert [float(b[2]) for b in bars[5:]] == pytest.approx([c["ce"] for c in kl["curve"]], abs=1e-5)
    assert "validation valid_ppl" in out and "training kl" in out and "validation valid_kl" in out
    assert run_cli("curves", run / "disc.pt") == 0 and "validation L_D" in capsys.readouterr().out
    assert run_cli("curves", run / "finetune" / "finetune.pt") == 1
    assert "is not an lmdisc lm or disc checkpoint" in capsys.readouterr().err


def test_curves_also_write_a_png_when_matplotlib_is_installed(run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (never required): the curves stay bars")
    for name in ("ce.pt", "kl.pt"):
        (tmp_path / name).write_bytes((run / "finetune" / name).read_bytes())
    assert run_cli("curves", tmp_path / "ce.pt", tmp_path / "kl.pt") == 0
    assert capsys.readouterr().out.endswith(f"picture: {tmp_path / 'curves-ce+kl.png'}\n")
    assert (tmp_path / "curves-ce+kl.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------- interrupts, resume, divergence -------------

TINY_DATA = dict(n_words=30, tokens=(6_000, 1_000, 1_000))


def train_args(data, r, *more):
    return ["train", "--data", str(data), "--run", str(r), *map(str, more)]


@pytest.mark.parametrize("where", ["mid-epoch", "during validation"])
def test_interrupted_then_resumed_train_ends_with_the_same_weights(tmp_path, monkeypatch, capsys, where):
    """Ctrl-C between two steps, or while a validation runs: exit 130, nothing marked done, and the same command
    again continues to the very weights of an uninterrupted run."""
    L.make_synthetic(tmp_path / "data", **TINY_DATA)
    monkeypatch.setitem(L.PRESETS["tiny"], "train", L.dataclasses.replace(L.PRESETS["tiny"]["train"], eval_every=7,
                                                                          epochs=2))
    assert L.main(train_args(tmp_path / "data", tmp_path / "a")) == 0
    with monkeypatch.context() as m:
        if where == "mid-epoch":                   # the signal arrives as step 10 finishes
            progress = L.Output.progress

            def ask(self, loop, *a):
                progress(self, loop, *a)
                L.Output.asked = signal.SIGINT if loop["step"] == 10 else L.Output.asked
            m.setattr(L.Output, "progress", ask)
        else:                                      # ...or while the second validation runs
            validate, calls = L.lm_validate, []

            def ask(*a):
                calls.append(1)
                L.Output.asked = signal.SIGINT if len(calls) == 2 else L.Output.asked
                return validate(*a)
            m.setattr(L, "lm_validate", ask)
        assert L.main(train_args(tmp_path / "data", tmp_path / "b")) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert not (tmp_path / "b" / "lm.pt").exists() and (tmp_path / "b" / "lm.resume.pt").exists()
    assert L.main(train_args(tmp_path / "data", tmp_path / "b")) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = (L.load_checkpoint(tmp_path / r / "lm.pt") for r in "ab")
    assert a["result"] == b["result"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not (tmp_path / "b" / "lm.resume.pt").exists()


def test_sigterm_acts_as_ctrl_c_and_the_rerun_finishes_the_same(tmp_path):
    """What `timeout` and cluster schedulers send: exit 128 + 15, a resume point, and the rerun completes it."""
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(60_000, 1_000, 1_000))
    cmd = [sys.executable, str(HERE / "lmdisc.py"), *train_args(tmp_path / "data", tmp_path / "r")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:                                       # the first progress line: training is under way
        if "| step " in line:
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: finishing this step" in err and "run the same command again" in err
    assert (tmp_path / "r" / "lm.resume.pt").exists() and not (tmp_path / "r" / "lm.pt").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "resuming from" in done.stdout
    whole = subprocess.run(cmd[:-1] + [str(tmp_path / "w")], capture_output=True, text=True, env=env)
    assert whole.returncode == 0
    assert L.load_checkpoint(tmp_path / "r" / "lm.pt")["result"] == L.load_checkpoint(tmp_path / "w" / "lm.pt")["result"]


def test_an_interrupted_arm_prints_no_comparison_and_the_rerun_completes_it(run, capsys, monkeypatch):
    with monkeypatch.context() as m:
        progress = L.Output.progress

        def ask(self, loop, *a):                   # Ctrl-C during the KL arm, the second of the two
            progress(self, loop, *a)
            L.Output.asked = signal.SIGINT if self.phase == "finetune[kl]" and loop["step"] == 5 else L.Output.asked
        m.setattr(L.Output, "progress", ask)
        assert run_cli("finetune", "--run", run, "--kl-weight", 2) == 130
    out = capsys.readouterr().out
    assert "finetune[kl]" in out and "| model |" not in out and "best baseline" not in out
    assert not (run / "finetune-kl-weight-2" / "finetune.pt").exists()
    assert run_cli("finetune", "--run", run, "--kl-weight", 2) == 0
    out = capsys.readouterr().out
    assert "ce.pt is up to date" in out and "resuming from" in out and "| model |" in out


def test_a_process_killed_at_any_moment_leaves_no_damaged_file(tmp_path):
    """SIGKILL (no handler can run): every file is whole, and the same command again ends as an uninterrupted run."""
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(60_000, 1_000, 1_000))
    cmd = [sys.executable, str(HERE / "lmdisc.py"), *train_args(tmp_path / "data", tmp_path / "r")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:
        if "| step " in line:
            p.kill()
            break
    p.wait(timeout=60)
    assert not [f for f in (tmp_path / "r").iterdir() if f.name.startswith(".lm")]   # no temporary file left
    assert subprocess.run(cmd, capture_output=True, env=env).returncode == 0
    whole = subprocess.run(cmd[:-1] + [str(tmp_path / "w")], capture_output=True, env=env)
    assert whole.returncode == 0
    assert L.load_checkpoint(tmp_path / "r" / "lm.pt")["result"] == L.load_checkpoint(tmp_path / "w" / "lm.pt")["result"]


def test_cpu_training_is_deterministic(tmp_path):
    L.make_synthetic(tmp_path / "data", **TINY_DATA)
    for r in "ab":
        assert L.main(train_args(tmp_path / "data", tmp_path / r, "--seed", 5)) == 0
    a, b = (L.load_checkpoint(tmp_path / r / "lm.pt") for r in "ab")
    assert a["fingerprint"] == b["fingerprint"]


def test_a_diverged_training_keeps_nothing_and_a_lower_lr_then_runs(tmp_path, capsys):
    L.make_synthetic(tmp_path / "data", **TINY_DATA)
    assert L.main(train_args(tmp_path / "data", tmp_path / "r", "--lr", "1e4")) == 1
    err = capsys.readouterr().err
    assert "training diverged, nothing was kept; try a lower --lr" in err and err.count("\n") == 1
    assert not any((tmp_path / "r").glob("lm*.pt"))
    assert L.main(train_args(tmp_path / "data", tmp_path / "r", "--lr", "20")) == 0


# ------------------------------------------------------------------------ files and one-line errors ----------

def small_lm_checkpoint(tmp_path) -> Path:
    d = write_splits(tmp_path / "d", "a b c\nb c a\n", "a b c a b\n" * 9, "c a b\n" * 9)
    corpus = L.load_corpus(d)
    out = L.Output(tmp_path / "m.pt", "lm", {"seed": 1})
    out.save(L.lm_checkpoint(L.LSTMLM(len(corpus.vocab), 8, 8, 1, 0.0), corpus, {"valid_ppl": 3.0}))
    return tmp_path / "m.pt"


def test_checkpoint_round_trip_weights_only(tmp_path):
    path = small_lm_checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)                  # no code of ours needed to read it
    assert raw["result"]["valid_ppl"] == 3.0 and raw["kind"] == "lm"
    ck = L.load_checkpoint(path)
    assert ck["data"] == (tmp_path / "d").resolve() and ck["fingerprint"] == raw["fingerprint"]
    (tmp_path / "plain").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode    # as any file the user makes, not 0600


class RunsCode:
    def __reduce__(self):                                      # unpickling would call os.system("true")
        return os.system, ("true",)


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    path = small_lm_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    weights = torch.load(path, weights_only=True)["model"]["encoder.weight"].numpy().tobytes()
    at = data.index(weights) + 40                              # 4 bytes inside the tensor data
    data[at: at + 4] = b"\xff\x7f\x00\x01"
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    ck = torch.load(path, weights_only=True)
    del ck["result"]["valid_ppl"]                              # a nested field missing
    torch.save(ck, tmp_path / "nested.pt")
    torch.save({"kind": "lm", "run": print}, tmp_path / "code.pt")          # a pickle naming a function
    torch.save({"kind": "lm", "run": exec}, tmp_path / "exec.pt")
    torch.save({"kind": "lm", "x": RunsCode()}, tmp_path / "system.pt")      # would call os.system on load
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"kind": "disc"}, tmp_path / "disc.pt")
    (tmp_path / "half.pt").write_bytes(path.read_bytes()[:1000])
    cases = {"flipped.pt": "fails its integrity check", "nested.pt": "fails its integrity check",
             "code.pt": "names print, which loading it would call", "exec.pt": "names exec, which",
             "system.pt": f"names {os.system.__module__}.system, which loading it would call: a file that can run "
             f"code is refused", "text.pt": "is not a checkpoint", "empty.pt": "is empty",
             "disc.pt": "not an lmdisc lm checkpoint", "half.pt": "is truncated or damaged: delete it and run the "
             "step that makes it", "nope.pt": "does not exist", ".": "is a folder"}
    for name, message in cases.items():
        assert L.main(["evaluate", "--checkpoint", str(tmp_path / name)]) == 1, name
        err = capsys.readouterr().err
        assert message in err and err.startswith("error:") and err.count("\n") == 1, (name, err)
        # torch's own advice is the one action that would run the code: never repeated
        assert not any(w in err for w in ("weights_only", "safe_globals", "file an issue")), (name, err)
    assert "train" not in L.main(["evaluate", "--checkpoint", "nope.pt"]) * "" + capsys.readouterr().err


def test_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # main prints it in one line
        small_lm_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    monkeypatch.undo()
    path = small_lm_checkpoint(tmp_path)
    path.with_suffix(".json").unlink()                          # as if the disk filled before the JSON was written
    assert L.Output(path, "lm", {"seed": 1}).done() is not None
    assert json.loads(path.with_suffix(".json").read_text())["valid_ppl"] == 3.0   # the rerun completes it


def test_concurrent_writers_do_not_collide(tmp_path):
    import threading
    errors = []

    def writer(k):
        try:
            for i in range(200):
                L.atomic_write(tmp_path / "x.json", json.dumps({"writer": k, "i": i}))
        except Exception as e:          # noqa: BLE001 - any error is the failure this test looks for
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads((tmp_path / "x.json").read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_moved_project_still_finds_its_data_and_a_damaged_json_is_only_a_copy(run, tmp_path, capsys):
    import shutil
    shutil.copytree(run.parent, tmp_path / "first")            # the run folder and the data folder beside it
    shutil.move(tmp_path / "first", tmp_path / "moved")        # where it was made exists no more
    moved = tmp_path / "moved" / "run"
    assert L.load_checkpoint(moved / "lm.pt")["data"] == (tmp_path / "moved" / "data").resolve()
    (moved / "finetune" / "finetune.json").write_text("{ not json")   # the program reads the checkpoint, never this
    assert run_cli("analyze", "--run", moved) == 0 and "rare words" in capsys.readouterr().out


def test_cli_lists_exactly_its_subcommands():
    sub = next(a for a in L.build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == ["train", "train-disc", "finetune", "pipeline", "analyze", "evaluate", "generate",
                                 "top-words", "curves", "make-synthetic", "download"]


@pytest.mark.parametrize("argv", [["train", "--seed", "-1"], ["train", "--epochs", "1.5"], ["finetune", "--lr", "x"],
                                  ["finetune", "--lr", "0"], ["train", "--lr", "nan"], ["finetune", "--kl-weight", "-1"],
                                  ["generate", "--checkpoint", "x", "--temperature", "1e-300"],
                                  ["train", "--device", "tpu"], ["train-disc", "--arch", "recency"],
                                  ["train", "--run", str(HERE / "README.md")], ["analyze", "--run", __file__]])
def test_bad_flags_are_a_usage_line_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as e:
        L.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_card_command_with_nothing_trained_says_what_to_run(tmp_path, capsys):
    assert L.main(["finetune", "--lr", "1e-4", "--run", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'r' / 'lm.pt'} does not exist yet: run `python lmdisc.py "
                                       f"train --run {tmp_path / 'r'}` first\n")


def test_an_absent_device_is_one_line(tmp_path, capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    L.make_synthetic(tmp_path / "data", **TINY_DATA)
    assert L.main(train_args(tmp_path / "data", tmp_path / "r", "--device", "mps")) == 1
    assert "--device mps was asked for, but this machine has none" in capsys.readouterr().err


def test_data_problems_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bin").mkdir()
    for s in L.SPLITS:
        (tmp_path / "bin" / f"ptb.{s}.txt").write_bytes(b"\xff\xfe\x00")
    write_splits(tmp_path / "empty", "", "a\n", "a\n")
    cases = {"nowhere": "does not exist", "bin": "is not UTF-8 text", "empty": "ptb.train.txt is empty"}
    for folder, message in cases.items():
        assert L.main(train_args(tmp_path / folder, tmp_path / "r")) == 1
        assert message in capsys.readouterr().err


def test_a_users_own_files_are_never_replaced(tmp_path, capsys):
    """--data with only the user's ptb.train.txt: the advice must not be a download that would replace it; the
    download itself refuses; make-synthetic refuses to write over a folder's files."""
    mine = write_splits(tmp_path / "mine", "my own text\n", "x\n", "x\n")
    (mine / "ptb.valid.txt").unlink()
    (mine / "ptb.test.txt").unlink()
    assert L.main(train_args(mine, tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert "lacks ptb.valid.txt, ptb.test.txt" in err and f"download --data {mine}" not in err
    assert L.main(["download", "--data", str(mine)]) == 1
    assert "never replaces a file it did not write" in capsys.readouterr().err
    assert L.main(["make-synthetic", "--out", str(mine)]) == 1
    assert "never replaces a file it did not write" in capsys.readouterr().err
    assert (mine / "ptb.train.txt").read_text() == "my own text\n"
    assert L.main(["make-synthetic", "--out", str(tmp_path / "s")]) == 0
    assert L.main(["make-synthetic", "--out", str(tmp_path / "s")]) == 0      # the same corpus again: up to date
    assert "is up to date" in capsys.readouterr().out
    (tmp_path / "s" / "ptb.train.txt").write_bytes(b"\xff\xfe binary")       # the user's now, and not UTF-8
    assert L.main(["make-synthetic", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "exists with other content" in err and err.count("\n") == 1


def test_data_changed_after_phase_1_is_refused_in_one_line(run, tmp_path, capsys):
    import shutil
    shutil.copytree(run.parent, tmp_path / "copy")
    data, r = tmp_path / "copy" / "data", tmp_path / "copy" / "run"
    (data / "ptb.train.txt").write_text((data / "ptb.train.txt").read_text() + "w1 w2\n")   # one line more
    for argv in (["train-disc", "--run", r, "--lr", 0.5], ["finetune", "--run", r], ["evaluate", "--checkpoint",
                 r / "finetune" / "kl.pt"], ["analyze", "--run", r]):
        assert run_cli(*argv) == 1, argv
        err = capsys.readouterr().err
        assert "has changed since" in err and err.count("\n") == 1, (argv, err)


def test_other_settings_and_other_discriminators_get_their_own_folders(run):
    lm_ck = L.load_checkpoint(run / "lm.pt")
    names = lambda **flags: L.variant("finetune", argparse.Namespace(seed=1111, **flags), lm_ck, lr=1e-4,
                                      disc=run / "disc.pt")[1]
    assert names(lr=None, disc=None) == names(lr=1e-4, disc=run / "disc.pt") == "finetune"
    assert names(lr=1.000001e-4, disc=None) != names(lr=1e-4, disc=None)
    assert names(lr=1e-2, disc=run / "disc-arch-constant.pt") == "finetune-lr-0.01-disc-arch-constant"


def test_another_folders_discriminator_is_named_by_its_fingerprint(run, tmp_path, capsys):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(run, other)                                # the same LM; its disc.pt is another folder's
    assert run_cli("finetune", "--run", other, "--disc", run / "disc.pt") == 0
    fingerprint = L.load_checkpoint(run / "disc.pt", "disc")["fingerprint"]
    assert (other / f"finetune-disc-{fingerprint[:8]}" / "finetune.pt").exists()


def test_a_second_signal_while_stopping_changes_nothing():
    L.Output.asked, L.Output.training_now = None, False
    try:
        with pytest.raises(L.Stopped):
            L.on_signal(signal.SIGINT, None)                   # outside a loop: stop now
        assert L.on_signal(signal.SIGINT, None) is None       # 50 ms later, while the first one is reported
    finally:
        L.Output.asked = None


def test_download_checks_sha256_and_says_where_to_put_files_offline(tmp_path, monkeypatch, capsys):
    src = tmp_path / "mirror"
    write_splits(src, "a b\n", "a\n", "b\n")
    sums = {f"ptb.{s}.txt": L.sha256_of(src / f"ptb.{s}.txt") for s in L.SPLITS}
    monkeypatch.setattr(L, "PTB_SHA256", sums)
    L.download_ptb(tmp_path / "dest", base_url=src.as_uri() + "/")
    assert (tmp_path / "dest" / "ptb.train.txt").read_text() == "a b\n"
    monkeypatch.setattr(L, "PTB_SHA256", dict(sums, **{"ptb.test.txt": "0" * 64}))
    (tmp_path / "dest" / "ptb.test.txt").unlink()
    with pytest.raises(L.LmdiscError, match="sha256 does not match"):
        L.download_ptb(tmp_path / "dest", base_url=src.as_uri() + "/")
    assert not (tmp_path / "dest" / "ptb.test.txt").exists() and len(list((tmp_path / "dest").iterdir())) == 2
    with pytest.raises(L.LmdiscError, match="Without internet, copy"):
        L.download_ptb(tmp_path / "dest", base_url=(tmp_path / "nowhere").as_uri() + "/")
