"""An LSTM language model and its synthetic text: a repeated 8-token pattern from a random phase, 10% of
tokens replaced by noise. Shared by tests/test_converged.py and tests/test_early_explosion.py.
"""
from __future__ import annotations

import torch
from torch import nn

V = 16  # vocabulary size
_PATTERN = torch.tensor([1, 5, 2, 7, 3, 9, 4, 11])


class LSTMLM(nn.Module):
    def __init__(self, emb: int, hidden: int):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(V, emb), nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, V)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def pattern_batch(g: torch.Generator, n: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets), each [n, t]: the pattern from a random phase, 10% noise tokens."""
    seq = _PATTERN[(torch.randint(0, 8, (n,), generator=g)[:, None] + torch.arange(t + 1)[None]) % 8]
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, V, seq.shape, generator=g), seq)
    return seq[:, :-1], seq[:, 1:]
