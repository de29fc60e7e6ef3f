"""Tests for lmdisc.py. Run: python -m pytest -q   (one estimator function: python -m pytest -q -k reverse_kl)

The estimator tests come first: each checks a function of section 4 against an independent float64 computation (a
closed-form KL of small categoricals, a hand-derived gradient). Then the data and models, the baselines, the phases
end to end on a synthetic corpus made on the fly, and the contract a user relies on (one line for every error, no
file replaced that the program did not write, resume after Ctrl-C or SIGTERM). A test that needs Penn Treebank looks
in ptb/ and ../shared/ptb and skips, saying so, if neither has it.
"""

import argparse, json, math, os, shutil, signal, subprocess, sys
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

def test_a_toy_a_student_can_check_by_hand():
    """Three words. p = (0.5, 0.3, 0.2) is the data, q0 = (0.25, 0.25, 0.5) the base model. The optimal logit is
    s* = log(p / q0) = (log 2, log 1.2, log 0.4); p_hat = q0 exp(s*) / Z = p with Z = 1;
    KL(q0 || p) = 0.25 log(0.25/0.5) + 0.25 log(0.25/0.3) + 0.5 log(0.5/0.2) = 0.239278;
    L_D at s* = -sum p log(p / (p + q0)) - sum q0 log(q0 / (p + q0)) = 1.275129, below chance 2 ln 2 = 1.386294."""
    p, q0 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    s = torch.tensor([0.693147, 0.182322, -0.916291], dtype=torch.float64)   # log 2, log 1.2, log 0.4 to 6 digits
    assert L.reverse_kl(q0.log(), q0.log(), s).item() == pytest.approx(0.239278, abs=2e-6)
    assert L.ratio_calibration(q0.log(), s).item() == pytest.approx(0.0, abs=2e-6)
    torch.testing.assert_close(L.log_p_hat(q0.log(), s).exp(), p, rtol=0, atol=2e-6)
    # L_D with the real word drawn from p: each word w as the real one, weighted by p(w)
    l_d = sum(p[w] * L.discriminator_loss(s, torch.tensor(w), q0.log()) for w in range(3))
    assert l_d.item() == pytest.approx(1.275129, abs=2e-6) and l_d < L.CHANCE_L_D == pytest.approx(1.386294, abs=1e-6)
    # s* > 0 for words 0 and 1 (p > q0: real), < 0 for word 2 (q0 > p: called a q0 word)
    real, fake = L.discriminator_accuracy(s, torch.tensor(2), q0.log())
    assert real.item() == 0 and fake.item() == 0.5            # the real word 2 is called fake; q0's mass on word 2
    real, fake = L.discriminator_accuracy(s.expand(2, 3), torch.tensor([0, 1]), q0.log().expand(2, 3))
    assert real.item() == 1 and fake.item() == 0.5

