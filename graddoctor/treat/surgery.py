"""Model surgery: change the architecture so gradients can flow.

    model, changes = gd.surgery.swap_activation(model, nn.Sigmoid, nn.ReLU)
    model, changes = gd.surgery.add_norm(model, kind="batch")
    model, changes = gd.surgery.add_residual(model)
    model, changes = gd.surgery.rnn_to_lstm(model)
    model, changes = gd.surgery.pre_layer_norm(model)

Each function changes the model in place where it can (a top-level `nn.Sequential` that
gets new children is rebuilt, so always use the returned model), returns
`(model, changes)` with one line per change, and raises `SurgeryNotApplicableError`,
saying why, when there is nothing it can change. Build the optimizer after surgery:
new modules have new parameters.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .._errors import GradDoctorError
from ..core._layers import NORMS, WEIGHT_LAYERS, Residual, activation_name

SHAPE_KEEPING = NORMS + (nn.Dropout, nn.Identity)


class SurgeryNotApplicableError(GradDoctorError):
    """The model has nothing this surgery can change (the message says what was looked for)."""


def _factory(new: type[nn.Module] | Callable[[], nn.Module] | nn.Module) -> Callable[[], nn.Module]:
    if isinstance(new, nn.Module):  # an instance: one copy per replaced module
        return lambda: copy.deepcopy(new)
    if not callable(new):
        raise SurgeryNotApplicableError(f"new={new!r} is not allowed: give a module class or a zero-argument factory")
    return new


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def swap_activation(model: nn.Module, old: type | tuple[type, ...] = (nn.Sigmoid, nn.Tanh),
                    new: type[nn.Module] | Callable[[], nn.Module] = nn.ReLU) -> tuple[nn.Module, list[str]]:
    """Replace every activation module of type `old` by a fresh `new()`.

    Args:
      model: changed in place.
      old: activation class(es) to replace (default: the saturating ones, Sigmoid and Tanh).
      new: a class or a zero-argument factory, e.g. `nn.ReLU`, `lambda: nn.LeakyReLU(0.01)`, `nn.ELU`, `nn.GELU`.
    Returns:
      (model, changes). Raises `SurgeryNotApplicableError` if no module of type `old` exists.
    """
    make = _factory(new)
    targets = [(n, m) for n, m in model.named_modules() if n and isinstance(m, old)]
    if not targets:
        names = old.__name__ if isinstance(old, type) else ", ".join(t.__name__ for t in old)
        raise SurgeryNotApplicableError(f"{type(model).__name__} has no {names} module to swap (activations "
                                        "called as functions in forward() cannot be swapped; edit forward instead)")
    changes = []
    for name, m in targets:
        repl = make()
        _set_child(model, name, repl)
        changes.append(f"{name}: {type(m).__name__} -> {type(repl).__name__}")
    return model, changes


def _sequentials(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]


def _replace_sequential(model: nn.Module, name: str, new: nn.Sequential) -> nn.Module:
    if not name:
        return new
    _set_child(model, name, new)
    return model


def _rebuild_sequentials(model: nn.Module,
                         rebuild: Callable[[str, nn.Sequential], Optional[list[nn.Module]]]) -> nn.Module:
    """Replace each `nn.Sequential` by `nn.Sequential(*rebuild(name, seq))` where that is not None.

    Innermost first, so the names of the outer ones stay valid while inner ones are replaced.
    """
    for seq_name, seq in reversed(_sequentials(model)):
        out = rebuild(seq_name, seq)
        if out is not None:
            model = _replace_sequential(model, seq_name, nn.Sequential(*out))
    return model


def _norm_for(layer: nn.Linear | nn.modules.conv._ConvNd, kind: str) -> nn.Module:
    if isinstance(layer, nn.Linear):
        n = layer.out_features
        return nn.BatchNorm1d(n) if kind == "batch" else nn.LayerNorm(n)
    c, dims = layer.out_channels, layer.weight.ndim - 2
    if kind == "layer":
        return nn.GroupNorm(1, c)  # LayerNorm over (C, H, W) of each example, for any spatial size
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](c)


def add_norm(model: nn.Module, kind: str = "batch") -> tuple[nn.Module, list[str]]:
    """Insert a normalization after each Linear/Conv that feeds an activation (inside `nn.Sequential`s).

    Args:
      model: a `nn.Sequential` or a model containing some.
      kind: "batch" (BatchNorm1d/2d/3d) or "layer" (LayerNorm for Linear, GroupNorm(1, C) for Conv).
    Returns:
      (model, changes). Raises `SurgeryNotApplicableError` if no Linear/Conv is directly followed
      by an activation, or a normalization is already there.
    """
    if kind not in ("batch", "layer"):
        raise SurgeryNotApplicableError(f"kind={kind!r} is not allowed: use 'batch' or 'layer'")
    changes: list[str] = []

    def with_norms(seq_name: str, seq: nn.Sequential) -> Optional[list[nn.Module]]:
        children = list(seq.named_children())
        out: list[nn.Module] = []
        for i, (child_name, m) in enumerate(children):
            out.append(m)
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if isinstance(m, WEIGHT_LAYERS) and nxt is not None and activation_name(nxt) is not None:
                norm = _norm_for(m, kind)
                out.append(norm)
                prefix = f"{seq_name}." if seq_name else ""
                changes.append(f"{prefix}{child_name}: {type(norm).__name__} inserted before {type(nxt).__name__}")
        return out if len(out) != len(children) else None

    model = _rebuild_sequentials(model, with_norms)
    if not changes:
        raise SurgeryNotApplicableError(f"{type(model).__name__} has no Linear/Conv followed directly by an "
                                        "activation inside an nn.Sequential, so there is nowhere to add a norm")
    return model, changes


def _keeps_shape(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return m.in_features == m.out_features
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.in_channels != m.out_channels or any(s != 1 for s in m.stride):
            return False
        if isinstance(m.padding, str):  # "same" or "valid"
            return m.padding == "same"
        return all(2 * p == d * (k - 1) for p, d, k in zip(m.padding, m.dilation, m.kernel_size))
    return activation_name(m) is not None or isinstance(m, SHAPE_KEEPING)


def _segments(children: list[nn.Module]) -> list[list[nn.Module]]:
    """Split a Sequential's children after each weight layer: [L0], [act, L1], [act, L2], ..., [rest]."""
    segs: list[list[nn.Module]] = [[]]
    for m in children:
        segs[-1].append(m)
        if isinstance(m, WEIGHT_LAYERS):
            segs.append([])
    return [s for s in segs if s]


