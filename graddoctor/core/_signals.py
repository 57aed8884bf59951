"""Transformer stability signals, taken on sampled steps: attention logits and the output log-normalizer.

- Attention logit growth (Wortsman et al. 2023; Dehghani et al. 2023): the largest |q.k| * scale
  (scale: the module's own `scaling`, else 1/sqrt(d_head)) over batch, heads and query-key pairs
  (masks are not applied: every pair is counted), and the largest per-head query and key norms.
- Output logit divergence (PaLM, Chowdhery et al. 2022): log Z = logsumexp of the LM head's
  logits at each position, its mean and max.

Attention modules are found by structure, not by one class name:
- a module with query and key norm children (QK-norm: `q_norm`/`k_norm`, `q_ln`/`k_ln`, ...): their
  outputs are the q and k the dot product sees;
- a module with a `c_attn` child whose output is q, k and v concatenated (nanoGPT's
  CausalSelfAttention, HF's GPT2Attention): `c_attn`'s output is hooked;
- a module with an `in_proj_weight` or `q_proj_weight` (`nn.MultiheadAttention`): its query and key
  inputs are hooked and projected here, under no_grad;
- a module with `q_proj` and `k_proj` children (Llama, BART): their outputs give the norms only, as
  a rotary embedding may turn q and k after the projections (max_logit is NaN there).
The LM head is a root `lm_head` (HF), else the last Linear whose out_features equals an
embedding's rows (the vocabulary).

Like the activation hooks (`_act_hooks`), these hooks exist only on the steps `activation_every`
samples; each turns what it sees into a device tensor, and nothing syncs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..store._series import ATTN_FIELDS
from ._sampled_hooks import SampledHooks

_HEAD_ATTRS = ("n_head", "num_heads", "n_heads", "num_attention_heads")
# Names of the query and key norms of QK-norm attention (timm, HF Qwen3/OLMo2, Megatron, our snippet).
_QK_NORMS = (("q_norm", "k_norm"), ("q_ln", "k_ln"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"))


@dataclass(frozen=True)
class AttentionSite:
    """One attention module: `name` (its module name), `kind` ("qk_norm", "c_attn", "in_proj" or "qk_proj"),
    `module` (the attention module), `heads`, and `parts`: the q and k children hooked ("qk_norm", "qk_proj")."""

    name: str
    kind: str
    module: nn.Module
    heads: int
    parts: tuple[str, str] = ("q_proj", "k_proj")


def _heads(m: nn.Module) -> Optional[int]:
    for attr in _HEAD_ATTRS:
        h = getattr(m, attr, None)
        if isinstance(h, int) and h > 0:
            return h
    h = getattr(getattr(m, "config", None), "num_attention_heads", None)
    return h if isinstance(h, int) and h > 0 else None


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The attention modules of `model` whose head count is known, in `named_modules()` order."""
    sites = []
    for name, m in model.named_modules():
        heads = _heads(m)
        if heads is None:
            continue
        norms = next((p for p in _QK_NORMS if all(isinstance(getattr(m, n, None), nn.Module) for n in p)), None)
        if norms is not None:
            sites.append(AttentionSite(name, "qk_norm", m, heads, norms))
        elif isinstance(getattr(m, "c_attn", None), nn.Module):
            sites.append(AttentionSite(name, "c_attn", m, heads))
        elif isinstance(m, nn.MultiheadAttention):
            sites.append(AttentionSite(name, "in_proj", m, heads))
        elif isinstance(getattr(m, "q_proj", None), nn.Linear) and isinstance(getattr(m, "k_proj", None), nn.Linear):
            sites.append(AttentionSite(name, "qk_proj", m, heads))
    return sites