def test_discriminator_accuracy_against_counting_by_hand():
    """A real word counts when s > 0, a q0 word when s < 0 (weighted by q0); s = 0 is neither: chance scores 0."""
    g = torch.Generator().manual_seed(5)
    log_q0, s = random_log_probs(6, 5, generator=g), torch.randn(6, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    real, fake = L.discriminator_accuracy(s, y, log_q0)
    assert real.item() == pytest.approx(sum(float(s[c, y[c]] > 0) for c in range(6)) / 6, abs=1e-12)
    want = sum(log_q0[c, w].exp().item() for c in range(6) for w in range(5) if s[c, w] < 0) / 6
    assert fake.item() == pytest.approx(want, abs=1e-12)
    assert [v.item() for v in L.discriminator_accuracy(0 * s, y, log_q0)] == [0, 0]

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

def train_table(log_p, log_q0, steps, lr, seed, batch=64):
    """SGD on a free table of logits with real words sampled from p, through discriminator_loss itself."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(*log_p.shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([s], lr=lr)
    ctx = torch.arange(log_p.size(0)).repeat_interleave(batch)
    for step in range(steps):
        target = torch.multinomial(log_p.exp()[ctx], 1, generator=g).squeeze(-1)
        loss = L.discriminator_loss(s[ctx], target, log_q0[ctx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return s.detach()

def test_tabular_discriminator_recovers_true_reverse_kl():
    """Finite samples of p (2000 per context) -> a tabular discriminator -> KL(q0 || p_hat) near KL(q0 || p)."""
    g = torch.Generator().manual_seed(6)
    log_p, log_q0 = random_log_probs(3, 6, generator=g), random_log_probs(3, 6, generator=g)
    true_kl = (log_q0.exp() * (log_q0 - log_p)).sum(-1)
    s = train_table(log_p, log_q0, 2000, 20.0, seed=1)
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
    L.reverse_kl(torch.log_softmax(z, -1), log_q0, s).sum().backward()
    log_q = torch.log_softmax(z.detach(), -1)
    lp = torch.log_softmax(log_q0 + s, -1)
    kl = (log_q.exp() * (log_q - lp)).sum(-1, keepdim=True)              # computed here, not by the code
    analytic = log_q.exp() * (log_q - lp - kl)                           # q_k (log q_k - log p_hat_k - KL)
    torch.testing.assert_close(z.grad, analytic, rtol=0, atol=1e-12)

def test_finetune_loss_is_ce_plus_weighted_estimator():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 2, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 6, (3, 2), generator=g)
    log_q0, s = random_log_probs(3, 2, 6, generator=g), torch.randn(3, 2, 6, dtype=torch.float64, generator=g)
    logits_kl = torch.randn(3, 2, 6, dtype=torch.float64, generator=g)   # the dropout-free pass: other numbers
    q, q_kl = logits.softmax(-1), logits_kl.softmax(-1)
    ce = -sum(q[i, j, y[i, j]].log() for i in range(3) for j in range(2)) / 6
    p_hat = log_q0.exp() * s.exp() / (log_q0.exp() * s.exp()).sum(-1, keepdim=True)
    expected_kl = (q_kl * (q_kl / p_hat).log()).sum(-1).mean()               # KL read on the second pass
    loss, ce_, kl = L.finetune_loss(q.log(), y, q_kl.log(), log_q0, s, 0.7)
    for got, want in ((ce_, ce), (kl, expected_kl), (loss, ce + 0.7 * expected_kl)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

def test_kl_term_moves_q_toward_p():
    g = torch.Generator().manual_seed(9)
    log_p, log_q0 = random_log_probs(4, 8, generator=g), random_log_probs(4, 8, generator=g)
    z = log_q0.clone().requires_grad_(True)                  # q starts at q0
    opt = torch.optim.SGD([z], lr=2.0)
    kl_true = lambda: (torch.log_softmax(z, -1).exp() * (torch.log_softmax(z, -1) - log_p)).sum(-1)
    before = kl_true().detach()
    for _ in range(50):
        opt.zero_grad()
        L.reverse_kl(torch.log_softmax(z, -1), log_q0, log_p - log_q0).mean().backward()
        opt.step()
    assert (kl_true() < 0.5 * before).all()

# ------------------------------------------------------------------------------------------------- data ----------

def write_splits(d: Path, train: str, valid: str, test: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, text in zip(L.SPLITS, (train, valid, test)):
        (d / f"ptb.{split}.txt").write_text(text)
    return d

def test_batchify_and_get_batch_layout():
    data = torch.arange(26)                       # 26 ids, 4 columns of 6; the last 2 ids do not fit
    b = L.batchify(data, 4)
    assert b.shape == (6, 4) and b[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and b[0].tolist() == [0, 6, 12, 18]
    x, y = L.get_batch(b, 0, 2)                    # each column is contiguous text; targets: one row below
    assert x.tolist() == [[0, 6, 12, 18], [1, 7, 13, 19]] and y.tolist() == [[1, 7, 13, 19], [2, 8, 14, 20]]
    x, y = L.get_batch(b, 4, 2)                    # the last batch is shorter: only row 5 is left as a target
    assert x.tolist() == [[4, 10, 16, 22]] and y.tolist() == [[5, 11, 17, 23]]

def test_vocab_eos_and_unk_and_an_unknown_word_without_unk(tmp_path):
    c = L.load_corpus(write_splits(tmp_path / "a", "a b <unk>\nb c\n", "a z\n", "c\n"))
    assert c.vocab == ["a", "b", "<unk>", "<eos>", "c"]     # order of first appearance; <eos> ends each line
    assert c.valid.tolist() == [0, 2, 3] and c.test.tolist() == [4, 3]   # z is not a training word: <unk>
    with pytest.raises(L.LmdiscError, match=r"ptb.test.txt:2: word 'q'"):  # and without <unk>: where it is
        L.load_corpus(write_splits(tmp_path / "b", "a b\n", "a\n", "a\nb q\n"))

@needs_ptb
def test_real_ptb_statistics():
    c = L.load_corpus(find_ptb())
    assert (len(c.vocab), c.train.numel(), c.valid.numel(), c.test.numel()) == (10_000, 929_589, 73_760, 82_430)

# ---------------------------------------------------------------------------------------------- models ----------

def test_tied_weights_are_one_tensor():
    m, n = L.LSTMLM(50, 16, 16, 2, 0.0), 50 * 16 + 50 + 2 * 4 * 16 * (16 + 16 + 2)   # E, d, two LSTM layers
    assert m.decoder.weight is m.encoder.weight and sum(p.numel() for p in m.parameters()) == n

def test_a_few_hundred_steps_lower_the_loss():
    torch.manual_seed(0)
    m = L.LSTMLM(10, 16, 16, 1, 0.0)
    data = L.batchify(torch.arange(2000) % 10, 4)          # 0 1 2 ... 9 0 1 ...: each word predicts the next
    opt, losses = torch.optim.Adam(m.parameters(), lr=1e-2), []
    for step in range(200):
        x, y = L.get_batch(data, (step * 10) % (data.size(0) - 11), 10)
        losses.append(F.cross_entropy(m(x, m.init_hidden(4))[0].flatten(0, 1), y.flatten()))
        opt.zero_grad()
        losses[-1].backward()
        opt.step()
    assert losses[0] > 1.5 and sum(losses[-20:]) / 20 < 0.2

# ------------------------------------------------------------------ the strongest baseline (section 11) ------

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
    with pytest.MonkeyPatch.context() as mp:
        cudnn_rule(mp)
        assert run_cli("pipeline", "--data", root / "data", "--run", root / "run") == 0
    return root / "run"

def loaded(run):
    """q0, the discriminator and the corpus of a run, as phase 3 loads them."""
    lm_ck = L.load_checkpoint(run / "lm.pt")
    corpus = L.prepare_corpus(lm_ck["data"], of=lm_ck)
    return lm_ck, corpus, L.load_lm(lm_ck, corpus, "cpu"), L.load_disc(L.load_checkpoint(run / "disc.pt", "disc"),
                                                                       lm_ck, corpus, "cpu")

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

def test_finetune_prints_three_models_and_analyze_the_baselines_and_rare_words(run, capsys):
    table = json.loads((run / "finetune" / "finetune.json").read_text())["summary"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ppl" not in line]
    assert [r.split(" | ")[0][2:9] for r in rows] == ["base q0", "CE-only", "CE + 1 "]
    assert run_cli("analyze", "--run", run) == 0
    out = capsys.readouterr().out
    assert "| rescored p_hat" in out and "| CE-only control, temperature" in out and "paired bootstrap over" in out
    csv = (run / "finetune" / "rare_words.csv").read_text().splitlines()
    assert csv[0].startswith("bucket,tokens,logp_base,logp_rescored,logp_control,logp_kl,delta_rescored")
    assert sum(int(r.split(",")[1]) for r in csv[1:]) == L.eval_data(loaded(run)[1].test, "cpu", 20_000)[1:].numel()

def test_phase_2_estimates_the_true_kl_on_the_synthetic_corpus(run, capsys):
    _, corpus, q0, disc = loaded(run)
    m = L.disc_metrics(q0, disc, L.eval_data(corpus.valid, "cpu"), corpus, (L.rescoring, L.truth))
    # s starts at 0 (an estimate of 0) and must move toward the true, positive KL without overshooting it by much
    assert m["L_D"] < L.CHANCE_L_D - 0.01 and 0.1 * m["true KL(q0||p)"] < m["KL(q0||p_hat)"] < 1.5 * m[
        "true KL(q0||p)"] and m["ce_rescored"] < m["ce_base"]
    assert run_cli("evaluate", "--checkpoint", run / "lm.pt", "--disc", run / "disc.pt") == 0
    out = capsys.readouterr().out
    assert "evaluate | valid, 6," in out and "learned on (train)" in out and "true KL(q0||p)" in out

def test_the_learned_on_view_scores_exactly_the_tokens_an_epoch_reads():
    text, loop = torch.arange(10_000), L.Schedule(lr=1.0, max_tokens=1_400, bptt=35, batch_size=20)
    data = L.batchify(text, loop.batch_size)
    read = torch.cat([torch.cat(L.get_batch(data, i * loop.bptt, loop.bptt)) for i in range(2)])   # 1,400 // 700
    learned = L.learned_text(text, L.dataclasses.asdict(loop))
    assert set(learned.tolist()) == set(read.flatten().tolist()) and learned.numel() == 71 * 20
    assert learned[:71].tolist() == list(range(71))            # column 0's first 71 rows: the text's first 71 ids
    assert torch.equal(L.learned_text(text, L.dataclasses.asdict(L.Schedule(lr=1.0))), text)

def test_both_arms_see_identical_batches_and_dropout_masks(run, tmp_path, monkeypatch):
    """The KL arm's own code path (its extra passes of q, q0 and s) with the KL term multiplied by 0 must end bit for
    bit where the control ends, and have trained: the same batches, and no random draw that would shift the dropout
    masks (a torch.rand(()) added inside reverse_kl makes this test fail). Both start from q0 (validation at step 0)."""
    lm_ck, corpus, q0, disc = loaded(run)
    cfg, device = L.PRESETS["tiny"]["finetune"], argparse.Namespace(seed=7, device="cpu")
    data = (L.batchify(corpus.train, 20), L.eval_data(corpus.valid, "cpu", 20_000), L.eval_data(corpus.test, "cpu"))
    arm = lambda name: L.finetune_arm(name, L.Output(tmp_path / f"{name}.pt", "lm", {}), lm_ck, corpus, q0, disc,
                                      *data, cfg, 1.0, device)
    ce = arm("ce")
    reverse_kl = L.reverse_kl
    monkeypatch.setattr(L, "reverse_kl", lambda *a: 0 * reverse_kl(*a))
    kl0 = arm("kl")
    a, b = L.load_checkpoint(tmp_path / "ce.pt")["model"], L.load_checkpoint(tmp_path / "kl.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and ce["valid_ppl"] == kl0["valid_ppl"]
    assert ce["best_step"] == kl0["best_step"] > 0 and ce["base_valid_ppl"] == kl0["base_valid_ppl"]

class Captured(Exception):
    """Raised by a stand-in for fit: finetune_arm's own batch_loss and states, caught before any step."""

def phase_3_step(run, monkeypatch, kl_weight=0.7):
    """The KL arm's batch_loss and its states, exactly as finetune_arm builds them, and an LM of the run."""
    lm_ck, corpus, q0, disc = loaded(run)
    def capture(phase, model, optimizer, batch_loss, new_hidden, *rest, **kw):
        raise Captured(model, batch_loss, new_hidden(20))
    monkeypatch.setattr(L, "fit", capture)
    with pytest.raises(Captured) as got:
        L.finetune_arm("kl", L.Output(run / "never.pt", "lm", {}), lm_ck, corpus, q0, disc, None, None, None,
                       L.PRESETS["tiny"]["finetune"], kl_weight, argparse.Namespace(seed=7, device="cpu"))
    return (*got.value.args, q0, disc, L.batchify(corpus.train, 20))

def test_phase_3_is_ce_on_the_dropout_pass_plus_kl_on_the_dropout_free_pass(run, monkeypatch):
    """Phase 3's own loss, recomputed independently over two batches: CE on the pass with dropout (same masks, same
    seed), plus 0.7 KL(q || p_hat) on a dropout-free pass (eval mode's numbers) whose state is carried from the
    previous batch by the dropout-free model, its gradient reaching q. Fails if the KL term is detached, read on the
    CE pass, or started from the CE pass's state."""
    q, batch_loss, hidden, q0, disc, data = phase_3_step(run, monkeypatch)
    h_free, h0, hd, h_drop = q.init_hidden(20), q0.init_hidden(20), disc.init_hidden(20), q.init_hidden(20)
    for i in (0, 35):                                           # two batches: the second reads carried states
        x, y = L.get_batch(data, i, 35)
        torch.manual_seed(i)
        loss, shown = batch_loss(x, y, hidden)
        grads = torch.autograd.grad(loss, list(q.parameters()))
        torch.manual_seed(i)                                    # the same dropout masks, drawn again
        logits, h_drop = q.train()(x, tuple(h.detach() for h in h_drop))
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        with torch.no_grad():
            log_q0, h0 = q0(x, h0)
            s, hd = disc(x, hd)
            p_hat = torch.softmax(torch.log_softmax(log_q0, -1) + s, -1)
        free, h_free = q.eval()(x, tuple(h.detach() for h in h_free))   # on the CPU eval mode may build a graph
        q_free = free.softmax(-1)
        kl = (q_free * (q_free.log() - p_hat.log())).sum(-1).mean()
        want = torch.autograd.grad(ce + 0.7 * kl, list(q.parameters()))
        assert shown["ce"].item() == pytest.approx(ce.item(), rel=1e-5), i
        assert shown["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6), i
        assert loss.item() == pytest.approx((ce + 0.7 * kl).item(), rel=1e-5), i
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)
    assert kl.item() > 1e-3                                     # a KL worth testing

def test_the_kl_arm_ends_nearer_p_hat_than_the_control(run, tmp_path):
    """The real arms, a few steps on the fixture (the same seed, batches and masks): the KL term pulls q toward
    p_hat, so the KL arm's validation KL(q || p_hat) ends below the control's."""
    lm_ck, corpus, q0, disc = loaded(run)
    cfg = L.dataclasses.replace(L.PRESETS["tiny"]["finetune"], lr=3e-3, max_tokens=7_000, log_interval=5)
    data = (L.batchify(corpus.train, 20), L.eval_data(corpus.valid, "cpu", 6_000), L.eval_data(corpus.test, "cpu"))
    arms = {a: L.finetune_arm(a, L.Output(tmp_path / f"{a}.pt", "lm", {}), lm_ck, corpus, q0, disc, *data, cfg, 1.0,
                              argparse.Namespace(seed=7, device="cpu")) for a in ("ce", "kl")}
    kl = {a: arms[a]["history"][-1]["valid_kl"] for a in arms}
    assert arms["kl"]["history"][0]["valid_kl"] == arms["ce"]["history"][0]["valid_kl"] > 0   # both start at q0
    assert kl["kl"] < 0.95 * kl["ce"], kl                        # 0.104 against 0.119 here

def test_the_kl_read_on_a_pass_with_dropout_exceeds_the_dropout_free_pass(run):
    """The dropout trap, measured at step 0 (q = q0): the same weights read with dropout are further from p_hat."""
    lm_ck, corpus, q0, disc = loaded(run)
    q = L.LSTMLM(**lm_ck["config"])
    q.load_state_dict(lm_ck["model"])
    x, _ = L.get_batch(L.batchify(corpus.train, 20), 0, 35)
    with torch.no_grad():
        log_q0 = torch.log_softmax(q0(x, q0.init_hidden(20))[0], -1)
        s = disc(x, disc.init_hidden(20))[0]
        kl = lambda m: L.reverse_kl(torch.log_softmax(m(x, q.init_hidden(20))[0], -1), log_q0, s).mean()
        on_eval, on_dropout = kl(q.eval()), kl(q.train())
    assert on_dropout > on_eval * 1.05 and on_eval > 0

def test_the_s0_control_is_p_hat_equal_to_q0(run, capsys):
    assert run_cli("train-disc", "--run", run, "--arch", "constant") == 0
    assert run_cli("finetune", "--run", run, "--disc", run / "disc-arch-constant.pt") == 0
    kl = json.loads((run / "finetune-disc-arch-constant" / "kl.json").read_text())
    assert abs(kl["history"][0]["valid_kl"]) < 1e-6            # at step 0, q = q0 = p_hat: KL(q || p_hat) = 0
    assert "CE + 1 KL" in capsys.readouterr().out

def test_a_finished_step_is_up_to_date_and_other_settings_get_their_own_files(run, capsys):
    before = (run / "disc.pt").stat().st_mtime_ns
    assert run_cli("train-disc", "--run", run) == 0
    out = capsys.readouterr().out                               # a finished step prints its stored result
    assert "is up to date" in out and "train-disc | valid | L_D" in out
    assert (run / "disc.pt").stat().st_mtime_ns == before
    assert run_cli("finetune", "--run", run, "--lr", "1e-4") == 0            # the card's command: its stored table
    out = capsys.readouterr().out
    assert "finetune.pt is up to date" in out and "| CE + 1 KL" in out
    assert run_cli("train", "--data", L.load_checkpoint(run / "lm.pt")["data"], "--run", run, "--lr", 5) == 1
    assert "made with other settings (lr 20.0 there, 5.0 here)" in capsys.readouterr().err   # one lm.pt per run
    assert run_cli("finetune", "--run", run, "--seed", 2) == 0
    assert (run / "finetune-seed-2" / "finetune.json").exists()              # another seed than the LM's
    lm_ck = L.load_checkpoint(run / "lm.pt")
    names = lambda **flags: L.Output.named("finetune", argparse.Namespace(seed=1111, **flags), lm_ck, lr=1e-4,
                                           disc=run / "disc.pt")[1]
    assert names(lr=None, disc=None) == names(lr=1e-4, disc=run / "disc.pt") == "finetune"
    assert names(lr=1.000001e-4, disc=None) != names(lr=1e-4, disc=None)
    assert names(lr=1e-2, disc=run / "disc-arch-constant.pt") == "finetune-lr-0.01-disc-arch-constant"

def test_other_lms_and_other_folders_discriminators(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert run_cli("train", "--data", L.load_checkpoint(run / "lm.pt")["data"], "--run", other, "--seed", 5) == 0
    assert run_cli("finetune", "--run", other, "--disc", run / "disc.pt") == 1
    assert "belongs to another LM" in capsys.readouterr().err
    shutil.rmtree(other)
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("finetune*"))  # the same LM; disc.pt another folder's
    assert run_cli("finetune", "--run", other, "--disc", run / "disc.pt") == 0
    fingerprint = L.load_checkpoint(run / "disc.pt", "disc")["fingerprint"]
    assert (other / f"finetune-disc-{fingerprint[:8]}" / "finetune.pt").exists()

def test_a_moved_project_still_finds_its_data_and_its_discriminator(run, tmp_path, capsys):
    shutil.copytree(run.parent, tmp_path / "first")            # the run folder and the data folder beside it
    shutil.move(tmp_path / "first", tmp_path / "moved")        # where it was made exists no more
    moved = tmp_path / "moved" / "run"
    assert L.load_checkpoint(moved / "lm.pt")["data"] == (tmp_path / "moved" / "data").resolve()
    (moved / "finetune" / "finetune.json").write_text("{ not json")   # the program reads the checkpoint, never this
    assert run_cli("analyze", "--run", moved) == 0 and "rare words" in capsys.readouterr().out

def test_changed_data_and_swapped_files_are_refused_in_one_line(run, tmp_path, capsys):
    """`analyze` reads only the discriminator and arms the fine-tune recorded; no step reads data changed since
    phase 1."""
    shutil.copytree(run.parent, tmp_path / "copy")
    data, r = tmp_path / "copy" / "data", tmp_path / "copy" / "run"
    assert run_cli("train-disc", "--run", r, "--seed", 5) == 0               # another discriminator of the same LM
    shutil.copy(r / "disc.pt", r / "disc-paper.pt")
    shutil.copy(r / "disc-seed-5.pt", r / "disc.pt")
    assert run_cli("analyze", "--run", r) == 1 and "not the file the fine-tune recorded" in capsys.readouterr().err
    shutil.copy(r / "disc-paper.pt", r / "disc.pt")
    shutil.copy(r / "finetune" / "ce.pt", r / "ce-own.pt")
    shutil.copy(r / "finetune" / "kl.pt", r / "finetune" / "ce.pt")         # an arm swapped
    assert run_cli("analyze", "--run", r) == 1 and "ce.pt is not the file" in capsys.readouterr().err
    shutil.copy(r / "ce-own.pt", r / "finetune" / "ce.pt")
    (data / "ptb.train.txt").write_text((data / "ptb.train.txt").read_text() + "w1 w2\n")   # one line more
    for argv in (["train-disc", "--run", r, "--lr", 0.5], ["finetune", "--run", r], ["evaluate",
                 "--checkpoint", r / "finetune" / "kl.pt"], ["analyze", "--run", r]):
        assert run_cli(*argv) == 1, argv
        assert "has changed since" in (err := capsys.readouterr().err) and err.count("\n") == 1, (argv, err)

# ---------------------------------------------------------------- interrupts, resume, divergence -------------

TINY_DATA = dict(n_words=30, tokens=(6_000, 1_000, 1_000))

def train_args(data, r, *more):
    return ["train", "--data", str(data), "--run", str(r), *map(str, more)]

def ctrl_c_at(m, step, phase=None):
    """Ctrl-C (a KeyboardInterrupt) during step `step` of `phase`: the process stops there and then."""
    progress = L.progress
    def stop(name, st, *a):
        if st.step == step and phase in (None, name):
            raise KeyboardInterrupt
        return progress(name, st, *a)
    m.setattr(L, "progress", stop)

@pytest.mark.parametrize("where", ["mid-epoch", "during validation"])
def test_ctrl_c_then_the_same_command_ends_with_the_same_weights(tmp_path, monkeypatch, capsys, where):
    """Ctrl-C anywhere: exit 130, one line naming the step the same command continues from, nothing marked done;
    the same command again ends with the very weights of an uninterrupted run."""
    L.make_synthetic(tmp_path / "data", **TINY_DATA)
    monkeypatch.setitem(L.PRESETS["tiny"], "train", L.dataclasses.replace(L.PRESETS["tiny"]["train"], eval_every=7,
                                                                          epochs=2, log_interval=3))
    assert L.main(train_args(tmp_path / "data", tmp_path / "a")) == 0
    with monkeypatch.context() as m:
        if where == "mid-epoch":
            ctrl_c_at(m, 11)
        else:                                      # ...or while the second validation runs
            validate, calls = L.lm_validate, []
            def stop(*a):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return validate(*a)
            m.setattr(L, "lm_validate", stop)
        assert L.main(train_args(tmp_path / "data", tmp_path / "b")) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: the same command continues lm.pt from step ") and err.count("\n") == 1
    assert not (tmp_path / "b" / "lm.pt").exists() and (tmp_path / "b" / "lm.resume.pt").exists()
    assert L.main(train_args(tmp_path / "data", tmp_path / "b")) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = (L.load_checkpoint(tmp_path / r / "lm.pt") for r in "ab")
    assert a["result"] == b["result"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not (tmp_path / "b" / "lm.resume.pt").exists() and len(a["result"]["history"]) == 4

def test_an_interrupted_arm_prints_no_comparison_and_the_rerun_completes_it(run, capsys, monkeypatch):
    with monkeypatch.context() as m:
        ctrl_c_at(m, 25, "finetune[kl]")          # Ctrl-C during the KL arm, the second of the two
        assert run_cli("finetune", "--run", run, "--kl-weight", 2) == 130
    assert "| model |" not in capsys.readouterr().out and not (run / "finetune-kl-weight-2" / "finetune.pt").exists()
    assert run_cli("finetune", "--run", run, "--kl-weight", 2) == 0
    out = capsys.readouterr().out
    assert "ce.pt is up to date" in out and "resuming from" in out and "| model |" in out

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_kill_at_any_moment_damages_nothing_and_the_same_command_continues(tmp_path, sig):
    """SIGTERM (what `timeout` and schedulers send) or SIGKILL: the process stops; every file is whole, and the same
    command again ends as an uninterrupted run, leaving no temporary file."""
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(60_000, 1_000, 1_000))
    cmd = [sys.executable, str(HERE / "lmdisc.py"), *train_args(tmp_path / "data", tmp_path / "r")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:                                       # the first progress line: training is under way
        if "| step " in line:
            p.send_signal(sig)
            break
    p.communicate(timeout=120)
    assert p.returncode == -sig and not (tmp_path / "r" / "lm.pt").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    whole = subprocess.run(cmd[:-1] + [str(tmp_path / "w")], capture_output=True, text=True, env=env)
    assert done.returncode == whole.returncode == 0
    result = lambda r: L.load_checkpoint(tmp_path / r / "lm.pt")["result"]
    assert result("r") == result("w") and not list(tmp_path.glob("r/.*"))

def test_a_diverged_training_keeps_nothing_and_a_lower_lr_then_runs(tmp_path, capsys):
    L.make_synthetic(tmp_path / "data", **TINY_DATA)
    assert L.main(train_args(tmp_path / "data", tmp_path / "r", "--lr", "1e4")) == 1
    err = capsys.readouterr().err
    assert "training diverged, nothing was kept; try a lower --lr" in err and err.count("\n") == 1
    assert not any((tmp_path / "r").glob("lm*.pt"))
    assert L.main(train_args(tmp_path / "data", tmp_path / "r", "--lr", "20")) == 0
    assert L.main(["train-disc", "--run", str(tmp_path / "r"), "--lr", "1e4"]) == 1       # phase 2 too
    assert "training diverged" in capsys.readouterr().err and not any((tmp_path / "r").glob("disc*.pt"))

# ------------------------------------------------------------------------ files and one-line errors ----------

class RunsCode:
    def __reduce__(self):                                      # unpickling would call os.system("true")
        return os.system, ("true",)

def test_checkpoints_load_weights_only_and_bad_ones_are_one_line_errors(tmp_path, capsys):
    corpus = L.load_corpus(d := write_splits(tmp_path / "d", "a b c\nb c a\n", "a b c a b\n" * 9, "c a b\n" * 9))
    L.Output(path := tmp_path / "m.pt", "lm", {}).save(L.lm_checkpoint(L.LSTMLM(4, 8, 8, 1, 0), corpus, {}))
    assert torch.load(path, weights_only=True)["kind"] == "lm"                 # no code of ours needed to read it
    assert L.load_checkpoint(path)["data"] == d.resolve()
    data = bytearray(path.read_bytes())
    at = data.index(torch.load(path, weights_only=True)["model"]["encoder.weight"].numpy().tobytes()) + 40
    data[at: at + 4] = b"\xff\x7f\x00\x01"                                    # 4 bytes inside the tensor data
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    torch.save({"kind": "lm", "run": print}, tmp_path / "code.pt")          # a pickle naming a function
    torch.save({"kind": "lm", "x": RunsCode()}, tmp_path / "system.pt")      # would call os.system on load
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"kind": "disc"}, tmp_path / "disc.pt")
    torch.save({"kind": "lm", "format": 4}, tmp_path / "old.pt")
    (tmp_path / "half.pt").write_bytes(path.read_bytes()[:1000])
    cases = {"flipped.pt": "is truncated or damaged", "code.pt": "names print, which loading it would call",
             "system.pt": f"names {os.system.__module__}.system, which loading it would call: a file that can run "
             f"code is refused", "text.pt": "is not a checkpoint", "empty.pt": "is empty", "disc.pt": "not an lmdisc "
             "lm checkpoint", "old.pt": "written by another version", "half.pt": "is truncated or damaged: delete it "
             "and run the step that makes it", "nope.pt": "does not exist", ".": "is a folder"}
    for name, message in cases.items():
        assert L.main(["evaluate", "--checkpoint", str(tmp_path / name)]) == 1, name
        assert message in (err := capsys.readouterr().err) and err.startswith("error:") and err.count("\n") == 1, err
        # torch's own advice is the one action that would run the code: never repeated
        assert not any(w in err for w in ("weights_only", "safe_globals", "file an issue")), (name, err)

