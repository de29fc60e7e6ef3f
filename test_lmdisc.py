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
        L.ensure_data(tmp_path)


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
    m = L.LSTMLM(30, emsize=8, nhid=8, nlayers=2, dropout=0.0, tied=True)
    assert m.decoder.weight is m.encoder.weight
    untied = L.LSTMLM(30, emsize=8, nhid=8, nlayers=2, dropout=0.0, tied=False)
    assert untied.decoder.weight is not untied.encoder.weight
    with pytest.raises(L.LmdiscError, match="nhid == emsize"):
        L.LSTMLM(30, emsize=8, nhid=16, nlayers=1, dropout=0.0, tied=True)


def test_a_few_hundred_steps_lower_the_loss():
    torch.manual_seed(0)
    # a deterministic cyclic text: perfectly predictable, so the loss must fall far below log(V)
    data = L.batchify(torch.arange(4000) % 7, 8)
    m = L.LSTMLM(7, emsize=16, nhid=16, nlayers=1, dropout=0.0)
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
    disc = L.TemperatureDiscriminator(V).double()
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
    disc = L.TemperatureDiscriminator(V).double()
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
    disc = L.UnigramDiscriminator(8, "bucket", counts)
    assert disc.word_class.tolist() == [0, 1, 1, 2, 2, 4, 7, 10]       # BIAS_EDGES 1, 3, 10, 30, ..., 30k
    with torch.no_grad():
        disc.bias.copy_(torch.arange(11.0))
    torch.save({"config": disc.config, "model": disc.state_dict()}, tmp_path / "d.pt")
    saved = torch.load(tmp_path / "d.pt", weights_only=True)
    loaded = L.disc_from_config(saved["config"])                       # no counts: the checkpoint brings them
    loaded.load_state_dict(saved["model"])
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
    m = L.LSTMLM(len(corpus.vocab), emsize=8, nhid=8, nlayers=1, dropout=0.0)
    L.save_checkpoint(tmp_path / "m.pt", L.lm_checkpoint(m, corpus, {"seed": 1}, {"valid_ppl": 3.0}, str(d), 0.0))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["vocab"] == corpus.vocab and raw["result"]["valid_ppl"] == 3.0
    m2 = L.lm_from_checkpoint(L.load_checkpoint(tmp_path / "m.pt", "lm"), torch.device("cpu"))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert raw["fingerprint"] == L.weights_fingerprint(m2.state_dict())


def test_corrupt_wrong_kind_incomplete_or_code_running_checkpoint_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(L.LmdiscError, match="not a readable lmdisc checkpoint"):
        L.load_checkpoint(bad, "lm")
    torch.save({"kind": "disc"}, tmp_path / "disc.pt")
    with pytest.raises(L.LmdiscError, match="is a 'disc' checkpoint"):
        L.load_checkpoint(tmp_path / "disc.pt", "lm")
    torch.save({"kind": "lm", "model": {}}, tmp_path / "partial.pt")           # a key missing: no KeyError
    with pytest.raises(L.LmdiscError, match="lacks model_config"):
        L.load_checkpoint(tmp_path / "partial.pt", "lm")
    torch.save({"kind": "lm", "run": print}, tmp_path / "code.pt")            # a pickle naming a function
    with pytest.raises(L.LmdiscError, match="Unsupported global.*print"):       # refused, and the reason shown
        L.load_checkpoint(tmp_path / "code.pt", "lm")
    assert L.main(["generate", "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err


def test_concurrent_json_writers_do_not_collide(tmp_path):
    import threading
    errors = []

    def writer(k):
        try:
            for i in range(200):
                L.write_json(tmp_path / "x.json", {"writer": k, "i": i})
        except Exception as e:          # noqa: BLE001 - any error is the failure this test looks for
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads((tmp_path / "x.json").read_text())["i"] == 199


def test_cli_lists_exactly_its_subcommands():
    parser = L.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "train-disc", "finetune", "pipeline", "evaluate", "analyze",
                                "transfer-disc", "make-synthetic", "generate", "download"}
    out = subprocess.run([sys.executable, str(HERE / "lmdisc.py"), "--help"], capture_output=True, text=True).stdout
    assert "finetune --lr 1e-4" in out


def test_flags_come_from_the_config_fields_and_show_every_presets_value():
    help_text = L.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "tiny 1, small 14, medium 39" in " ".join(help_text.split())                # --epochs
    args = L.build_parser().parse_args(["finetune", "--lr", "1e-4,3e-4", "--preset", "small"])
    cfg = L.phase_config(args, "finetune")
    assert cfg.lr == (1e-4, 3e-4) and cfg.max_tokens == L.PRESETS["small"].finetune.max_tokens


# ------------------------------------------------------------------------------------- bad input ----------------

@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1"], "--lr must be positive"), (["train", "--lr", "0"], "--lr must be positive"),
    (["train", "--lr", "nan"], "--lr must be positive"), (["train-disc", "--lr", "inf"], "--lr must be positive"),
    (["finetune", "--lr", "1e-4,-1"], "--lr must be positive"),
    (["finetune", "--kl-weight", "-1"], "--kl-weight must be >= 0"),
    (["finetune", "--kl-weight", "nan"], "--kl-weight must be >= 0"),
    (["train", "--epochs", "0"], "--epochs must be between"), (["train", "--holdout", "0.9"], "--holdout must be"),
    (["generate", "--checkpoint", "nowhere.pt"], "does not exist"),
])
def test_bad_flags_stop_before_any_work_with_one_line(argv, message, capsys, tmp_path):
    assert L.main(argv + (["--run", str(tmp_path / "r")] if argv[0] != "generate" else [])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["train", "--seed", "-1"], ["train", "--epochs", "1.5"], ["finetune", "--lr", "x"]])
