"""What a cure needs of a model, judged from what a run store knows about it (no model at hand).

A cure that raises on the user's model is a wrong answer (`SurgeryNotApplicableError`, `NoLayersError`,
`PretrainError`), and one that undoes a deliberate choice is worse (He init over GPT's N(0, 0.02)). Each
catalogue cure carries one of the tests below; diagnose ranks only the cures whose test passes.

`ModelFacts` is the model as recorded: module name -> class name, parameter shapes, and the "structure"
watch reads at the first forward (graddoctor.core._structure). Every test mirrors what the applying
function looks for (graddoctor.treat.surgery, .init, ._pretrain), so the two cannot disagree for long.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from ..core._layers import ACTIVATIONS, EMBEDDING_NAMES, NORM_NAMES, RECURRENT_NAMES

_ACTIVATION_NAMES = frozenset(cls.__name__ for cls, _ in ACTIVATIONS)
_LINEAR = frozenset({"Linear"})
_CONV = frozenset({"Conv1d", "Conv2d", "Conv3d"})
_WEIGHT = _LINEAR | _CONV | frozenset({"ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"})
_SHAPE_KEEPING = _ACTIVATION_NAMES | NORM_NAMES | frozenset({"Dropout", "Identity"})
_TRANSFORMER_LAYERS = frozenset({"TransformerEncoderLayer", "TransformerDecoderLayer"})


@dataclass(frozen=True)
class ModelFacts:
    """A model as its run store describes it.

    Fields:
      model_class: the root module's class name ("" if unknown).
      modules: module name -> class name, in `named_modules()` order (the root left out).
      shapes: parameter name -> shape.
      residual: modules whose output adds their input; None where the store did not record it (unknown).
      post_norm: residual modules whose add sits under a norm (post-LN), torch layers with norm_first=False.
      same_shape: modules whose output had their input's shape in the first forward; None if unknown.
      lr_warmup: whether the run started with an lr warmup; None if unknown.
    """

    model_class: str = ""
    modules: Mapping[str, str] = field(default_factory=dict)
    shapes: Mapping[str, tuple] = field(default_factory=dict)
    residual: Optional[frozenset[str]] = None
    post_norm: frozenset[str] = frozenset()
    same_shape: Optional[frozenset[str]] = None
    lr_warmup: Optional[bool] = None

    @cached_property
    def classes(self) -> frozenset[str]:
        return frozenset(self.modules.values())

    def children(self, parent: str) -> list[tuple[str, str]]:
        """(name, class) of `parent`'s direct children, in order ("" is the root)."""
        prefix = parent + "." if parent else ""
        return [(n, c) for n, c in self.modules.items()
                if n.startswith(prefix) and "." not in n[len(prefix):]]

    def sequentials(self) -> list[str]:
        return ([""] if self.model_class == "Sequential" else []) + [
            n for n, c in self.modules.items() if c == "Sequential"]

    @property
    def transformer_style(self) -> bool:
        """Embeddings feeding attention: a model whose init is a deliberate N(0, 0.02), not a fan-in rule."""
        attention = any("Attention" in c for c in self.classes) or bool(self.classes & _TRANSFORMER_LAYERS)
        return attention and bool(self.classes & EMBEDDING_NAMES | self.classes & _TRANSFORMER_LAYERS)


def always(_facts: ModelFacts) -> bool:
    """Cures that change training, not the model (clipping, the lr, the data)."""
    return True


def transformer_init(facts: ModelFacts) -> bool:
    """`gpt2_init`: a transformer-style model (embeddings feeding attention), whose init is N(0, 0.02)."""
    return facts.transformer_style


def fan_in_init(facts: ModelFacts) -> bool:
    """He/Xavier/LSUV/orthogonal: a Linear/Conv to set, and not a transformer's deliberate N(0, 0.02)."""
    return bool(facts.classes & _WEIGHT) and not facts.transformer_style


def orthogonal(facts: ModelFacts) -> bool:
    return bool(facts.classes & (_WEIGHT | RECURRENT_NAMES)) and not facts.transformer_style