ABSENT = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if not ok]
@pytest.mark.parametrize("argv", [["train", "--seed", "-1"], ["train", "--epochs", "1.5"], ["finetune", "--lr", "x"],
                                  ["finetune", "--lr", "0"], ["train", "--lr", "nan"], ["train", "--device", "tpu"],
                                  ["finetune", "--kl-weight", "-2"], ["train-disc", "--arch", "x"]] +
                         [["evaluate", "--checkpoint", "x", "--device", d] for d in ABSENT])
def test_bad_flags_are_a_usage_line_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as e:
        L.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err

def test_the_card_command_with_nothing_trained_says_what_to_run(tmp_path, capsys):
    assert L.main(["finetune", "--lr", "1e-4", "--run", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'r' / 'lm.pt'} does not exist yet: run `python lmdisc.py "
                                       f"train --run {tmp_path / 'r'}` first\n")
    sub = next(a for a in L.build_parser()._actions if a.dest == "command")       # and the subcommands are these
    assert list(sub.choices) == ["train", "train-disc", "finetune", "pipeline", "analyze", "evaluate",
                                 "make-synthetic", "download"]

def test_data_problems_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "bin").mkdir()
    for s in L.SPLITS:
        (tmp_path / "bin" / f"ptb.{s}.txt").write_bytes(b"\xff\xfe\x00")
    write_splits(tmp_path / "empty", "", "a\n", "a\n")
    cases = {"bin": "is not UTF-8 text", "empty": "ptb.train.txt is empty", "nowhere": "lacks ptb.train.txt"}
    for folder, message in cases.items():
        assert L.main(train_args(tmp_path / folder, tmp_path / "r")) == 1
        assert message in (err := capsys.readouterr().err) and err.count("\n") == 1
    assert "download --data NEW_FOLDER" in err                  # never advice to fetch PTB beside a user's text