def lm_head(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(name, module) of the layer that makes the output logits, or None (not a language model)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        return "lm_head", head
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features in vocab]
    return linears[-1] if linears else None


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[..., T, E] -> [B, heads, T, E / heads] (an unbatched [T, E] becomes B = 1); a 4-D x is split already:
    [B, heads, T, d] as it is, [B, T, heads, d] transposed."""
    if x.dim() == 4:
        return x.transpose(1, 2) if x.shape[1] != heads and x.shape[2] == heads else x
    x = x.reshape(-1, *x.shape[-2:])
    return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)


def attention_row(q: Tensor, k: Tensor, heads: int, scale: Optional[float]) -> Tensor:
    """[max |q.k| * scale, max query norm, max key norm] of one call (q, k: [..., T, E]); no sync.

    The scale defaults to 1/sqrt(d_head); `scale=None` and d_head unknown never happen here.
    Masks are not applied, so every query-key pair counts (the logits softmax sees are a subset).
    """
    qh, kh = _split_heads(q.detach().float(), heads), _split_heads(k.detach().float(), heads)
    s = scale if scale is not None else 1.0 / math.sqrt(qh.shape[-1])
    logits = torch.matmul(qh, kh.transpose(-1, -2)).abs().amax() * s
    return torch.stack([logits, qh.norm(dim=-1).amax(), kh.norm(dim=-1).amax()])


def norms_row(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """[NaN, max query norm, max key norm] per head: q and k as projected, before any rotation (keys may
    have fewer heads than queries: grouped-query attention)."""
    qh = _split_heads(q.detach().float(), heads)
    kh = _split_heads(k.detach().float(), max(1, k.shape[-1] // qh.shape[-1]))
    return torch.stack([qh.new_full((), math.nan), qh.norm(dim=-1).amax(), kh.norm(dim=-1).amax()])


def logz_row(logits: Tensor) -> Tensor:
    """[mean, max] over positions of log Z = logsumexp(logits, -1), in float32; no sync."""
    logz = torch.logsumexp(logits.detach().float(), dim=-1)
    return torch.stack([logz.mean(), logz.amax()])


def _in_proj_qk(m: nn.MultiheadAttention, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """q and k as `nn.MultiheadAttention` projects them, laid out [batch, T, E]."""
    E = m.embed_dim
    if m.in_proj_weight is not None:
        wq, wk = m.in_proj_weight[:E], m.in_proj_weight[E:2 * E]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq, bk = (m.in_proj_bias[:E], m.in_proj_bias[E:2 * E]) if m.in_proj_bias is not None else (None, None)
    if m.batch_first or query.dim() == 2:
        query_, key_ = query, key
    else:  # [T, B, E]
        query_, key_ = query.transpose(0, 1), key.transpose(0, 1)
    return nn.functional.linear(query_, wq, bq), nn.functional.linear(key_, wk, bk)


class SignalHooks(SampledHooks):
    """The attention and output-logit hooks of one model, and the rows they gather on a sampled step."""

    def __init__(self, model: Optional[nn.Module], device: torch.device):
        """`model` None: nothing is hooked (a rank that does not record, a compiled model)."""
        super().__init__()
        self.sites = attention_sites(model) if model is not None else []
        self.head = lm_head(model) if model is not None else None
        self._device = device
        self._attn: dict[int, list[Tensor]] = {}
        self._pending: dict[int, dict[str, Tensor]] = {}  # qk_proj sites: the q or k seen first
        self._logz: list[Tensor] = []

    def meta(self) -> dict[str, list[str]]:
        """The attention series' column names for the run store ("module:field", module-major)."""
        return {"attn_fields": [f"{s.name}:{f}" for s in self.sites for f in ATTN_FIELDS]}

    def _register(self) -> list[RemovableHandle]:
        """Hooks on every site's q and k (or on what makes them) and on the LM head."""
        handles = []
        for i, site in enumerate(self.sites):
            m = site.module
            if site.kind == "c_attn":
                handles.append(getattr(m, "c_attn").register_forward_hook(self._c_attn_hook(i, site)))
            elif site.kind == "in_proj":
                handles.append(m.register_forward_hook(self._in_proj_hook(i, site), with_kwargs=True))
            else:
                for part, child in zip("qk", site.parts):
                    handles.append(getattr(m, child).register_forward_hook(self._pair_hook(i, site, part)))
        if self.head is not None:
            handles.append(self.head[1].register_forward_hook(self._head_hook))
        return handles

    @staticmethod
    def _scale(site: AttentionSite) -> Optional[float]:
        scale = getattr(site.module, "scaling", None)  # GPT-2's own (it may scale by the layer index too)
        return float(scale) if isinstance(scale, (int, float)) else None

    def _keep(self, i: int, row: Tensor) -> None:
        self._attn.setdefault(i, []).append(row.to(self._device))

    def _c_attn_hook(self, i: int, site: AttentionSite):
        scale = self._scale(site)

        def hook(_m: nn.Module, _inp: tuple, out: object) -> None:
            # Only training forwards count, and only a q, k, v output (a cross-attention's c_attn makes k, v).
            if not isinstance(out, Tensor) or not torch.is_grad_enabled() or out.shape[-1] % 3:
                return
            with torch.no_grad():
                q, k, _ = out.split(out.shape[-1] // 3, dim=-1)
                self._keep(i, attention_row(q, k, site.heads, scale))
        return hook

    def _in_proj_hook(self, i: int, site: AttentionSite):
        def hook(m: nn.Module, args: tuple, kwargs: dict, _out: object) -> None:
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            if not isinstance(query, Tensor) or not isinstance(key, Tensor) or not torch.is_grad_enabled():
                return
            with torch.no_grad():  # the projection again, on sampled steps only, out of the autograd graph
                q, k = _in_proj_qk(m, query.detach(), key.detach())  # type: ignore[arg-type]
                self._keep(i, attention_row(q, k, site.heads, None))
        return hook

    def _pair_hook(self, i: int, site: AttentionSite, part: str):
        """q or k from its own child; the row once both were seen (QK-norm: logits; projections: norms)."""
        scale = self._scale(site)

        def hook(_m: nn.Module, _inp: tuple, out: object) -> None:
            if not isinstance(out, Tensor) or not torch.is_grad_enabled():
                return
            seen = self._pending.setdefault(i, {})
            seen[part] = out.detach()
            if len(seen) == 2:
                with torch.no_grad():
                    self._keep(i, attention_row(seen["q"], seen["k"], site.heads, scale) if site.kind == "qk_norm"
                               else norms_row(seen["q"], seen["k"], site.heads))
                self._pending[i] = {}
        return hook

    def _head_hook(self, _m: nn.Module, _inp: tuple, out: object) -> None:
        if isinstance(out, Tensor) and torch.is_grad_enabled():
            with torch.no_grad():
                self._logz.append(logz_row(out).to(self._device))

    def remove(self) -> None:
        super().remove()
        self._pending = {}

    def _rows(self) -> list[tuple[str, Tensor]]:
        """The step's `attn` and `logits` rows.

        A module called several times in one step (gradient accumulation) keeps its largest values
        (the mean of the log Z means); a module not called gives NaN.
        """
        out = []
        if self.sites:
            nan = torch.full((len(ATTN_FIELDS),), math.nan, device=self._device)
            rows = [torch.stack(self._attn[i]).amax(0) if i in self._attn else nan for i in range(len(self.sites))]
            out.append(("attn", torch.cat(rows)))
        if self.head is not None:
            if self._logz:
                z = torch.stack(self._logz)
                out.append(("logits", torch.stack([z[:, 0].mean(), z[:, 1].amax()])))
            else:
                out.append(("logits", torch.full((2,), math.nan, device=self._device)))
        self._attn, self._logz = {}, []
        return out