def add_residual(model: nn.Module, mode: str = "zero") -> tuple[nn.Module, list[str]]:
    """Wrap the shape-preserving blocks of each `nn.Sequential` in skip connections.

    A block is what lies between two weight layers plus the second one, e.g. `[Sigmoid, Linear(n, n)]`
    (pre-activation order, as in pre-activation ResNets), so `x + block(x)` with a zeroed last
    layer is exactly the identity at the start.

    Args:
      model: a `nn.Sequential` or a model containing some.
      mode: "zero" (zero-initialised branch) or "rezero" (learned scale starting at 0).
    Returns:
      (model, changes). Raises `SurgeryNotApplicableError` if no block keeps its input's shape.
    """
    if mode not in ("zero", "rezero"):
        raise SurgeryNotApplicableError(f"mode={mode!r} is not allowed: use 'zero' or 'rezero'")
    changes: list[str] = []

    def with_skips(seq_name: str, seq: nn.Sequential) -> Optional[list[nn.Module]]:
        if any(isinstance(m, Residual) for m in seq.children()):
            return None  # already has skip connections: never wrap twice
        out: list[nn.Module] = []
        for seg in _segments(list(seq.children())):
            if isinstance(seg[-1], WEIGHT_LAYERS) and all(_keeps_shape(m) for m in seg):
                out.append(Residual(nn.Sequential(*seg), mode))
                inside = ", ".join(type(m).__name__ for m in seg)
                changes.append(f"{seq_name or '<model>'}[{len(out) - 1}]: Residual({inside})")
            else:
                out.extend(seg)
        return out if any(isinstance(m, Residual) for m in out) else None

    model = _rebuild_sequentials(model, with_skips)
    if not changes:
        raise SurgeryNotApplicableError(f"{type(model).__name__} has no shape-preserving block (Linear(n, n) or a "
                                        "same-padded Conv with equal channels) inside an nn.Sequential")
    return model, changes


class LSTMAsRNN(nn.LSTM):
    """An `nn.LSTM` with `nn.RNN`'s call interface: `out, h_n = lstm(x, h_0)`.

    The cell state starts at zero on each call (carry `(h, c)` across calls with a plain
    `nn.LSTM`: `rnn_to_lstm(model, keep_interface=False)`).
    """

    def forward(self, x, hx: Optional[Tensor] = None):  # type: ignore[override]
        state: Any = hx  # None, or an (h, c) pair given as it is
        if isinstance(hx, Tensor):
            state = (hx, torch.zeros(hx.shape[:-1] + (self.hidden_size,), dtype=hx.dtype, device=hx.device))
        out, (h, _c) = super().forward(x, state)
        return out, h


def _rnn_args(m: nn.RNN) -> dict:
    return dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional)


