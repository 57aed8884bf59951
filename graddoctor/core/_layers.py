"""What kind of layer a module is: the one classification watch, diagnose, init and surgery share.

Modules are classified by class while a model is at hand (watch, check, init, surgery), and by
class *name* once only a run store is (diagnose reads the names watch recorded): both views
come from the tables here, so a new activation or norm is one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

import torch
from torch import Tensor, nn

# Layers whose weight multiplies the signal (what init schemes scale and surgery reasons about).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)

# The same families by recorded class name (diagnose has names, not classes).
RECURRENT_NAMES = frozenset({"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RNNBase"})
NORM_NAMES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "GroupNorm",
                        "RMSNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm"})
EMBEDDING_NAMES = frozenset({"Embedding", "EmbeddingBag"})


@dataclass(frozen=True)
class ActivationKind:
    """What an activation is, for the statistics that make sense for it.

    Attributes:
      kind: short name, e.g. "sigmoid", "relu" (the name recorded in the run store).
      bounds: (lo, hi) for bounded activations (saturation is measured near them), else None.
      relu_family: True where exact zeros mean a unit is switched off.
      gain: the `torch.nn.init.calculate_gain` nonlinearity init schemes use after it, or None.
    """

    kind: str
    bounds: Optional[tuple[float, float]]
    relu_family: bool
    gain: Optional[str] = None


# Matched in order, so a subclass comes before its base (ReLU6 is a Hardtanh).
ACTIVATIONS: tuple[tuple[type, ActivationKind], ...] = (
    (nn.ReLU6, ActivationKind("relu6", (0.0, 6.0), True, "relu")),
    (nn.Hardtanh, ActivationKind("hardtanh", (-1.0, 1.0), False, "tanh")),  # bounds: the module's own
    (nn.Sigmoid, ActivationKind("sigmoid", (0.0, 1.0), False, "sigmoid")),
    (nn.Tanh, ActivationKind("tanh", (-1.0, 1.0), False, "tanh")),
    (nn.Hardsigmoid, ActivationKind("hardsigmoid", (0.0, 1.0), False, "sigmoid")),
    (nn.Softsign, ActivationKind("softsign", (-1.0, 1.0), False)),
    (nn.ReLU, ActivationKind("relu", None, True, "relu")),
    (nn.LeakyReLU, ActivationKind("leaky_relu", None, True, "leaky_relu")),
    (nn.PReLU, ActivationKind("prelu", None, True, "leaky_relu")),
    (nn.RReLU, ActivationKind("rrelu", None, True)),
    (nn.ELU, ActivationKind("elu", None, True, "relu")),
    (nn.CELU, ActivationKind("celu", None, True)),
    (nn.SELU, ActivationKind("selu", None, True, "selu")),
    (nn.GELU, ActivationKind("gelu", None, True, "relu")),
    (nn.SiLU, ActivationKind("silu", None, True, "relu")),
    (nn.Mish, ActivationKind("mish", None, True, "relu")),
    (nn.Softplus, ActivationKind("softplus", None, True, "relu")),
    (nn.Hardswish, ActivationKind("hardswish", None, True)),
)

# Recorded kinds whose outputs are bounded (recurrent layers' outputs pass through tanh), and
# those whose switched-off units are exactly zero (the dead-unit rule needs exact zeros).
BOUNDED_KINDS = frozenset({k.kind for _, k in ACTIVATIONS if k.bounds is not None and not k.relu_family}
                          | {"relu6", "rnn", "lstm", "gru"})
EXACT_ZERO_KINDS = frozenset({"relu", "relu6", "rnn_relu"})


def activation_kind(module: nn.Module) -> Optional[ActivationKind]:
    """The `ActivationKind` of a module, or None if it is not an activation we watch."""
    if isinstance(module, nn.RNN) and module.nonlinearity == "relu":
        return ActivationKind("rnn_relu", None, True)
    if isinstance(module, RECURRENT):
        return ActivationKind(type(module).__name__.lower(), (-1.0, 1.0), False)
    for cls, kind in ACTIVATIONS:
        if isinstance(module, cls):
            if kind.kind == "hardtanh":  # cls is nn.Hardtanh
                hardtanh = cast(nn.Hardtanh, module)
                return ActivationKind("hardtanh", (float(hardtanh.min_val), float(hardtanh.max_val)), False, "tanh")
            return kind
    return None


def activation_name(module: nn.Module) -> Optional[tuple[str, float]]:
    """(calculate_gain name, its parameter) for an activation module, or None if it has no gain."""
    kind = None if isinstance(module, RECURRENT) else activation_kind(module)
    if kind is None or kind.gain is None:
        return None
    if isinstance(module, nn.LeakyReLU):
        return kind.gain, float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        return kind.gain, float(module.weight.detach().mean())
    return kind.gain, 0.0


class Residual(nn.Module):
    """`x + alpha * branch(x)`: a skip connection around a shape-preserving branch.

    mode "zero": alpha is 1 and the branch's last weight layer starts at zero (Fixup style);
    mode "rezero": alpha is a learned scalar that starts at 0 (ReZero). Either way the block
    starts as the identity, so the gradient reaches earlier layers through the skip unchanged.
    """

    def __init__(self, branch: nn.Module, mode: str = "zero"):
        super().__init__()
        self.branch = branch
        self.mode = mode
        self.alpha = nn.Parameter(torch.zeros(1)) if mode == "rezero" else None
        self.zero_()

    @torch.no_grad()
    def zero_(self) -> str:
        """Make the block the identity again; returns what was zeroed."""
        if self.alpha is not None:
            self.alpha.zero_()
            return "rezero alpha = 0"
        last = [m for m in self.branch.modules() if isinstance(m, WEIGHT_LAYERS)][-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        return f"last {type(last).__name__} of the branch zeroed"

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        return x + (out if self.alpha is None else self.alpha * out)