def test_malformed_numbers_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        L.main(argv)
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_card_command_with_nothing_trained_says_what_to_run(tmp_path):
    """`python lmdisc.py finetune --lr 1e-4` exactly as typed, in a fresh copy with no runs/: one line, exit 1."""
    (tmp_path / "lmdisc.py").write_text((HERE / "lmdisc.py").read_text())
    r = subprocess.run([sys.executable, "lmdisc.py", "finetune", "--lr", "1e-4"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"error: {tmp_path / 'runs' / 'tiny' / 'lm.pt'} does not exist yet: run " \
                               f"`python lmdisc.py train` first"


def test_unwritable_run_folder_is_found_before_training(tmp_path, capsys):
    data = write_splits(tmp_path / "d", "a b c\n" * 50, "a b\n" * 20, "c a\n" * 20)
    (tmp_path / "file").write_text("x")
    assert L.main(["train", "--data", str(data), "--run", str(tmp_path / "file")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


def test_data_problems_are_one_line_errors(tmp_path):
    empty = write_splits(tmp_path / "empty", "", "a\n", "a\n")
    with pytest.raises(L.LmdiscError, match="ptb.train.txt is empty"):
        L.load_corpus(empty)
    binary = write_splits(tmp_path / "bin", "a b\n", "a\n", "a\n")
    (binary / "ptb.train.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(L.LmdiscError, match="not UTF-8"):
        L.load_corpus(binary)
    bom = write_splits(tmp_path / "bom", "a b\n", "a\n", "b\n")
    (bom / "ptb.train.txt").write_bytes("\ufeffa b\n".encode())
    assert L.load_corpus(bom).vocab == ["a", "b", "<eos>"]                     # the byte-order mark is no word


def test_download_over_a_tampered_file_says_so(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("tampered\n")
    with pytest.raises(L.LmdiscError, match="existing .*ptb.train.txt fails its sha256 check"):
        L.download_ptb(tmp_path, base_url=(tmp_path / "nowhere").as_uri() + "/", log=quiet)


def test_recency_discriminator_against_a_hand_written_float64_form(monkeypatch):
    """s of the recency design, over two batches in a row (the window is carried between them), against
    a(c) log q0 + s0(c) + b_w + r_seen [n > 0] + r_count log(1 + n) with n counted by walking the text word by
    word. A window of 4 words makes both the "not yet 4 words" start and words falling out of it happen."""
    monkeypatch.setattr(L, "RECENCY_WINDOW", 4)
    g = torch.Generator().manual_seed(8)
    V, T, B = 6, 5, 2
    disc = L.RecencyDiscriminator(V).double()
    with torch.no_grad():
        for p in disc.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    text = torch.randint(V, (2 * T, B), generator=g)
    log_q0 = random_log_probs(2 * T, B, V, generator=g)
    hidden, got = disc.init_hidden(B), []
    for half in (slice(0, T), slice(T, 2 * T)):
        s, hidden = disc(text[half], hidden, log_q0[half])
        got.append(s)
    got = torch.cat(got)
    a0, a_h, a_m = disc.gate.bias[0].item(), *disc.gate.weight[0].tolist()
    c0, c_h, c_m = disc.gate.bias[1].item(), *disc.gate.weight[1].tolist()
    r_seen, r_count = disc.recency.tolist()
    for t in range(2 * T):
        for j in range(B):
            lq = log_q0[t, j].tolist()
            entropy, top = -sum(math.exp(v) * v for v in lq), max(lq)
            a, s0 = a0 + a_h * entropy + a_m * top, c0 + c_h * entropy + c_m * top
            recent = text[max(0, t - 3): t + 1, j].tolist()          # the last 4 words read, x_t included
            for w in range(V):
                n = recent.count(w)
                want = a * lq[w] + s0 + disc.bias[w].item() + r_seen * (n > 0) + r_count * math.log1p(n)
                assert got[t, j, w].item() == pytest.approx(want, abs=1e-9)


def test_validation_halves_never_let_phase_2_or_3_validate_on_the_discriminators_text():
    valid = torch.arange(11)
    for split, learns, checks in (("valid-a", range(0, 5), range(5, 11)), ("valid-b", range(5, 11), range(0, 5))):
        text = L.disc_text(split, torch.arange(100, 120), torch.tensor([], dtype=torch.long), valid)
        other, name = L.validation_text(split, valid)
        assert text.tolist() == list(learns) and other.tolist() == list(checks) and "half of valid" in name
    assert L.validation_text("train", valid)[0] is valid and L.validation_text("holdout", valid)[1] == "valid"


# ------------------------------------------------------------------- the strongest baseline (section 15) ------

class TableLM(torch.nn.Module):
    """A bigram "LM" with fixed logits: q(.|c) = softmax(table[previous word]). No state to carry."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def init_hidden(self, bsz):
        return ()

    def forward(self, x, hidden):
        return self.table[x], hidden


def test_temperature_moments_are_the_derivatives_of_the_nll():
    """NLL'(beta) and NLL''(beta) of section 15 against autograd of a float64 NLL written out by hand."""
    g = torch.Generator().manual_seed(3)
    log_q, y = random_log_probs(7, 5, 12, generator=g), torch.randint(12, (7, 5), generator=g)
    beta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    nll = lambda b: sum(-b * log_q[i, j, y[i, j]] + torch.logsumexp(b * log_q[i, j], 0)
                        for i in range(7) for j in range(5))
    d1, = torch.autograd.grad(nll(beta), beta, create_graph=True)
    d2, = torch.autograd.grad(d1, beta)
    got = L.temperature_moments(log_q, y, 0.8)
    for a, b in zip(got, (nll(beta), d1, d2)):
        assert float(a) == pytest.approx(b.item(), rel=1e-9)


def test_temperature_scaling_recovers_a_known_temperature():
    """Text drawn from q^0.6 (normalised) of a fixed bigram model q: fitting beta on it must find 0.6."""
    g = torch.Generator().manual_seed(5)
    V, n = 20, 60_000
    table = torch.randn(V, V, generator=g) * 2
    true = torch.softmax(0.6 * torch.log_softmax(table, -1), -1)
    words = [0]
    for u in torch.rand(n, generator=g).tolist():          # a Markov chain from the true, flatter distribution
        words.append(min(int(torch.searchsorted(true[words[-1]].cumsum(0), torch.tensor(u))), V - 1))
    beta = L.fit_temperature(TableLM(table), L.batchify(torch.tensor(words), 10))
    assert beta == pytest.approx(0.6, abs=0.02)


def test_sentences_of_targets_follow_the_stream_order():
    """Every target's sentence number, as test_log_probs orders the targets, against a token-by-token walk."""
    eos = 0
    tokens = torch.tensor([3, 4, 0, 5, 0, 6, 7, 8, 0, 9, 0, 2, 2, 0, 1, 0, 4, 4, 0, 0, 5, 6])
    source = L.batchify(tokens, 3)
    got = L.sentence_of_targets(tokens, eos, 3)
    sentence_at = [sum(int(t == eos) for t in tokens[:k]) for k in range(len(tokens))]
    rows = source.size(0)
    # source[r, j] is token j * rows + r; the targets in stream order are source[1:] read row by row
    want = [sentence_at[j * rows + r] for r in range(1, rows) for j in range(3)]
    assert got.tolist() == want


def test_paired_bootstrap_is_exact_for_a_constant_gap_and_zero_for_a_model_against_itself():
    g = torch.Generator().manual_seed(2)
    nll = torch.rand(500, generator=g, dtype=torch.float64) * 6
    sentence = torch.arange(500) // 7
    same = L.paired_bootstrap(nll, nll, sentence)
    assert same["change"] == 0 and same["low"] == 0 and same["high"] == 0
    # every token 0.01 nats better: the perplexity ratio is exp(-0.01) whatever sentences are drawn
    gap = L.paired_bootstrap(nll - 0.01, nll, sentence)
    for k in ("change", "low", "high"):
        assert gap[k] == pytest.approx(math.expm1(-0.01), rel=1e-9)
    # noise around the same model: the interval holds the point estimate
    noisy = L.paired_bootstrap(nll + 0.1 * torch.randn(500, generator=g, dtype=torch.float64), nll, sentence)
    assert noisy["low"] < noisy["change"] < noisy["high"] and noisy["sentences"] == 72


# ------------------------------------------------------------------------- end to end on a synthetic corpus ------

def quiet(_):
    pass


LOOP = dict(bptt=20, batch_size=10, log_interval=5, clip=0.25, eval_tokens=20_000)
TRAIN = L.TrainConfig(emsize=32, nhid=32, nlayers=1, dropout=0.1, epochs=2, lr=10.0, **LOOP)
DISC = L.DiscTrainConfig(emsize=32, nhid=32, dropout=0.3, lr=1e-2, eval_every=40, **LOOP)
FINETUNE = L.FinetuneConfig(lr=(1e-3,), max_tokens=4000, eval_every=10, **LOOP)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    L.make_synthetic(root / "data", n_words=60, tokens=(30_000, 4_000, 4_000), seed=1, log=quiet)
    run = root / "run"
    L.run_train(run, TRAIN, root / "data", 0, CPU, log=quiet)
    L.run_train_disc(run, DISC, 0, CPU, log=quiet)
    ft = L.run_finetune(run, run / "finetune", FINETUNE, run / "disc.pt", 0, CPU, log=quiet)
    an = L.run_analyze(run, run / "finetune", log=quiet)
    return root, ft, an


def test_finetune_writes_a_table_with_five_rows(synthetic_run):
    root, ft, _ = synthetic_run
    rows = ft["table"].splitlines()[2:]
    names = ["base q0", "rescored p_hat = q0 exp(s) / Z", "CE-only control, adam", "CE-only control, temperature",
             "CE + 1 KL(q || p_hat)"]
    assert len(rows) == 5 and all(row.startswith(f"| {name}") for row, name in zip(rows, names))
    assert json.loads((root / "run" / "finetune" / "finetune.json").read_text())["table"] == ft["table"]
    assert all(math.isfinite(ft["arms"][a]["test_ppl"]) for a in ("ce", "kl"))


def test_synthetic_disc_beats_chance_and_estimates_true_kl(synthetic_run):
    root, _, _ = synthetic_run
    d = json.loads((root / "run" / "disc.json").read_text())["valid_disc"]
    assert d["L_D"] < L.CHANCE_L_D - 0.01
    # the estimated reverse KL starts at 0 (s = 0) and must move toward the true, positive value without
    # overshooting it by much
    assert d["kl_q0_p_true"] > 0.05
    assert 0.1 * d["kl_q0_p_true"] < d["kl_q0_phat"] < 1.5 * d["kl_q0_p_true"]


def test_analyze_buckets_add_up_to_test_tokens(synthetic_run):
    root, _, an = synthetic_run
    corpus = L.load_corpus(root / "data")
    rows = [line.split(",") for line in (root / "run" / "finetune" / "rare_words.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    n_targets = L.batchify(corpus.test, L.EVAL_BATCH_SIZE).numel() - L.EVAL_BATCH_SIZE
    for grouping in ("frequency", "rank", "recency"):
        assert sum(int(r[header.index("tokens")]) for r in body if r[0] == grouping) == n_targets
    assert an["test_tokens"] == n_targets


def test_recently_seen_against_a_brute_force_look_back():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(30, (400,), generator=g)
    want = [int(tokens[k]) in tokens[max(0, k - 25): k].tolist() for k in range(400)]
    assert L.recently_seen(tokens, 25).tolist() == want


def test_finetune_refuses_a_discriminator_of_another_lm(synthetic_run, tmp_path):
    root, _, _ = synthetic_run
    ck = L.load_checkpoint(root / "run" / "lm.pt", "lm")
    ck["model"] = {k: v + 0.01 for k, v in ck["model"].items()}
    ck["fingerprint"] = L.weights_fingerprint(ck["model"])
    L.save_checkpoint(tmp_path / "lm.pt", ck)
    with pytest.raises(L.LmdiscError, match="belongs to an LM with weights .* only holds for its own q0$"):
        L.run_finetune(tmp_path, tmp_path / "ft", FINETUNE, root / "run" / "disc.pt", 0, CPU, log=quiet)


def test_a_finished_phase_is_up_to_date_and_other_settings_are_refused(synthetic_run):
    root, ft, _ = synthetic_run
    run, lines = root / "run", []
    L.run_train(run, TRAIN, root / "data", 0, CPU, log=lines.append)
    L.run_train_disc(run, DISC, 0, CPU, log=lines.append)
    again = L.run_finetune(run, run / "finetune", FINETUNE, run / "disc.pt", 0, CPU, log=lines.append)
    assert sum("is up to date" in line for line in lines) == 4 and again["table"] == ft["table"]
    assert not any("step" in line and "ms/batch" in line for line in lines)           # nothing was trained again
    with pytest.raises(L.LmdiscError, match=r"made with other settings \(seed 0 there, 2 here\)"):
        L.run_train(run, TRAIN, root / "data", 2, CPU, log=quiet)
    with pytest.raises(L.LmdiscError, match="config.lr 0.01 there, 0.02 here"):
        L.run_train_disc(run, dataclasses.replace(DISC, lr=0.02), 0, CPU, log=quiet)


def test_a_fine_tune_with_other_settings_gets_its_own_folder(synthetic_run, capsys):
    """The card's --lr on a run made by other settings: a new folder named after the lr; the old one untouched."""
    run = synthetic_run[0] / "run"
    before = (run / "finetune" / "finetune.json").read_text()
    assert L.main(["finetune", "--run", str(run), "--lr", "3e-3", "--arms", "ce", "--seed", "0"]) == 0
    assert (run / "finetune-lr-0.003" / "ce-lr0.003.pt").exists()
    assert (run / "finetune" / "finetune.json").read_text() == before


def test_analyze_finds_the_discriminator_from_another_working_directory(synthetic_run, tmp_path, monkeypatch):
    """finetune.json names its discriminator by an absolute path: a run made with relative paths (the README's
    commands) can be analysed from anywhere."""
    root = synthetic_run[0]
    monkeypatch.chdir(root)
    L.run_finetune(Path("run"), Path("run/finetune-relative"), FINETUNE, Path("run/disc.pt"), 0, CPU, log=quiet)
    monkeypatch.chdir(tmp_path)
    assert L.run_analyze(root / "run", root / "run" / "finetune-relative", log=quiet)["test_tokens"] > 0


def test_evaluate_with_a_discriminator_reads_whole_splits(synthetic_run, capsys):
    run = synthetic_run[0] / "run"
    assert L.main(["evaluate", "--checkpoint", str(run / "lm.pt"), "--disc", str(run / "disc.pt")]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("evaluate |")]
    assert [l.split(" | ")[1].split(",")[0] for l in lines] == ["valid", "test"] and all("L_D" in l for l in lines)


def test_the_seed_of_the_runs_lm_is_no_variant_another_seed_is(synthetic_run):
    """`pipeline --seed 2` then `finetune --seed 2`: one fine-tune, not two. The fixture's LM has seed 0."""
    run = synthetic_run[0] / "run"
    args = lambda seed: L.build_parser().parse_args(["finetune", "--run", str(run), "--seed", str(seed)])
    cfg = L.PRESETS["tiny"].finetune
    assert L.output_name("finetune", args(0), cfg) == "finetune"
    assert L.output_name("finetune", args(L.DEFAULT_SEED), cfg) == f"finetune-seed-{L.DEFAULT_SEED}"
    assert L.output_name("disc", args(7), L.PRESETS["tiny"].disc) == "disc-seed-7"


def test_both_arms_see_identical_batches_and_dropout_masks(synthetic_run, tmp_path, monkeypatch):
    root, _, _ = synthetic_run
    seen = {0.0: [], 1.0: []}                    # per arm (kl weight): the batches and the masks, in order
    arm = [None]
    original_loss, original_dropout = L.FinetuneTask.loss, torch.nn.Dropout.forward

    def loss(self, x, y):
        arm[0] = self.kl_weight
        seen[arm[0]].append(("batch", x.clone()))
        return original_loss(self, x, y)

    def dropout(self, inp):
        out = original_dropout(self, inp)
        if self.training and arm[0] is not None:  # masks drawn in training mode (eval-mode passes draw none)
            seen[arm[0]].append(("mask", out == 0))
        return out
    original_trap = L.kl_on_both_passes

    def trap(*args, **kwargs):                    # the KL arm's trap measurement draws masks on a forked RNG
        arm[0] = None
        return original_trap(*args, **kwargs)
    monkeypatch.setattr(L.FinetuneTask, "loss", loss)
    monkeypatch.setattr(torch.nn.Dropout, "forward", dropout)
    monkeypatch.setattr(L, "kl_on_both_passes", trap)
    L.run_finetune(root / "run", tmp_path / "ft", FINETUNE, root / "run" / "disc.pt", 0, CPU, log=quiet)
    ce, kl = seen[0.0], seen[1.0]
    assert len(ce) == len(kl) > 20 and sum(kind == "mask" for kind, _ in ce) > 10
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(ce, kl))


def test_kl_on_the_dropout_pass_exceeds_the_dropout_free_pass(synthetic_run):
    """The dropout trap, measured on the same weights: q = q0 at step 0, so the dropout-free pass gives exactly
    KL(q0 || p_hat), while the pass with dropout reads a noisier q and a larger KL."""
    root, _, _ = synthetic_run
    corpus = L.load_corpus(root / "data")
    lm_ck = L.load_checkpoint(root / "run" / "lm.pt", "lm")
    q0 = L.frozen_lm(lm_ck, corpus, CPU)
    disc = L.frozen_disc(L.load_checkpoint(root / "run" / "disc.pt", "disc"), "disc.pt", lm_ck, CPU)
    q = L.LSTMLM(**lm_ck["model_config"])
    q.load_state_dict(lm_ck["model"])
    task = L.FinetuneTask(q, q0, disc, 1.0, "eval", None, 20)
    data = L.batchify(corpus.train, 10)
    on_dropout, on_eval = L.kl_on_both_passes(task, data, 20, batches=20)
    assert on_dropout > on_eval * 1.05 and on_eval > 0


def interrupt_at(step: int, lines: list):
    """A log function that sends Ctrl-C (SIGINT) to this process when the progress line of `step` is printed."""
    import os
    import signal

    def log(line):
        lines.append(line)
        if f"| step {step:>6}/" in line:
            os.kill(os.getpid(), signal.SIGINT)
    return log


@pytest.mark.parametrize("where", ["mid-epoch", "during validation"])
def test_interrupted_then_resumed_train_ends_with_the_same_weights(tmp_path, monkeypatch, where):
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(6_000, 1_000, 1_000), seed=3, log=quiet)
    cfg = dataclasses.replace(TRAIN, eval_every=7)
    whole = L.run_train(tmp_path / "a", cfg, tmp_path / "data", 0, CPU, log=quiet)
    lines = []
    if where == "mid-epoch":
        log = interrupt_at(10, lines)                # mid-epoch, between two validations, hidden state carried
    else:
        import os
        import signal
        original, calls = L.LMTask.validate, []

        def validate(self):                           # Ctrl-C arrives while the second validation runs
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return original(self)
        monkeypatch.setattr(L.LMTask, "validate", validate)
        log = lines.append
    with pytest.raises(L.Interrupted, match="run the same command again"):
        L.run_train(tmp_path / "b", cfg, tmp_path / "data", 0, CPU, log=log)
    assert not (tmp_path / "b" / "lm.pt").exists() and (tmp_path / "b" / "lm.resume.pt").exists()
    monkeypatch.undo()
    lines = []
    resumed = L.run_train(tmp_path / "b", cfg, tmp_path / "data", 0, CPU, log=lines.append)
    assert any("resuming from" in line for line in lines)
    assert resumed["valid_ppl"] == whole["valid_ppl"] and resumed["test_ppl"] == whole["test_ppl"]
    assert L.load_checkpoint(tmp_path / "b" / "lm.pt", "lm")["fingerprint"] == \
        L.load_checkpoint(tmp_path / "a" / "lm.pt", "lm")["fingerprint"]
    assert not (tmp_path / "b" / "lm.resume.pt").exists()


def test_cpu_training_is_deterministic(tmp_path):
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(5_000, 1_000, 1_000), seed=2, log=quiet)
    cfg = dataclasses.replace(TRAIN, epochs=1)
    a = L.run_train(tmp_path / "a", cfg, tmp_path / "data", 5, CPU, log=quiet)
    b = L.run_train(tmp_path / "b", cfg, tmp_path / "data", 5, CPU, log=quiet)
    assert a["valid_ppl"] == b["valid_ppl"] and a["test_ppl"] == b["test_ppl"]
    assert L.load_checkpoint(tmp_path / "a" / "lm.pt", "lm")["fingerprint"] == \
        L.load_checkpoint(tmp_path / "b" / "lm.pt", "lm")["fingerprint"]


def test_bucket_classes_are_counted_on_the_lms_text_not_the_discriminators(synthetic_run, tmp_path):
    """Counted on the held-out slice the discriminator learns on, "count 0" would mean "never a real word in this
    text", a leak it learns (a measured run did: valid L_D above chance). The classes must come from the LM's text."""
    data = synthetic_run[0] / "data"
    L.run_train(tmp_path, dataclasses.replace(TRAIN, epochs=1, max_tokens=2000, holdout=0.3), data, 0, CPU, log=quiet)
    L.run_train_disc(tmp_path, dataclasses.replace(DISC, arch="unigram", word_bias="bucket", split="holdout",
                                                   max_tokens=1000), 0, CPU, log=quiet)
    corpus = L.load_corpus(data)
    lm_part, held_out = L.split_holdout(corpus.train, 0.3)
    classes = L.load_checkpoint(tmp_path / "disc.pt", "disc")["model"]["word_class"]
    by_count_in = lambda text: L.frequency_buckets(torch.bincount(text, minlength=len(corpus.vocab)), L.BIAS_EDGES)[0]
    assert torch.equal(classes, by_count_in(lm_part))
    assert not torch.equal(classes, by_count_in(held_out))


def test_analyze_memory_stays_bounded_on_a_large_vocabulary(tmp_path):
    """analyze once grew to gigabytes (one small tensor kept per batch while large logits came and went fragments
    the heap): on this very setup, 10,000 words and 60,000 test tokens, the version before the fix added 6.2 GB to
    the process's peak resident memory, the fixed one 0.17 GB."""
    script = f"""
import resource, json, torch, lmdisc as L
from pathlib import Path
torch.set_num_threads(1)
root = Path({str(tmp_path)!r})
(root / "data").mkdir()
words = [f"w{{i}}" for i in range(9999)]
line = lambda: " ".join(words[j] for j in torch.randint(0, 9999, (20,)).tolist())
text = lambda n: chr(10).join(line() for _ in range(n // 20))
for split, body in (("train", " ".join(words)), ("valid", text(2_000)), ("test", text(60_000))):
    (root / "data" / f"ptb.{{split}}.txt").write_text(body + chr(10))
corpus = L.load_corpus(root / "data")
run = root / "run"
for name in ("lm.pt", "finetune/ce.pt", "finetune/kl.pt"):
    m = L.LSTMLM(len(corpus.vocab), 64, 64, 1, 0.0)
    L.save_checkpoint(run / name, L.lm_checkpoint(m, corpus, {{}}, {{}}, str(root / "data"), 0.0))
lm_ck = L.load_checkpoint(run / "lm.pt", "lm")
d = L.UnigramDiscriminator(len(corpus.vocab))
L.save_checkpoint(run / "disc.pt", {{"kind": "disc", "format": 2, "disc_config": d.config, "model": d.state_dict(),
    "fingerprint": "x", "lm_fingerprint": lm_ck["fingerprint"], "vocab_hash": lm_ck["vocab_hash"], "key": {{}},
    "result": {{}}}})
(run / "finetune" / "finetune.json").write_text(json.dumps({{"key": {{"config": {{"eval_tokens": 0}}}},
    "disc": str(run / "disc.pt"), "arms": {{"ce": {{"checkpoint": "ce.pt"}}, "kl": {{"checkpoint": "kl.pt"}}}}}}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
L.run_analyze(run, run / "finetune", log=lambda s: None)
print("peak-kb", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split("peak-kb")[1].split())
    assert after - before < 400_000, (before, after)             # kB: analyze itself adds less than 0.4 GB


def test_a_fine_tune_refuses_to_overwrite_a_run_made_from_another_discriminator(synthetic_run, tmp_path):
    """Same folder, another discriminator: the arms' key (which holds the discriminator's fingerprint) differs."""
    root = synthetic_run[0]
    run = root / "run"
    L.run_train_disc(run, dataclasses.replace(DISC, arch="unigram"), 0, CPU, name="disc-unigram", log=quiet)
    with pytest.raises(L.LmdiscError, match="made with other settings"):
        L.run_finetune(run, run / "finetune", FINETUNE, run / "disc-unigram.pt", 0, CPU, log=quiet)


def test_a_diverged_training_is_an_error_not_a_result(tmp_path):
    L.make_synthetic(tmp_path / "data", n_words=30, tokens=(5_000, 1_000, 1_000), seed=2, log=quiet)
    with pytest.raises(L.LmdiscError, match="try a lower --lr"):
        L.run_train(tmp_path / "run", dataclasses.replace(TRAIN, lr=1e6, epochs=1), tmp_path / "data", 0, CPU,
                    log=quiet)
    assert not (tmp_path / "run" / "lm.pt").exists()


def test_temperature_profile_reports_a_at_low_middle_and_high_entropy():
    """With a_m = 0, a(c) = a0 + a_H H(c) exactly, so in each third of the contexts mean a = a0 + a_H * mean H."""
    torch.manual_seed(0)
    lm = L.LSTMLM(40, 8, 8, 1, 0.0).eval()
    disc = L.TemperatureDiscriminator(40)
    with torch.no_grad():
        disc.gate.weight.copy_(torch.tensor([[-0.3, 0.0], [0.0, 0.0]]))
        disc.gate.bias.copy_(torch.tensor([0.5, 0.0]))
    source = L.batchify(torch.randint(0, 40, (3000,)), 10)
    profile = L.temperature_profile(lm, disc, source, 20)
    (h1, a1), (h2, a2), (h3, a3) = profile["a_by_entropy_third"]
    assert h1 < h2 < h3                                              # thirds by rising entropy
    for h, a in profile["a_by_entropy_third"]:
        assert a == pytest.approx(0.5 - 0.3 * h, abs=1e-5)
    assert a1 > a2 > a3 and "least sure" in profile["profile"]


def test_sampled_negatives_gradient_spread_is_measured_and_its_mean_tends_to_the_exact_gradient(synthetic_run):
    root, _, _ = synthetic_run
    corpus = L.load_corpus(root / "data")
    lm_ck = L.load_checkpoint(root / "run" / "lm.pt", "lm")
    lm = L.frozen_lm(lm_ck, corpus, CPU)
    disc = L.frozen_disc(L.load_checkpoint(root / "run" / "disc.pt", "disc"), "disc.pt", lm_ck, CPU)
    task = L.DiscTask(lm, disc, "sample", None, 20, None)
    noise = L.negatives_gradient_noise(task, L.batchify(corpus.train, 10), 20, draws=50)
    # one draw per position is noisy; the mean of 50 draws is about sqrt(50) ~ 7 times closer to the exact gradient
    assert noise["relative_spread"] > 0.1
    assert noise["relative_bias_of_mean"] < 0.3 * noise["relative_spread"]


def test_transfer_disc_moves_a_small_discriminator_to_another_lm_and_refuses_the_others(synthetic_run, tmp_path):
    """Route 2: a temperature discriminator fitted on the slice a 70% LM held out, applied to the LM that read it
    all. Its fitted numbers stay; its count classes are recounted on the new LM's text; s on the new q0 matches a
    float64 form written from the source's numbers; phase 3's fingerprint check accepts the moved checkpoint and
    still refuses the source. The LSTM discriminator, and per-word biases, do not move."""
    root = synthetic_run[0]
    data, held, full = root / "data", tmp_path / "held", tmp_path / "full"
    L.run_train(held, dataclasses.replace(TRAIN, epochs=1, max_tokens=2000, holdout=0.3), data, 0, CPU, log=quiet)
    L.run_train_disc(held, dataclasses.replace(DISC, arch="temperature", word_bias="bucket", split="holdout",
                                               max_tokens=2000), 0, CPU, log=quiet)
    full.mkdir()
    (full / "lm.pt").write_bytes((root / "run" / "lm.pt").read_bytes())      # the LM that read all the text
    result = L.run_transfer_disc(held / "disc.pt", full, CPU, log=quiet)
    src, lm_ck = L.load_checkpoint(held / "disc.pt", "disc"), L.load_checkpoint(full / "lm.pt", "lm")
    moved = L.load_checkpoint(full / "disc-from-held.pt", "disc")
    assert moved["lm_fingerprint"] == lm_ck["fingerprint"] != src["lm_fingerprint"]
    for name in ("gate.weight", "gate.bias", "bias"):
        assert torch.equal(moved["model"][name], src["model"][name])
    corpus = L.load_corpus(data)
    classes = L.frequency_buckets(torch.bincount(corpus.train, minlength=len(corpus.vocab)), L.BIAS_EDGES)[0]
    assert torch.equal(moved["model"]["word_class"], classes)
    assert result["words_moved"] == int((src["model"]["word_class"] != classes).sum()) > 0
    # s on the new q0, by hand in float64 from the source's numbers and the new classes
    lm, disc = L.frozen_lm(lm_ck, corpus, CPU), L.frozen_disc(moved, full / "disc-from-held.pt", lm_ck, CPU)
    x = L.batchify(corpus.valid, 4)[:20]
    log_q0 = torch.log_softmax(lm(x, lm.init_hidden(4))[0], -1).double()
    (w_h, w_m), (v_h, v_m) = src["model"]["gate.weight"].double().tolist()
    (c_a, c_s), b = src["model"]["gate.bias"].double().tolist(), src["model"]["bias"].double()
    entropy, top = -(log_q0.exp() * log_q0).sum(-1, keepdim=True), log_q0.max(-1, keepdim=True).values
    expected = (c_a + w_h * entropy + w_m * top) * log_q0 + (c_s + v_h * entropy + v_m * top) + b[classes]
    torch.testing.assert_close(disc(x, (), log_q0.float())[0].double(), expected, atol=1e-4, rtol=1e-4)
    assert result["valid_disc"]["L_D"] == pytest.approx(L.disc_metrics(lm, disc, L.eval_data(corpus.valid, CPU, 20_000),
                                                                       20)["L_D"])
    with pytest.raises(L.LmdiscError, match="belongs to an LM with weights.*transfer-disc"):
        L.frozen_disc(src, held / "disc.pt", lm_ck, CPU)
    assert L.run_transfer_disc(held / "disc.pt", full, CPU, log=quiet) == result               # up to date
    with pytest.raises(L.LmdiscError, match="--arch lstm .* holds what its own q0 got wrong.*train-disc --run"):
        L.run_transfer_disc(root / "run" / "disc.pt", full, CPU, log=quiet)                   # the paper's LSTM
    with pytest.raises(L.LmdiscError, match="already belongs to"):
        L.run_transfer_disc(held / "disc.pt", held, CPU, log=quiet)
    with pytest.raises(L.LmdiscError, match="was itself moved, from .*held.disc.pt: move that one"):
        L.run_transfer_disc(full / "disc-from-held.pt", held, CPU, log=quiet)
    with pytest.raises(L.LmdiscError, match="is a folder: pass the checkpoint file"):
        L.run_transfer_disc(held, full, CPU, log=quiet)
    assert not L.transferable({"arch": "temperature", "word_bias": "word"})            # b_w fitted word by word