def residual_branches(facts: ModelFacts) -> bool:
    """`init.zero_residual_`: graddoctor's Residual, or torchvision-style blocks (bn3, or bn2 beside conv2)."""
    if "Residual" in facts.classes:
        return True
    batch = {n for n, c in facts.modules.items() if c.startswith(("BatchNorm", "SyncBatchNorm"))}
    return any(n.endswith(".bn3") or (n.endswith(".bn2") and n[:-3] + "conv2" in facts.modules) for n in batch)


def norm_insertable(facts: ModelFacts) -> bool:
    """`surgery.add_norm`: a Linear/Conv directly followed by an activation inside an nn.Sequential."""
    for seq in facts.sequentials():
        kids = [c for _, c in facts.children(seq)]
        if any(a in _WEIGHT and b in _ACTIVATION_NAMES for a, b in zip(kids, kids[1:])):
            return True
    return False


def batch_norm_insertable(facts: ModelFacts) -> bool:
    """`add_norm(kind="batch")`: as `norm_insertable`, and not over token sequences (embeddings, attention):
    BatchNorm1d reads dim 1 of a [batch, time, features] tensor as its channels."""
    return norm_insertable(facts) and not facts.transformer_style and not facts.classes & EMBEDDING_NAMES


def residual_insertable(facts: ModelFacts) -> bool:
    """`surgery.add_residual`: no skips yet, and a shape-keeping block ([act, ..., weight layer]) in a Sequential."""
    if facts.residual or "Residual" in facts.classes:
        return False
    for seq in facts.sequentials():
        segment: list[tuple[str, str]] = []
        for name, cls in facts.children(seq):
            segment.append((name, cls))
            if cls in _WEIGHT:
                if all(_keeps_shape(facts, n, c) for n, c in segment):
                    return True
                segment = []
    return False


def _keeps_shape(facts: ModelFacts, name: str, cls: str) -> bool:
    if cls in _WEIGHT:
        if facts.same_shape is not None:  # seen in the forward: exactly surgery's test for Linear and Conv
            return name in facts.same_shape and cls in _LINEAR | _CONV
        shape = facts.shapes.get(name + ".weight", ())
        return cls in _LINEAR and len(shape) == 2 and shape[0] == shape[1]
    return cls in _SHAPE_KEEPING


def swappable(*old: str):
    """`surgery.swap_activation(model, old, new)`: a module of one of the `old` classes."""
    def test(facts: ModelFacts) -> bool:
        return bool(facts.classes & frozenset(old))
    test.__name__ = "has_" + "_or_".join(o.lower() for o in old)
    return test


def vanilla_rnn(facts: ModelFacts) -> bool:
    """`surgery.rnn_to_lstm` / `rnn_to_gru`: an `nn.RNN` to replace."""
    return "RNN" in facts.classes


def recurrent(facts: ModelFacts) -> bool:
    return bool(facts.classes & RECURRENT_NAMES)


def flat_mlp(facts: ModelFacts) -> bool:
    """`layerwise_pretrain`: an nn.Sequential of Linear layers (two or more), first a Linear, nothing nested."""
    kids = facts.children("")
    return (facts.model_class == "Sequential" and bool(kids) and kids[0][1] == "Linear"
            and sum(c == "Linear" for _, c in kids) >= 2 and len(kids) == len(facts.modules))


def post_layer_norm(facts: ModelFacts) -> bool:
    """`pre_layer_norm`: residual blocks that normalize after their add (post-LN)."""
    return bool(facts.post_norm)


def attention(facts: ModelFacts) -> bool:
    """`qk_norm`: attention whose q and k the user's code computes (a `c_attn`, `q_proj`/`k_proj`, or
    `nn.MultiheadAttention`, found by structure as watch finds them: graddoctor.core._signals)."""
    names = facts.modules
    return ("MultiheadAttention" in facts.classes
            or any(n.endswith(".c_attn") or n == "c_attn" for n in names)
            or any(n.endswith("q_proj") and n[:-6] + "k_proj" in names for n in names))


def language_model(facts: ModelFacts) -> bool:
    """`z_loss`: a model with a token embedding (its output logits run over the vocabulary)."""
    return bool(facts.classes & EMBEDDING_NAMES)


def without_warmup(facts: ModelFacts) -> bool:
    """`lr_warmup`: not when the run already warms up."""
    return facts.lr_warmup is not True