def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_training(tmp_path, capsys, monkeypatch):
    L.make_synthetic(tmp_path / "data", **TINY_DATA)
    (tmp_path / "file").write_text("a file, not a folder")
    assert L.main(train_args(tmp_path / "data", tmp_path / "file" / "run")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write in {tmp_path / 'file' / 'run'}") and err.count("\n") == 1
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "lm.json").write_text("my notes")                    # a user's own file where lm.json goes
    assert L.main(train_args(tmp_path / "data", tmp_path / "r")) == 1 and "lmdisc did not write it" in \
        capsys.readouterr().err and (tmp_path / "r" / "lm.json").read_text() == "my notes"
    with monkeypatch.context() as m:                           # a full disk: the file named, no temporary file left
        m.setattr(L.Path, "write_bytes", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(L.LmdiscError, match=f"could not write {tmp_path / 'x.json'}: No space left on device"):
            L.atomic_write(tmp_path / "x.json", "{}")
    assert not list(tmp_path.glob(".x.json*")) and not (tmp_path / "x.json").exists()

def test_a_users_own_files_are_never_replaced(tmp_path, capsys, monkeypatch):
    mine = write_splits(tmp_path / "mine", "my own text\n", "x\n", "x\n")
    assert L.main(["make-synthetic", "--out", str(mine)]) == 1 and "other content" in capsys.readouterr().err
    assert L.main(["make-synthetic", "--out", str(tmp_path / "s")]) == L.main(["make-synthetic", "--out",
                                                                               str(tmp_path / "s")]) == 0  # same again
    src = write_splits(tmp_path / "mirror", "a b\n", "a\n", "b\n")           # download: from a local "mirror"
    sums = {f"ptb.{s}.txt": L.sha256((src / f"ptb.{s}.txt").read_bytes()) for s in L.SPLITS}
    monkeypatch.setattr(L, "PTB_SHA256", dict(sums, **{"ptb.test.txt": "0" * 64}))
    with pytest.raises(L.LmdiscError, match="are not Penn Treebank's"):     # said, not silently skipped
        L.download_ptb(mine, base_url=src.as_uri() + "/")
    assert (mine / "ptb.train.txt").read_text() == "my own text\n"
    [(mine / f"ptb.{s}.txt").unlink() for s in L.SPLITS]
    with pytest.raises(L.LmdiscError, match="sha256 does not match"):
        L.download_ptb(mine, base_url=src.as_uri() + "/")
    assert not (mine / "ptb.test.txt").exists()                               # checked before it gets its name
    monkeypatch.setattr(L, "PTB_SHA256", sums)
    L.download_ptb(mine, base_url=src.as_uri() + "/")
    assert (mine / "ptb.test.txt").read_text() == "b\n"
