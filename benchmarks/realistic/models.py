"""The models of the realistic suite: small versions of what people train, written as their authors do.

- `GPT`: nanoGPT's model (token + position embeddings, pre-LN blocks of causal self-attention and a GELU
  MLP, a final LayerNorm, the LM head tied to the token embedding; N(0, 0.02) init with the residual
  projections scaled by 1/sqrt(2 * n_layer), as in nanoGPT and GPT-2); optionally QK-layernorm.
- `EncoderLM`: `nn.TransformerEncoder` under a causal mask, pre-LN (`norm_first=True`) or post-LN.
- `hf_gpt2`: Hugging Face's `GPT2LMHeadModel` built from a config (no download); None without transformers.
- `RecurrentLM`: an embedding, an LSTM (or a vanilla RNN) and a linear head; forward takes `(x, hidden)`
  and returns `(logits, hidden)`, for truncated BPTT with a carried, detached hidden state.
- `DigitsCNN`: two 3x3 convolutions and a linear head for scikit-learn's 8x8 digits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """`qk_norm`: a LayerNorm over each head's queries and keys before the dot product (QK-layernorm,
    Dehghani et al. 2023), which bounds the attention logits by the norms' gains."""

    def __init__(self, n_embd: int, n_head: int, qk_norm: bool = False):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(n_embd // n_head), nn.LayerNorm(n_embd // n_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, qk_norm: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, qk_norm)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT (Karpathy), small. `init_std` is the base init scale (nanoGPT: 0.02); `qk_norm` adds
    QK-layernorm to every attention."""

    def __init__(self, vocab_size: int = 64, block_size: int = 32, n_layer: int = 4, n_head: int = 2,
                 n_embd: int = 32, init_std: float = 0.02, qk_norm: bool = False):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, qk_norm) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in nanoGPT
        self.init_std = init_std
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=init_std / math.sqrt(2 * n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.init_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class EncoderLM(nn.Module):
    """A causal language model on `nn.TransformerEncoder` (pre-LN with `norm_first=True`, else post-LN)."""

    def __init__(self, vocab_size: int = 64, block_size: int = 32, n_layer: int = 2, n_head: int = 2,
                 d_model: int = 32, norm_first: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_head, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=norm_first)
        # enable_nested_tensor only applies to post-LN without a padding mask; off keeps both paths the same
        self.encoder = nn.TransformerEncoder(layer, n_layer, norm=nn.LayerNorm(d_model) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        return self.head(self.encoder(x, mask=mask, is_causal=True))


def hf_gpt2(vocab_size: int = 64, block_size: int = 32) -> Optional[nn.Module]:
    """HF GPT-2 from a config (nothing downloaded), or None when transformers is not installed."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=block_size,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config)


class RecurrentLM(nn.Module):
    """Embedding -> LSTM (or RNN) -> Linear. forward(x, hidden) -> (logits, hidden)."""

    def __init__(self, vocab_size: int = 64, d: int = 64, cell: str = "lstm", nonlinearity: str = "tanh"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.rnn: nn.Module = (nn.LSTM(d, d, batch_first=True) if cell == "lstm"
                               else nn.RNN(d, d, batch_first=True, nonlinearity=nonlinearity))
        self.head = nn.Linear(d, vocab_size)

    def forward(self, x: torch.Tensor, hidden=None):
        out, hidden = self.rnn(self.embed(x), hidden)
        return self.head(out), hidden


class DigitsCNN(nn.Module):
    """Conv(1->16) -> act -> Conv(16->32) -> act -> 2x2 max-pool -> Linear(32*4*4 -> 10), on 8x8 digits."""

    def __init__(self, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), act(), nn.Conv2d(16, 32, 3, padding=1), act(),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
