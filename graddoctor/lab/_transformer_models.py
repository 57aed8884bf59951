"""The transformer experiment's task and models: a Markov-chain language model, an `nn.TransformerEncoder` LM
(post-LN or pre-LN), and a nanoGPT-style GPT whose attention can LayerNorm q and k per head (QK-norm).

The task: sequences from a fixed random Markov chain over `VOCAB` tokens, each token followed by one of
three likely successors. Its best possible loss is the chain's entropy rate (computed in float64 by
`entropy_rate`); a model that learns only token frequencies stays near the stationary distribution's entropy.
"""
from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

VOCAB, SEQ = 16, 16
CHAIN_SEED = 1234


def chain() -> Tensor:
    """The transition matrix [VOCAB, VOCAB] (float64): each token has 3 likely successors, and 0.02 on all."""
    g = torch.Generator().manual_seed(CHAIN_SEED)
    p = torch.full((VOCAB, VOCAB), 0.02, dtype=torch.float64)
    for a in range(VOCAB):
        p[a, torch.randperm(VOCAB, generator=g)[:3]] += torch.tensor([3.0, 1.5, 1.0], dtype=torch.float64)
    return p / p.sum(1, keepdim=True)


def stationary(p: np.ndarray) -> np.ndarray:
    """The chain's stationary distribution (float64): the left eigenvector of eigenvalue 1."""
    w, v = np.linalg.eig(p.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return pi / pi.sum()


def entropy_rate(p: np.ndarray) -> float:
    """The lowest cross-entropy a next-token predictor can reach (nats): sum_a pi_a H(p[a])."""
    return float(stationary(p) @ -(p * np.log(p)).sum(1))


def unigram_entropy(p: np.ndarray) -> float:
    """The loss of predicting the stationary token frequencies, ignoring the previous token (nats)."""
    pi = stationary(p)
    return float(-(pi * np.log(pi)).sum())


def sample(p: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """n sequences of SEQ + 1 tokens from the chain (first token uniform): (inputs [n, SEQ], next tokens [n, SEQ])."""
    x = torch.empty(n, SEQ + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
    pf = p.float()
    for t in range(SEQ):
        x[:, t + 1] = torch.multinomial(pf[x[:, t]], 1, generator=gen)[:, 0]
    return x[:, :-1], x[:, 1:]


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class EncoderLM(nn.Module):
    """A causal LM on `nn.TransformerEncoder`: post-LN (`norm_first=False`) or pre-LN with a final LayerNorm."""

    def __init__(self, layers: int, d: int, norm_first: bool, heads: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d) if norm_first else None,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(x) + self.pos, mask=self.mask, is_causal=True))


class Attention(nn.Module):
    """Causal self-attention as in nanoGPT; `qk_norm` LayerNorms q and k per head (Dehghani et al. 2023,
    Wortsman et al. 2023). `max_logit` holds the largest |q.k|/sqrt(d_head) of the last forward pass."""

    def __init__(self, d: int, heads: int, qk_norm: bool):
        super().__init__()
        # nanoGPT's names (c_attn, n_head; q_norm and k_norm for QK-norm): watch finds the attention by them
        self.n_head, self.hd = heads, d // heads
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.qk_norm = qk_norm
        if qk_norm:  # without them there are no q/k norm children: watch reads q and k from c_attn's output
            self.q_norm, self.k_norm = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)
        self.causal: Tensor
        self.register_buffer("causal", torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), persistent=False)
        self.max_logit = 0.0

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, self.hd).transpose(1, 2) for z in self.c_attn(x).split(d, dim=2))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        causal = self.causal[:t, :t]
        # measured on the positions attention can see (the masked ones are set to -inf below)
        self.max_logit = float(logits.detach().masked_fill(~causal, 0.0).abs().amax())
        att = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, heads: int, qk_norm: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A nanoGPT-style decoder: token and position embeddings, pre-LN blocks, final LayerNorm, linear head."""

    def __init__(self, layers: int, d: int, heads: int, qk_norm: bool):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList([Block(d, heads, qk_norm) for _ in range(layers)])
        self.attentions = [cast(Attention, b.attn) for b in self.blocks]
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), zero biases
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias") and "norm" not in name and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, x: Tensor) -> Tensor:
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def max_logit(self) -> float:
        """The largest attention logit |q.k|/sqrt(d_head) over all layers in the last forward pass."""
        return max(a.max_logit for a in self.attentions)
