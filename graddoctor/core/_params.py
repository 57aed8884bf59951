"""Which parameters watch measures, and the models and gradients it refuses (by name, before writing)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .._errors import NoGradientsError, UnsupportedModelError


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / torch.compile wrappers, so names match an unwrapped run."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper, whose step hooks watch registers.

    Accelerate's `AcceleratedOptimizer` subclasses `torch.optim.Optimizer` without running its
    constructor (it has no `_optimizer_step_post_hooks`); Lightning's `LightningOptimizer` wraps
    the optimizer as `_optimizer`. Each is unwrapped to the optimizer that really steps.
    """
    while optimizer is not None:
        if type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        elif type(optimizer).__name__ == "LightningOptimizer" and hasattr(optimizer, "_optimizer"):
            optimizer = optimizer._optimizer
        else:
            return optimizer
    return None


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def watched_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, parameter) of every trainable parameter watch records, in the order of every per-tensor vector."""
    inner = unwrap(model)
    named: list[tuple[str, Tensor]] = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    if not named:
        raise NoGradientsError(f"{type(inner).__name__} has no parameter with requires_grad=True; nothing to watch")
    return named


def check_measurable(model: nn.Module, named: list[tuple[str, Tensor]], run_dir: Optional[str | Path]) -> None:
    """Refuse, by name, parameters whose gradients watch cannot measure: complex, sparse, meta-device."""
    for name, p in named:
        if p.is_complex():
            raise UnsupportedModelError(f"parameter {name!r} is {str(p.dtype).replace('torch.', '')}: "
                                        "graddoctor watches real floating-point parameters "
                                        "(float16/bfloat16/float32/float64) only")
        if not p.is_floating_point():
            raise UnsupportedModelError(f"parameter {name!r} has dtype {str(p.dtype).replace('torch.', '')}: "
                                        "graddoctor watches real floating-point parameters only")
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) is True and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            raise UnsupportedModelError(f"module {name or type(module).__name__!r} is "
                                        f"{type(module).__name__}(sparse=True), whose gradients are sparse: "
                                        "graddoctor measures dense gradients; use "
                                        "sparse=False (the default) to watch this model")
    if run_dir is not None and any(p.device.type == "meta" for _, p in named):
        raise UnsupportedModelError("the model's parameters are on the meta device, which holds no values to record: "
                                    "materialize them first (model.to_empty(device=...) and initialize), or pass "
                                    "run_dir=None")


def check_dense_grads(names: list[str], params: list[Tensor]) -> None:
    for name, p in zip(names, params):
        if p.grad is not None and p.grad.layout != torch.strided:
            raise UnsupportedModelError(f"parameter {name!r} has a {str(p.grad.layout).replace('torch.', '')} "
                                        "gradient: graddoctor measures dense (strided) gradients only; for "
                                        "nn.Embedding use sparse=False (the default)")
