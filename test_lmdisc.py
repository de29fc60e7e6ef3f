"""Tests for lmdisc.py. Run: python -m pytest -q

Estimator tests compare against independent float64 computations (closed-form KL of small categoricals,
hand-derived gradients); training tests use a synthetic corpus made on the fly, so the default run needs no
download. Tests that need the real Penn Treebank look in ptb/ and ../shared/ptb and skip, saying so, if neither
has it.
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmdisc as L

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)


def find_ptb() -> Path | None:
    for d in (HERE / "ptb", HERE.parent / "shared" / "ptb"):
        if all((d / f"ptb.{s}.txt").exists() for s in L.SPLITS):
            return d
    return None


needs_ptb = pytest.mark.skipif(find_ptb() is None, reason="Penn Treebank not found in ptb/ or ../shared/ptb "
                                                          "(run `python lmdisc.py download`)")


def random_log_probs(*shape, generator=None):
    return torch.log_softmax(torch.randn(*shape, dtype=torch.float64, generator=generator) * 2, -1)


# ------------------------------------------------------------------------------------------------- data ----------

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
    assert list(L.batch_starts(b, 2)) == [0, 2, 4]


def write_splits(d: Path, train: str, valid: str, test: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, text in zip(L.SPLITS, (train, valid, test)):
        (d / f"ptb.{split}.txt").write_text(text)
    return d


def test_vocab_eos_and_unk(tmp_path):
    d = write_splits(tmp_path, "a b <unk>\nb c\n", "a zebra\n", "c\n")
    corpus = L.load_corpus(d)
    assert corpus.vocab == ["a", "b", "<unk>", "<eos>", "c"]
    assert corpus.train.tolist() == [0, 1, 2, 3, 1, 4, 3]         # one <eos> per line
    assert corpus.valid.tolist() == [0, 2, 3]                    # "zebra" -> <unk>


def test_unknown_word_without_unk_names_word_file_and_line(tmp_path):
    d = write_splits(tmp_path, "a b\n", "a\nb zebra\n", "a\n")
    with pytest.raises(L.LmdiscError, match=r"ptb.valid.txt:2: word 'zebra'"):
        L.load_corpus(d)


def test_missing_data_is_a_clear_error(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("a\n")
    with pytest.raises(L.LmdiscError, match="lacks ptb.valid.txt, ptb.test.txt.*download"):
        L.ensure_data(tmp_path, may_download=False)


def test_download_accepts_good_file_and_rejects_corrupt_one(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "ptb.train.txt").write_text("the good file\n")
    good = {"ptb.train.txt": L.sha256_of(src / "ptb.train.txt")}
    dest = tmp_path / "dest"
    L.download_ptb(dest, base_url=src.as_uri() + "/", checksums=good, log=lambda _: None)
    assert (dest / "ptb.train.txt").read_text() == "the good file\n"

    bad = {"ptb.train.txt": "0" * 64}
    dest2 = tmp_path / "dest2"
    with pytest.raises(L.LmdiscError, match="does not match"):
        L.download_ptb(dest2, base_url=src.as_uri() + "/", checksums=bad, log=lambda _: None)
    assert list(dest2.iterdir()) == []                # nothing half-written, no temporary file left


def test_download_unreachable_says_where_to_put_files(tmp_path):
    with pytest.raises(L.LmdiscError, match="by hand"):
        L.download_ptb(tmp_path, base_url=(tmp_path / "nowhere").as_uri() + "/", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@needs_ptb
def test_real_ptb_statistics():
    corpus = L.load_corpus(find_ptb())
    assert len(corpus.vocab) == 10_000
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (929_589, 73_760, 82_430)
    for name, digest in L.PTB_SHA256.items():
        assert L.sha256_of(find_ptb() / name) == digest


# ------------------------------------------------------------------------------------------------- model ---------

def test_tied_weights_are_one_tensor():
    m = L.LSTMLM(L.LMConfig(vocab_size=30, emsize=8, nhid=8, nlayers=2, dropout=0.0, tied=True))
    assert m.decoder.weight is m.encoder.weight
    untied = L.LSTMLM(L.LMConfig(vocab_size=30, emsize=8, nhid=8, nlayers=2, dropout=0.0, tied=False))
    assert untied.decoder.weight is not untied.encoder.weight
    with pytest.raises(L.LmdiscError, match="nhid == emsize"):
        L.LSTMLM(L.LMConfig(vocab_size=30, emsize=8, nhid=16, tied=True))


def test_a_few_hundred_steps_lower_the_loss():
    torch.manual_seed(0)
    # a deterministic cyclic text: perfectly predictable, so the loss must fall far below log(V)
    data = L.batchify(torch.arange(4000) % 7, 8)
    m = L.LSTMLM(L.LMConfig(vocab_size=7, emsize=16, nhid=16, nlayers=1, dropout=0.0))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    losses, hidden = [], m.init_hidden(8)
    for step in range(300):
        i = (step * 10) % (data.size(0) - 11)
        x, y = L.get_batch(data, i, 10)
        logits, hidden = m(x, L.detach_hidden(hidden))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 and sum(losses[-20:]) / 20 < 0.2


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


def test_minimiser_of_the_exact_loss_is_the_log_ratio():
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


def test_temperature_discriminator_is_q0_to_a_power_times_word_factors():
    """arch temperature: p_hat = q0^(1 + a(c)) exp(b_w) / Z with a(c) linear in q0's entropy and top log-prob,
    checked against a float64 computation written out by hand; zero-initialised it is chance (s = 0)."""
    g = torch.Generator().manual_seed(10)
    V = 7
    disc = L.Discriminator(L.DiscConfig(vocab_size=V, arch="temperature")).double()
    x, log_q0 = torch.zeros(3, 2, dtype=torch.long), random_log_probs(3, 2, V, generator=g)
    assert disc(x, (), log_q0)[0].abs().max() == 0
    w_a, w_h, w_m, c_a, b = 0.2, -0.1, 0.05, 0.3, torch.randn(V, dtype=torch.float64, generator=g)
    with torch.no_grad():
        disc.gate.weight.copy_(torch.tensor([[w_h, w_m], [0.0, 0.0]]))
        disc.gate.bias.copy_(torch.tensor([w_a, c_a]))
        disc.bias.copy_(b)
    s, _ = disc(x, (), log_q0)
    q0 = log_q0.exp()
    entropy = -(q0 * log_q0).sum(-1, keepdim=True)
    a = w_a + w_h * entropy + w_m * log_q0.max(-1, keepdim=True).values
    unnormalised = q0 ** (1 + a) * b.exp()
    torch.testing.assert_close(L.log_p_hat(log_q0, s), (unnormalised / unnormalised.sum(-1, keepdim=True)).log())
    torch.testing.assert_close(s - (a * log_q0 + b), torch.full_like(s, c_a))     # s0 = 0.3: a constant shift


def test_temperature_discriminator_learns_that_q0_is_overconfident():
    """Data p = q0^0.7 (normalised): q0 is too sharp everywhere. Minimising the exact expected L_D over the
    temperature discriminator's parameters must find a = -0.3 and bring KL(q0 || p_hat) to the true KL."""
    g = torch.Generator().manual_seed(11)
    V = 30
    log_q0 = random_log_probs(256, V, generator=g)
    log_p = torch.log_softmax(0.7 * log_q0, -1)
    disc = L.Discriminator(L.DiscConfig(vocab_size=V, arch="temperature")).double()
    opt = torch.optim.Adam(disc.parameters(), lr=0.05)
    x = torch.zeros(256, dtype=torch.long)
    for _ in range(400):
        s, _ = disc(x, (), log_q0)
        # E_{w ~ p}[-log sigmoid(s)] + E_{w ~ q0}[-log sigmoid(-s)]: the loss with infinitely many real samples
        loss = (-(log_p.exp() * F.logsigmoid(s)).sum(-1) - (log_q0.exp() * F.logsigmoid(-s)).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        s, _ = disc(x, (), log_q0)
        s_minus_b = s - disc.bias                             # a(c) log q0(w|c) + s0(c)
    a = (s_minus_b[:, 1] - s_minus_b[:, 0]) / (log_q0[:, 1] - log_q0[:, 0])
    true_kl = (log_q0.exp() * (log_q0 - log_p)).sum(-1).mean()
    est_kl = L.reverse_kl(log_q0, log_q0, s).mean()
    assert ((a + 0.3).abs() < 0.02).all()                    # found: a = -0.30 +- 0.005 in every context
    assert est_kl == pytest.approx(float(true_kl), rel=0.05)  # found: 0.0865 vs 0.0865


def test_bucket_word_bias_is_shared_by_words_of_similar_count(tmp_path):
    """word_bias bucket: one b per class of training counts, kept in the checkpoint (a weights-only load rebuilds
    the classes); two words with counts in the same class always get the same s from a unigram discriminator."""
    counts = torch.tensor([0, 1, 2, 5, 9, 40, 2000, 50000])
    cfg = L.DiscConfig(vocab_size=8, arch="unigram", word_bias="bucket")
    disc = L.Discriminator(cfg, counts)
    assert disc.word_class.tolist() == [0, 1, 1, 2, 2, 4, 7, 10]       # BIAS_EDGES 1, 3, 10, 30, ..., 30k
    with torch.no_grad():
        disc.bias.copy_(torch.arange(11.0))
    L.save_checkpoint(tmp_path / "d.pt", {"kind": "disc", "model": disc.state_dict()})
    loaded = L.Discriminator(cfg)                                      # no counts: the checkpoint brings them
    loaded.load_state_dict(L.load_checkpoint(tmp_path / "d.pt", "disc")["model"])
    s, _ = loaded(torch.zeros(1, 1, dtype=torch.long), (), torch.zeros(1, 1, 8))
    assert s[0, 0].tolist() == [0, 1, 1, 2, 2, 4, 7, 10]


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


# ------------------------------------------------------------------------------------------- checkpoints ---------

def test_checkpoint_round_trip_weights_only(tmp_path):
    d = write_splits(tmp_path / "d", "a b c\nb c a\n", "a b\n", "c a\n")
    corpus = L.load_corpus(d)
    m = L.LSTMLM(L.LMConfig(vocab_size=len(corpus.vocab), emsize=8, nhid=8, nlayers=1))
    L.save_checkpoint(tmp_path / "m.pt", L.lm_checkpoint(m, corpus, "train", {"valid_ppl": 3.0}, data={"holdout": 0}))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["vocab"] == corpus.vocab and raw["metrics"]["valid_ppl"] == 3.0
    m2 = L.lm_from_checkpoint(L.load_checkpoint(tmp_path / "m.pt", "lm"), torch.device("cpu"))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert raw["fingerprint"] == L.weights_fingerprint(m2.state_dict())


def test_corrupt_or_wrong_kind_checkpoint_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(L.LmdiscError, match="not a readable lmdisc checkpoint"):
        L.load_checkpoint(bad, "lm")
    torch.save({"kind": "disc"}, tmp_path / "disc.pt")
    with pytest.raises(L.LmdiscError, match="is a 'disc' checkpoint"):
        L.load_checkpoint(tmp_path / "disc.pt", "lm")
    assert L.main(["generate", "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_lists_its_subcommands():
    out = subprocess.run([sys.executable, str(HERE / "lmdisc.py"), "--help"], capture_output=True, text=True).stdout
    for cmd in ("download", "train", "train-disc", "finetune", "analyze", "pipeline", "evaluate", "generate",
                "make-synthetic"):
        assert cmd in out


# ------------------------------------------------------------------------- end to end on a synthetic corpus ------

def quiet(_):
    pass


def tiny_pipeline_config(data: Path, **finetune) -> L.PipelineConfig:
    loop = dict(bptt=20, batch_size=10, log_interval=50, clip=0.25)
    return L.PipelineConfig(
        data=L.DataConfig(data), model=dict(emsize=32, nhid=32, nlayers=1, dropout=0.1, tied=True),
        train_loop=L.LoopConfig(epochs=2, lr=10.0, **loop),
        disc=dict(arch="lstm", emsize=32, nhid=32, nlayers=1, dropout=0.3), disc_train=L.DiscTrainConfig(),
        disc_loop=L.LoopConfig(epochs=1, lr=1e-2, eval_every=40, **loop),
        finetune=L.FinetuneConfig(**finetune), finetune_loop=L.LoopConfig(epochs=1, lr=0.0, max_tokens=4000,
                                                                          eval_every=10, **loop),
        lrs=[1.0], seed=0)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    L.make_synthetic(root / "data", n_words=60, tokens=(30_000, 4_000, 4_000), seed=1, log=quiet)
    result = L.run_pipeline(tiny_pipeline_config(root / "data"), root / "run", torch.device("cpu"), log=quiet)
    return root, result


def test_pipeline_writes_results_with_four_rows(synthetic_run):
    root, result = synthetic_run
    ft = json.loads((root / "run" / "finetune.json").read_text())
    models = [r["model"] for r in ft["rows"]]
    assert len(models) == 4 and models[0].startswith("base") and models[1].startswith("rescored")
    assert models[2].startswith("CE-only control") and models[3].startswith("CE + 1 KL")
    assert all(math.isfinite(r["test_ppl"]) for r in ft["rows"])
    assert "| model | valid ppl |" in (root / "run" / "results.md").read_text()


def test_synthetic_disc_beats_chance_and_estimates_true_kl(synthetic_run):
    root, _ = synthetic_run
    d = json.loads((root / "run" / "disc.json").read_text())["valid_disc"]
    assert d["L_D"] < L.CHANCE_L_D - 0.01
    # the estimated reverse KL starts at 0 (s = 0) and must move toward the true, positive value without
    # overshooting it by much
    assert d["kl_q0_p_true"] > 0.05
    assert 0.1 * d["kl_q0_p_true"] < d["kl_q0_phat"] < 1.5 * d["kl_q0_p_true"]


def test_analyze_buckets_add_up_to_test_tokens(synthetic_run):
    root, result = synthetic_run
    corpus = L.load_corpus(root / "data")
    rows = [line.split(",") for line in (root / "run" / "rare_words.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    tokens = [int(r[header.index("tokens")]) for r in body if r[0] == "frequency"]
    n_targets = L.batchify(corpus.test, L.EVAL_BATCH_SIZE).numel() - L.EVAL_BATCH_SIZE
    assert sum(tokens) == n_targets == result["analyze"]["test_tokens"]
    assert sum(int(r[header.index("tokens")]) for r in body if r[0] == "rank") == n_targets


def test_finetune_refuses_a_discriminator_of_another_lm(synthetic_run, tmp_path):
    root, _ = synthetic_run
    ck = L.load_checkpoint(root / "run" / "lm.pt", "lm")
    ck["model"] = {k: v + 0.01 for k, v in ck["model"].items()}
    L.save_checkpoint(tmp_path / "other.pt", ck)
    pc = tiny_pipeline_config(root / "data")
    with pytest.raises(L.LmdiscError, match="trained against an LM"):
        L.run_finetune(pc.data, tmp_path / "other.pt", root / "run" / "disc.pt", pc.finetune, pc.finetune_loop,
                       [1e-3], ["kl"], tmp_path, torch.device("cpu"), 0, log=quiet)


def test_pipeline_skips_finished_steps(synthetic_run):
    root, _ = synthetic_run
    lines = []
    L.run_pipeline(tiny_pipeline_config(root / "data"), root / "run", torch.device("cpu"), log=lines.append)
    assert sum("up to date, skipped" in line for line in lines) == 3


def test_cpu_training_is_deterministic(tmp_path):
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(5_000, 1_000, 1_000), seed=2, log=quiet)
    pc = tiny_pipeline_config(tmp_path / "data")
    loop = dataclasses.replace(pc.train_loop, epochs=1)
    a = L.run_train(pc.data, pc.model, loop, tmp_path / "a.pt", torch.device("cpu"), 5, False, log=quiet)
    b = L.run_train(pc.data, pc.model, loop, tmp_path / "b.pt", torch.device("cpu"), 5, False, log=quiet)
    assert a["valid_ppl"] == b["valid_ppl"] and a["test_ppl"] == b["test_ppl"]
    assert L.load_checkpoint(tmp_path / "a.pt", "lm")["fingerprint"] == \
        L.load_checkpoint(tmp_path / "b.pt", "lm")["fingerprint"]


def test_resume_continues_where_training_stopped(tmp_path):
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(5_000, 1_000, 1_000), seed=3, log=quiet)
    pc = tiny_pipeline_config(tmp_path / "data")
    one = dataclasses.replace(pc.train_loop, epochs=1)
    first = L.run_train(pc.data, pc.model, one, tmp_path / "lm.pt", torch.device("cpu"), 0, False, log=quiet)
    lines = []
    second = L.run_train(pc.data, pc.model, dataclasses.replace(one, epochs=2), tmp_path / "lm.pt",
                         torch.device("cpu"), 0, True, log=lines.append)
    assert any("resumed" in line and "epoch 2" in line for line in lines)
    assert second["steps"] == 2 * first["steps"]


def test_bucket_classes_are_counted_on_the_lms_text_not_the_discriminators(synthetic_run, tmp_path):
    """Counted on the held-out slice the discriminator learns on, "count 0" would mean "never a real word in this
    text", a leak it learns (a measured run did: valid L_D above chance). The classes must come from the LM's text."""
    data = synthetic_run[0] / "data"
    pc, cpu = tiny_pipeline_config(data), torch.device("cpu")
    dcfg = dataclasses.replace(pc.data, holdout=0.3)
    L.run_train(dcfg, pc.model, dataclasses.replace(pc.train_loop, epochs=1, max_tokens=2000), tmp_path / "lm.pt",
                cpu, seed=0, resume=False, log=quiet)
    L.run_train_disc(dcfg, tmp_path / "lm.pt", dict(arch="unigram", word_bias="bucket"),
                     L.DiscTrainConfig(split="holdout"), dataclasses.replace(pc.disc_loop, max_tokens=1000),
                     tmp_path / "disc.pt", cpu, seed=0, log=quiet)
    corpus = L.load_corpus(data)
    lm_part, held_out = L.split_holdout(corpus.train, 0.3)
    classes = L.load_checkpoint(tmp_path / "disc.pt", "disc")["model"]["word_class"]
    by_count_in = lambda text: L.frequency_buckets(torch.bincount(text, minlength=len(corpus.vocab)), L.BIAS_EDGES)[0]
    assert torch.equal(classes, by_count_in(lm_part))
    assert not torch.equal(classes, by_count_in(held_out))
