"""Structure: which modules are residual, read off the autograd graph of the first training forward.

Diagnosis reads only the run store, and a module's class name does not say whether its forward adds its
input back (a nanoGPT `Block`, a ResNet `BasicBlock`, a `TransformerEncoderLayer` all do; an MLP's
`Sequential` does not). So watch probes once, where the model is at hand: a one-shot forward hook on every
module sees its input and output tensors, and for a shape-preserving module it walks the output's
`grad_fn` a few nodes deep. The module is residual when an Add node there takes the input's own autograd
node directly (the skip path). The hooks are removed after the first forward that builds a graph.

The facts (`StructureProbe.facts()`) are recorded as a "structure" event at the first step:
- `residual`: the innermost residual modules (a stack of residual blocks is not listed as well);
- `post_norm`: those whose add sits under a normalization (post-LN: `norm(x + f(x))`, Xiong et al. 2020);
- `same_shape`: modules whose output has their first input's shape (where surgery can add a skip);
- `norm_first`: `nn.TransformerEncoderLayer` / `TransformerDecoderLayer` name -> its `norm_first`;
- `lr`, `initial_lr`: per parameter group at the first step (`initial_lr` is set by any PyTorch LR
  scheduler; an lr far below it at step 0 is a warmup).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

# Autograd nodes a skip path may pass between the block's output and its add: the add itself, the
# normalization of a post-LN block, the activation after a ResNet block's add, dropout.
_PASS_THROUGH = ("Add", "NativeLayerNorm", "LayerNorm", "NativeBatchNorm", "CudnnBatchNorm", "BatchNorm",
                 "NativeGroupNorm", "Relu", "Gelu", "Silu", "Elu", "LeakyRelu", "Hardtanh", "Threshold",
                 "NativeDropout", "Dropout", "Clone", "ToCopy")
_NORMS = ("NativeLayerNorm", "LayerNorm", "NativeBatchNorm", "CudnnBatchNorm", "BatchNorm", "NativeGroupNorm")
# A post-LN transformer layer has two adds, each under a norm, after its input: 5 nodes; a little more.
MAX_DEPTH = 8
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _first_tensor(args: tuple) -> Optional[Tensor]:
    return next((a for a in args if isinstance(a, Tensor)), None)


def _node_of(x: Tensor) -> Any:
    """The autograd node a consumer of `x` links to: its grad_fn, or its AccumulateGrad for a leaf."""
    if x.grad_fn is not None:
        return x.grad_fn
    # A leaf that requires grad has no grad_fn; a view of it does, and its first input is the AccumulateGrad.
    view = x.view_as(x).grad_fn
    return None if view is None else view.next_functions[0][0]


def _kind(node: Any) -> str:
    return type(node).__name__


def skip_path(out: Tensor, x: Tensor) -> Optional[bool]:
    """Whether `out`'s graph adds `x` back within `MAX_DEPTH` pass-through nodes.

    Returns None when `out = ... + x` is not there; else True if a normalization lies between the add
    and the output (post-norm), False if not.
    """
    if out.grad_fn is None or not x.requires_grad:
        return None  # no graph (no_grad, or an input without grad): nothing to read
    target = _node_of(x)
    if target is None:
        return None
    frontier: list[tuple[Any, int, bool]] = [(out.grad_fn, 0, False)]
    seen: set[int] = set()
    while frontier:
        node, depth, normed = frontier.pop()
        if node is None or id(node) in seen or depth > MAX_DEPTH or not _kind(node).startswith(_PASS_THROUGH):
            continue
        seen.add(id(node))
        inputs = [n for n, _ in node.next_functions]
        if _kind(node).startswith("Add") and any(n is target for n in inputs):
            return normed
        normed_here = normed or _kind(node).startswith(_NORMS)
        frontier.extend((n, depth + 1, normed_here) for n in inputs if n is not target)
    return None


class StructureProbe:
    """One-shot forward hooks that find a model's residual modules at its first training forward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.done = False
        self._residual: dict[str, bool] = {}  # name -> post-norm
        self._same_shape: list[str] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules() if name]
        self._handles.append(model.register_forward_hook(self._finish))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            x = _first_tensor(args)
            if self.done or not isinstance(out, Tensor) or x is None or out.shape != x.shape:
                return
            if name not in self._same_shape:
                self._same_shape.append(name)
            if any(True for _ in module.children()):  # a leaf (Linear, LayerNorm) has no skip of its own
                post = skip_path(out, x)
                if post is not None:
                    self._residual.setdefault(name, post)
        return hook

    def _finish(self, _module: nn.Module, _args: tuple, out: Any) -> None:
        # Only a forward that builds a graph is a training forward; an eval pass under no_grad says nothing.
        if torch.is_grad_enabled() and _any_grad(out):
            self.done = True
            self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def facts(self, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
        """What the probe saw (see the module docstring), as JSON values."""
        residual = _innermost(self._residual_names())
        groups = optimizer.param_groups if optimizer is not None else []
        return {"residual": residual, "post_norm": [n for n in residual if self._residual[n]],
                "same_shape": self._same_shape,
                "norm_first": {n: bool(m.norm_first) for n, m in self.model.named_modules()
                               if isinstance(m, _TRANSFORMER_LAYERS)},
                "lr": [_number(g.get("lr")) for g in groups],
                "initial_lr": [_number(g.get("initial_lr")) for g in groups]}


    def _residual_names(self) -> list[str]:
        """The modules seen residual, and the shape-preserving ones of the same classes: a block whose input
        needs no grad (the first, fed the data) shows no skip in the graph, but runs its class's forward."""
        modules = dict(self.model.named_modules())
        classes = {type(modules[n]) for n in self._residual}
        for n in self._same_shape:
            if n not in self._residual and type(modules[n]) in classes:
                self._residual[n] = any(self._residual[r] for r in self._residual
                                        if type(modules[r]) is type(modules[n]))
        return [n for n in modules if n in self._residual]


def _any_grad(out: Any) -> bool:
    if isinstance(out, Tensor):
        return out.grad_fn is not None
    if isinstance(out, (tuple, list)):
        return any(_any_grad(o) for o in out)
    if isinstance(out, dict):
        return any(_any_grad(o) for o in out.values())
    return any(_any_grad(v) for v in getattr(out, "__dict__", {}).values() if isinstance(v, Tensor))


def _innermost(names: list[str]) -> list[str]:
    """Drop a module that contains another listed one: its skip path is its children's (a stack of blocks)."""
    return [n for n in names if not any(o != n and o.startswith(n + ".") for o in names)]


def _number(v: Any) -> Optional[float]:
    if isinstance(v, Tensor):  # a tensor lr (capturable optimizers): one read, at the first step only
        return float(v.detach().cpu())
    return float(v) if isinstance(v, (int, float)) else None
