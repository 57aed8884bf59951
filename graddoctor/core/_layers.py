"""What kind of layer a module is: the one classification watch, diagnose, init and surgery share.

Modules are classified by class while a model is at hand (watch, check, init, surgery), and by
class *name* once only a run store is (diagnose reads the names watch recorded): both views
come from the tables here, so a new activation or norm is one line.

Activations a table does not name (HF's `NewGELUActivation`, a user's `x * sigmoid(x)` module)
are found by behaviour: a leaf module without parameters or buffers is called on a small float32
vector (`probe_activation`), and if it is elementwise and nonlinear its kind is the reference
function it matches (`REFERENCES`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import dropout, loss, padding, pooling

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

# Kinds only the behaviour probe finds (no torch.nn class): a kind name is what the run store keeps.
PROBED_KINDS = (ActivationKind("quick_gelu", None, True, "relu"),  # x * sigmoid(1.702 x), CLIP's GELU
                ActivationKind("relu_squared", None, True))         # relu(x)^2 (Primer)

# Recorded kinds whose outputs are bounded (recurrent layers' outputs pass through tanh), and
# those whose switched-off units are exactly zero (the dead-unit rule needs exact zeros: GELU,
# SiLU, ELU and leaky ReLU outputs are not, so they are not here).
BOUNDED_KINDS = frozenset({k.kind for _, k in ACTIVATIONS if k.bounds is not None and not k.relu_family}
                          | {"relu6", "rnn", "lstm", "gru"})
EXACT_ZERO_KINDS = frozenset({"relu", "relu6", "rnn_relu", "relu_squared"})


def activation_kind(module: nn.Module) -> Optional[ActivationKind]:
    """The `ActivationKind` of a module, or None if it is not an activation we watch.

    Known classes by class (`ACTIVATIONS`, recurrent layers); any other leaf module without
    parameters or buffers by behaviour (`probe_activation`): HF's `NewGELUActivation`, a
    user's `x * torch.sigmoid(x)` module. An elementwise nonlinear module that matches no
    reference function is kept as kind "<class name, lower case>", with no bounds.
    """
    found = _classify(module)
    return None if found is None else found[0]


def activation_name(module: nn.Module) -> Optional[tuple[str, float]]:
    """(calculate_gain name, its parameter) for an activation module, or None if it has no gain."""
    found = None if isinstance(module, RECURRENT) else _classify(module)
    if found is None or found[0].gain is None:
        return None
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.PReLU):
        return "leaky_relu", float(module.weight.detach().mean())
    return found[0].gain, found[1]


def _classify(module: nn.Module) -> Optional[tuple[ActivationKind, float]]:
    """(kind, calculate_gain parameter) of an activation module, or None."""
    if isinstance(module, nn.RNN) and module.nonlinearity == "relu":
        return ActivationKind("rnn_relu", None, True), 0.0
    if isinstance(module, RECURRENT):
        return ActivationKind(type(module).__name__.lower(), (-1.0, 1.0), False), 0.0
    for cls, kind in ACTIVATIONS:
        if isinstance(module, cls):
            if kind.kind == "hardtanh":  # cls is nn.Hardtanh
                hardtanh = cast(nn.Hardtanh, module)
                return ActivationKind("hardtanh", (float(hardtanh.min_val), float(hardtanh.max_val)), False,
                                      "tanh"), 0.0
            return kind, 0.0
    if not _probe_candidate(module):
        return None
    attributes = dict(vars(module))  # a forward that keeps state (self.last = x) must not keep the probe's
    try:
        match = probe_activation(module.forward)
    finally:
        vars(module).clear()
        vars(module).update(attributes)
    return _kind_of_match(match, type(module).__name__)


def function_kind(fn: Callable[[Tensor], Tensor]) -> Optional[ActivationKind]:
    """The `ActivationKind` of an activation function (e.g. `F.gelu`), by behaviour; None if it is none."""
    found = _kind_of_match(probe_activation(fn), getattr(fn, "__name__", type(fn).__name__))
    return None if found is None else found[0]


def _kind_of_match(match: Optional[ProbeMatch], name: str) -> Optional[tuple[ActivationKind, float]]:
    if match is None:
        return None
    return (match.kind or ActivationKind(name.lower(), None, False)), match.param


def _probe_candidate(module: nn.Module) -> bool:
    """A leaf module with no parameters or buffers that is not a known non-activation: worth a probe."""
    return (not isinstance(module, NOT_ACTIVATIONS) and next(module.children(), None) is None
            and next(module.parameters(), None) is None and next(module.buffers(), None) is None)


# ------------------------------------------------------------------ the behaviour probe
# Leaf modules that are never activations, skipped without a probe: Dropout draws random numbers,
# pooling and padding change shapes, softmax and norms mix elements (the probe would reject them;
# skipping them is cheaper and certain).
NOT_ACTIVATIONS: tuple[type, ...] = (
    dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d,
    pooling._MaxPoolNd, pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd, pooling._AdaptiveMaxPoolNd,
    pooling._LPPoolNd, pooling._MaxUnpoolNd, padding._ConstantPadNd, padding._ReflectionPadNd,
    padding._ReplicationPadNd, padding._CircularPadNd, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle, loss._Loss) + NORMS + RECURRENT + WEIGHT_LAYERS


def _gelu(t: Tensor) -> Tensor:
    return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))


def _gelu_tanh(t: Tensor) -> Tensor:  # GPT-2's and BERT's "gelu_new"
    return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3)))


# (reference name, the function in float64, the kind it records as)
REFERENCES: tuple[tuple[str, Callable[[Tensor], Tensor], str], ...] = (
    ("relu", F.relu, "relu"), ("relu6", lambda t: t.clamp(0.0, 6.0), "relu6"),
    ("gelu", _gelu, "gelu"), ("gelu_tanh", _gelu_tanh, "gelu"),
    ("quick_gelu", lambda t: t * torch.sigmoid(1.702 * t), "quick_gelu"),
    ("silu", lambda t: t * torch.sigmoid(t), "silu"), ("mish", lambda t: t * torch.tanh(F.softplus(t)), "mish"),
    ("softplus", F.softplus, "softplus"), ("sigmoid", torch.sigmoid, "sigmoid"), ("tanh", torch.tanh, "tanh"),
    ("softsign", lambda t: t / (1.0 + t.abs()), "softsign"),
    ("hardsigmoid", lambda t: (t + 3.0).clamp(0.0, 6.0) / 6.0, "hardsigmoid"),
    ("hardswish", lambda t: t * (t + 3.0).clamp(0.0, 6.0) / 6.0, "hardswish"),
    ("elu", F.elu, "elu"), ("selu", F.selu, "selu"), ("relu_squared", lambda t: F.relu(t) ** 2, "relu_squared"))
_KINDS = {k.kind: k for _, k in ACTIVATIONS} | {k.kind: k for k in PROBED_KINDS}

# A float32 formula of a few operations is off by a few ulps of its largest intermediate (|x|, the
# output, or 1); 32 ulps of that leaves room for other libm's, while the two nearest references
# (exact and tanh-approximated GELU) differ by over 1000 ulps of it on the probe.
PROBE_TOL = 32 * float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class ProbeMatch:
    """What the probe found a function to be.

    Attributes:
      reference: the reference function it matches ("gelu_tanh", "leaky_relu", ...), or None.
      kind: the `ActivationKind` to record, or None for an elementwise nonlinearity matching no reference.
      param: the `calculate_gain` parameter (a leaky ReLU's slope), else 0.
    """

    reference: Optional[str]
    kind: Optional[ActivationKind]
    param: float = 0.0


def probe_input() -> Tensor:
    """The probe's float32 CPU vector: -10..10 in steps of 0.2 (the tails of sigmoid and tanh included)."""
    return torch.linspace(-10.0, 10.0, 101)


def probe_activation(fn: Callable[[Tensor], Tensor]) -> Optional[ProbeMatch]:
    """Whether `fn` is an activation (elementwise and nonlinear), and which, from a few calls on `probe_input()`.

    Runs under no_grad with the CPU random state restored after it and warnings silenced; a
    function that raises, changes the shape, mixes elements, is random or affine is no activation.
    """
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = probe_input()
            y = _call(fn, x)
            if y is None or not _elementwise(fn, x, y):
                return None
            x64, y64 = x.double(), y.double()
            if _is_affine(x64, y64):
                return None
            return _match(x64, y64)
    except Exception:  # whatever a module does with an input it was not made for: not an activation
        return None


def _call(fn: Callable[[Tensor], Tensor], x: Tensor) -> Optional[Tensor]:
    """fn on a copy of x (in-place activations write into their input), if it is a finite tensor of x's shape."""
    y = fn(x.clone())
    if not isinstance(y, Tensor) or y.shape != x.shape or not y.is_floating_point() or not bool(y.isfinite().all()):
        return None
    return y.double()


def _close(got: Optional[Tensor], want: Tensor, x: Tensor) -> bool:
    if got is None:
        return False
    return bool(((got - want).abs() <= PROBE_TOL * (1.0 + x.abs() + want.abs())).all())


def _elementwise(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> bool:
    """Each output depends on its own input alone, checked with one more call, on a [3, n] batch whose rows
    are a permutation of x (the outputs must follow it), x with its even entries changed (the odd outputs
    must not move) and x itself (the batch must not change it, and fn must not be random)."""
    n = x.numel()
    perm = (torch.arange(n) * 37) % n  # 37 is coprime to 101: a fixed permutation, no random draw
    other = x.clone()
    other[::2] = other[::2] * 0.5 + 0.3
    batch = _call(fn, torch.stack([x[perm], other, x]))
    if batch is None:
        return False
    x64 = x.double()
    return (_close(batch[0], y[perm], x64[perm]) and _close(batch[1, 1::2], y[1::2], x64[1::2])
            and _close(batch[2], y, x64))


def _is_affine(x: Tensor, y: Tensor) -> bool:
    """y = a*x + b on the probe (identity, scaling): no activation."""
    a = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    return _close(a * (x - x.mean()) + y.mean(), y, x)


def _match(x: Tensor, y: Tensor) -> ProbeMatch:
    """The reference `y = f(x)` matches best within `PROBE_TOL`; then the parametric leaky ReLU and hardtanh."""
    scale = 1.0 + x.abs() + y.abs()
    errors = {name: float(((y - f(x)).abs() / scale).max()) for name, f, _ in REFERENCES}
    best = min(errors, key=lambda name: errors[name])
    if errors[best] <= PROBE_TOL:
        return ProbeMatch(best, _KINDS[next(k for name, _, k in REFERENCES if name == best)])
    slope = float((y[x < -0.1] / x[x < -0.1]).median())
    if 0.0 < slope < 1.0 and _close(y, torch.where(x > 0, x, slope * x), x):
        return ProbeMatch("leaky_relu", _KINDS["leaky_relu"], slope)
    lo, hi = float(y.min()), float(y.max())
    if float(x.min()) < lo < hi < float(x.max()) and _close(y, x.clamp(lo, hi), x):
        return ProbeMatch("hardtanh", ActivationKind("hardtanh", (lo, hi), False, "tanh"))
    return ProbeMatch(None, None)


# ------------------------------------------------------------------ where activations are
@dataclass(frozen=True)
class ActivationSite:
    """One place watch takes activation statistics.

    Attributes:
      name: the name recorded in the run store (a module's name, or "<layer>.activation").
      module: the module whose forward output the hook reads.
      kind: what the activation is.
      function: None where `module` is the activation; else the activation function the hook applies to
        the module's output (a layer that calls its activation as a function on this module's output).
    """

    name: str
    module: nn.Module
    kind: ActivationKind
    function: Optional[Callable[[Tensor], Tensor]] = None


def activation_sites(model: nn.Module) -> list[ActivationSite]:
    """The activations of `model` watch can see, in module order: activation modules (`activation_kind`),
    and the activation functions of `nn.TransformerEncoderLayer`/`nn.TransformerDecoderLayer`.

    An activation called as a function in some other forward (nanoGPT's `F.gelu(self.c_fc(x))`)
    has no module and no attribute to find it by, so it is not seen.
    """
    sites = []
    function_kinds: dict[int, Optional[ActivationKind]] = {}  # every layer of a stack shares F.gelu: probed once
    for name, m in model.named_modules():
        kind = activation_kind(m)
        if kind is not None:
            sites.append(ActivationSite(name, m, kind))
        elif (site := _transformer_layer_site(name, m, function_kinds)) is not None:
            sites.append(site)
    return sites


def _transformer_layer_site(name: str, m: nn.Module,
                            function_kinds: dict[int, Optional[ActivationKind]]) -> Optional[ActivationSite]:
    """The feed-forward activation of a torch Transformer layer, applied to `linear1`'s output.

    Given as a string ("relu", "gelu") the layer keeps it as a function (F.relu, F.gelu), which no
    hook can see; given as a module it is a child, found as a module.
    """
    if not isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return None
    fn = m.activation
    if isinstance(fn, nn.Module) or not callable(fn):
        return None
    if id(fn) not in function_kinds:
        function_kinds[id(fn)] = function_kind(fn)
    kind = function_kinds[id(fn)]
    return None if kind is None else ActivationSite(f"{name}.activation" if name else "activation", m.linear1, kind, fn)


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
