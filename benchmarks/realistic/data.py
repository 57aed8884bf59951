"""Data of the realistic suite, all found on the machine (nothing is downloaded).

- Text: Python's own `argparse.py` source, read as characters; the 63 most frequent characters get their
  own token and the rest share token 63 (a vocabulary of 64, so ln(64) = 4.16 is the loss of a uniform guess).
- Digits: scikit-learn's `load_digits` (1797 8x8 images shipped with scikit-learn), scaled to [0, 1].
"""
from __future__ import annotations

import argparse
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

VOCAB = 64


@lru_cache(maxsize=1)
def text_tokens() -> torch.Tensor:
    """The character tokens of argparse.py (int64, ~100k tokens)."""
    text = Path(argparse.__file__).read_text(encoding="utf-8")
    ranked = sorted(Counter(text).items(), key=lambda kv: (-kv[1], kv[0]))[:VOCAB - 1]
    index = {ch: i for i, (ch, _) in enumerate(ranked)}
    return torch.tensor([index.get(ch, VOCAB - 1) for ch in text], dtype=torch.int64)


def lm_windows(seed: int, batch: int = 16, block: int = 32) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """step -> (x, y): random windows of the text, y shifted by one (the minibatch order follows `seed`)."""
    data = text_tokens()
    g = torch.Generator().manual_seed(1000 + seed)

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        idx = start[:, None] + torch.arange(block + 1)
        w = data[idx]
        return w[:, :-1], w[:, 1:]
    return get


def lm_streams(batch: int = 16, bptt: int = 32) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """step -> (x, y) for truncated BPTT: the text cut into `batch` parallel streams, read `bptt` tokens at a
    time in order, so the hidden state carried from one chunk to the next belongs to the same stream."""
    data = text_tokens()
    per = (len(data) - 1) // batch
    streams = data[:per * batch + 1]
    x_all = streams[:-1].view(batch, per)
    y_all = streams[1:].view(batch, per)
    chunks = per // bptt

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (step % chunks) * bptt
        return x_all[:, i:i + bptt], y_all[:, i:i + bptt]
    return get


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: images float32 [1797, 1, 8, 8] in [0, 1], labels int64 [1797]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def digit_batches(seed: int, batch: int = 64, nan_at: Optional[int] = None
                  ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """step -> (x, y): random minibatches of the digits; at step `nan_at` one pixel of the batch is NaN
    (a corrupt record, as a broken loader or a division by zero in preprocessing leaves one)."""
    x, y = digits()
    g = torch.Generator().manual_seed(2000 + seed)

    def get(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx].clone()
        if step == nan_at:
            xb[0, 0, 3, 3] = float("nan")
        return xb, y[idx]
    return get