def _replace_rnns(model: nn.Module, make: Callable[[dict], nn.Module], what: str) -> tuple[nn.Module, list[str]]:
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.RNN]
    if not targets:
        raise SurgeryNotApplicableError(f"{type(model).__name__} has no nn.RNN module to replace with {what}")
    if isinstance(model, nn.RNN):
        new = make(_rnn_args(model)).to(next(model.parameters()).device)
        return new, [f"<model>: RNN -> {type(new).__name__}"]
    changes = []
    for name, m in targets:
        new = make(_rnn_args(m)).to(next(m.parameters()).device)
        _set_child(model, name, new)
        changes.append(f"{name}: RNN({m.input_size}, {m.hidden_size}, layers={m.num_layers}, "
                       f"batch_first={m.batch_first}) -> {type(new).__name__}")
    return model, changes


def rnn_to_lstm(model: nn.Module, keep_interface: bool = True, cell: str = "lstm") -> tuple[nn.Module, list[str]]:
    """Replace every `nn.RNN` by an LSTM of the same sizes (batch_first, layers, dropout kept), its forget
    gates open (`open_forget_gates`: bias 1), so the cell state carries the gradient through time.

    Args:
      model: changed in place (an `nn.RNN` itself is returned replaced).
      keep_interface: use `LSTMAsRNN`, which returns `(out, h_n)` like `nn.RNN`, so an unchanged
        `forward` keeps working; False gives a plain `nn.LSTM` (returns `(out, (h_n, c_n))`).
      cell: "lstm", or "gru" (same as `rnn_to_gru`).
    Returns:
      (model, changes). Raises `SurgeryNotApplicableError` if there is no `nn.RNN`.
    """
    if cell == "gru":
        return rnn_to_gru(model)
    if cell != "lstm":
        raise SurgeryNotApplicableError(f"cell={cell!r} is not allowed: use 'lstm' or 'gru'")
    cls = LSTMAsRNN if keep_interface else nn.LSTM
    return _replace_rnns(model, lambda kw: open_forget_gates(cls(**kw)), "an LSTM")


def open_forget_gates(lstm: nn.LSTM, bias: float = 1.0) -> nn.LSTM:
    """Set the forget-gate biases to `bias` (1, Jozefowicz et al. 2015; Gers et al. 2000).

    At PyTorch's default init the forget gate sits near 0.5, so the cell state halves at every time
    step and its gradient vanishes through time like a plain RNN's: an LSTM helps only once the gate
    is open. Each layer has two bias vectors (b_ih, b_hh) of gates [input, forget, cell, output]; their
    sum is the gate's bias, so the forget slice of b_ih takes `bias` and that of b_hh zero.
    """
    h = lstm.hidden_size
    with torch.no_grad():
        for name, b in lstm.named_parameters():
            if name.startswith("bias_ih"):
                b[h:2 * h].fill_(bias)
            elif name.startswith("bias_hh"):
                b[h:2 * h].zero_()
    return lstm


def rnn_to_gru(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace every `nn.RNN` by an `nn.GRU` of the same sizes (a GRU has the RNN's call interface).

    Returns:
      (model, changes). Raises `SurgeryNotApplicableError` if there is no `nn.RNN`.
    """
    return _replace_rnns(model, lambda kw: nn.GRU(**kw), "a GRU")



_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def pre_layer_norm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Turn post-LN `nn.TransformerEncoderLayer`s / `TransformerDecoderLayer`s into pre-LN ones.

    Sets `norm_first=True` on each layer (their forward reads the attribute at call time), so the
    normalization moves onto the residual branch and the skip path stays an identity; an
    `nn.TransformerEncoder` / `TransformerDecoder` without a final `norm` gets a LayerNorm, as pre-LN
    stacks need one before the head. The weights are kept.

    Returns:
      (model, changes). Raises `SurgeryNotApplicableError` if no such layer has `norm_first=False`
      (in other models, move the LayerNorm by hand: `x = x + f(norm(x))` instead of `x = norm(x + f(x))`).
    References:
      Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (arXiv:2002.04745).
    """
    changes = []
    for name, m in model.named_modules():
        if isinstance(m, _TRANSFORMER_LAYERS) and not m.norm_first:
            m.norm_first = True
            changes.append(f"{name or '<model>'}: norm_first False -> True")
    if not changes:
        raise SurgeryNotApplicableError(f"{type(model).__name__} has no nn.TransformerEncoderLayer/DecoderLayer with "
                                        "norm_first=False (in your own blocks, write x = x + f(norm(x)))")
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)) and m.norm is None and len(m.layers):
            first = m.layers[0].norm1
            m.norm = nn.LayerNorm(first.normalized_shape, eps=first.eps, device=first.weight.device,
                                  dtype=first.weight.dtype)
            changes.append(f"{name or '<model>'}.norm: LayerNorm added after the last layer")
    return model, changes
