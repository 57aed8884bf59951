"""Fused per-tensor statistics: one pass per statistic over all tensors, kept on the device.

This is the hot path of `watch`. Everything here runs inside a training step,
so nothing here copies a value to the host: results are device tensors that
the watcher buffers until its next flush.

How the pass is fused (the pattern of `torch.nn.utils.clip_grad_norm_`):
- tensors are grouped by (device, dtype);
- on the CPU, a list of dense float32/float64/bfloat16 tensors is measured by the
  native kernel (`graddoctor.core._native`): one read of each tensor gives its L2 norm
  and max-abs, and one call returns every statistic finished, because inside a
  training step each further tensor op costs tens of microseconds (BENCHMARKS.md).
  Lists it cannot take whole (missing gradients, mixed dtypes) go by group of
  (device, dtype). Everything below is the PyTorch path, used elsewhere and
  whenever the kernel is off or unavailable;
- on CUDA, float32/float16/bfloat16 groups are measured by one Triton kernel
  (`graddoctor.core._triton_stats`) whenever `triton` imports: one read of each
  tensor gives its L2 norm, max-abs and exact non-finite count, two launches per group;
- otherwise each group gets one `torch._foreach_norm` call for the L2 norms;
- max-abs uses the fused `_foreach_norm(ord=inf)` off the CPU; on the CPU that
  kernel is a slow fallback (measured 13x slower), so a per-tensor
  `amax/amin` pair is used there instead;
- non-finite entries: on the CPU, tensors with a non-finite norm (the norms are in host
  memory there) get an exact `count_nonzero(t * 0)` (0*x is 0 for every finite x, NaN
  for NaN and +-Inf). Off the CPU without Triton (other accelerators, `meta`) the count
  is a flag: 1 where the tensor holds at least one NaN or +-Inf, read off the norm (NaN)
  and the max-abs (Inf) already computed, so it costs no read, no temporary and no sync;
  an exact count there would cost a further pass and a full-size temporary per tensor,
  or a host branch (a sync) to take it only on bad steps;
- results are stacked into one vector per statistic, in the order of the
  tensor list, on one "stats device".

Sharded tensors (DTensor, as produced by FSDP2) are measured on their local
shard and then combined across the ranks that hold the other shards: squared
norms and counts are summed, maxima are maxed, as `clip_grad_norm_` does for
DTensor. That is one collective per statistic, on the device, no host sync.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, TypeGuard, cast

import torch
from torch import Tensor

from . import _native, _triton_stats

if TYPE_CHECKING:  # never imported at run time (see dtensor_type)
    from torch.distributed.tensor import DTensor


def dtensor_type() -> Optional[type]:
    """DTensor's class if `torch.distributed.tensor` is loaded, else None.

    A DTensor cannot exist before its module is imported, so graddoctor never imports it itself:
    the import costs about a second of start-up (`graddoctor --help` included).
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)

_MISSING_COUNT = -1  # nonfinite count recorded for a tensor that had no gradient this step


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor statistics of one list of tensors, as device tensors.

    Attributes:
      norm: float32 [P], L2 norm of each tensor (NaN where the tensor was None).
      maxabs: float32 [P], largest absolute entry (NaN where the tensor has a NaN or was None).
      nonfinite: int64 [P], count of NaN/+-Inf entries (-1 where the tensor was None); on the
        PyTorch path off the CPU (no Triton), 1 for a tensor holding at least one (a lower bound).
      total_norm: float32 0-d, L2 norm over all present tensors, formed as
        `torch.nn.utils.get_total_norm` does (norm of the stacked norms; bit for bit
        equal to it on the PyTorch path, equal to rounding with the native kernel).
      present: host-side tuple, True where the tensor was not None.
    """

    norm: Tensor
    maxabs: Tensor
    nonfinite: Tensor
    total_norm: Tensor
    present: tuple[bool, ...]


def _local_and_reduce_groups(t: Tensor) -> tuple[Tensor, tuple]:
    """The local shard of `t` and the process groups its shards are spread over."""
    if is_dtensor(t):
        from torch.distributed.tensor import Replicate
        if any(p.is_partial() for p in t.placements):
            # Unreduced partial sums cannot be combined as norms: reduce them first (a collective).
            t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
        mesh = t.device_mesh
        groups = tuple(mesh.get_group(i) for i, p in enumerate(t.placements) if p.is_shard())
        return t.to_local(), groups
    return t, ()


def group_by_device_dtype(tensors: Sequence[Optional[Tensor]]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the tensors grouped by (device, dtype), groups in order of first appearance,
    indices ascending within a group; None entries (missing gradients) belong to no group.

    The one grouping behind every fused pass (`torch._foreach_*` takes one device and dtype per call).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _foreach_l2(ts: list[Tensor]) -> list[Tensor]:
    # Half-precision tensors accumulate in float32; float64 keeps its own precision.
    wide = ts[0].dtype in (torch.float16, torch.bfloat16)
    return list(torch._foreach_norm(ts, 2, dtype=torch.float32 if wide else None))


def _maxabs(ts: list[Tensor], device: torch.device) -> Tensor:
    if device.type != "cpu":
        if all(t.numel() for t in ts):
            return torch.stack(torch._foreach_norm(ts, math.inf))
        # The inf-norm of an empty tensor is an error; its max-abs is 0, as on the CPU.
        found = iter(torch._foreach_norm([t for t in ts if t.numel()], math.inf) if any(t.numel() for t in ts) else [])
        return torch.stack([next(found) if t.numel() else t.new_zeros(()) for t in ts])
    # The fused inf-norm has no fast CPU kernel (measured 13x slower), and `_foreach_max`
    # is slower there than a loop of amax (0.34 vs 0.20 ms on the benchmark MLP).
    if any(t.numel() == 0 for t in ts):
        return torch.stack([torch.maximum(t.amax(), t.amin().neg()) if t.numel() else t.new_zeros(()) for t in ts])
    lo_hi = [torch.aminmax(t) for t in ts]  # one read of each tensor for both ends
    return torch.maximum(torch.stack([hi for _, hi in lo_hi]), torch.stack([lo for lo, _ in lo_hi]).neg())


def _nonfinite_counts(ts: list[Tensor], norm: Tensor, maxabs: Tensor, device: torch.device) -> Tensor:
    """Non-finite entries per tensor: an exact count on the CPU, a 0/1 flag elsewhere (see the module doc).

    A tensor holds a NaN exactly where its L2 norm is NaN (squares of finite values overflow
    to +Inf, never to NaN), and otherwise an Inf exactly where its max-abs is Inf; a finite
    tensor whose squares overflow has an Inf norm but a finite max-abs, and counts 0.
    On the CPU, where the norms sit in host memory and reading them waits for no device, the
    flagged tensors (usually none) are then counted exactly with `count_nonzero(t * 0)`.
    """
    flag = norm.isnan() | maxabs.isinf()
    if device.type != "cpu":
        return flag.long()
    count = torch.zeros(len(ts), dtype=torch.int64)
    if not bool(flag.any()):  # the common case: one check, no count
        return count
    for i in flag.nonzero().flatten().tolist():
        count[i] = torch.count_nonzero(ts[i] * 0)
    return count


def _fused_kernel(ts: list[Tensor], device: torch.device,
                  dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """Norm, max-abs and non-finite count from one read of each tensor: the native kernel on the CPU,
    the Triton kernel on CUDA; None where neither applies (the PyTorch path)."""
    if device.type == "cpu":
        native = _native.grad_stats(ts)
        if native is not None:
            return native[0], native[1], native[2]
    if _triton_stats.available(device, dtype):
        return _triton_stats.fused_stats(ts)
    return None


def _measure_local(tensors: list[Tensor], stats_device: torch.device):
    """Norm, max-abs and non-finite count of each tensor, in the order given."""
    parts, order = [], []
    for (device, _dtype), idx in group_by_device_dtype(tensors).items():
        ts = [tensors[i] for i in idx]
        fused = _fused_kernel(ts, device, _dtype)
        if fused is not None:
            norm, maxabs, count = fused
        else:
            norm = torch.stack(_foreach_l2(ts)).float()
            maxabs = _maxabs(ts, device).float()
            count = _nonfinite_counts(ts, norm, maxabs, device)
        parts.append([v.to(stats_device, non_blocking=True) for v in (norm, maxabs, count)])
        order += idx
    if len(parts) == 1 and order == sorted(order):
        return tuple(parts[0])
    # Several groups: concatenate, then put each entry back at its tensor's position.
    index = _cached_index(tuple(sorted(range(len(order)), key=order.__getitem__)), stats_device)
    return tuple(torch.cat([p[k] for p in parts])[index] for k in range(3))


def _reduce_shards(norm: Tensor, maxabs: Tensor, count: Tensor, reduce_groups: list[tuple]) -> tuple:
    """Combine per-shard statistics across ranks (sum of squares, max, sum of counts)."""
    import torch.distributed as dist

    for pgs in sorted(set(g for g in reduce_groups if g), key=id):
        mask = torch.tensor([g == pgs for g in reduce_groups], device=norm.device)
        for pg in pgs:
            sq = torch.where(mask, norm.square(), 0.0)
            mx = torch.where(mask, maxabs, 0.0)
            ct = torch.where(mask, count, 0)
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pg)
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=pg)
            dist.all_reduce(ct, op=dist.ReduceOp.SUM, group=pg)
            norm = torch.where(mask, sq.sqrt(), norm)
            maxabs = torch.where(mask, mx, maxabs)
            count = torch.where(mask, ct, count)
    return norm, maxabs, count


@torch.no_grad()  # statistics never join the autograd graph (cheaper than a detach per tensor)
def tensor_stats(tensors: Sequence[Optional[Tensor]], stats_device: torch.device) -> TensorStats:
    """Measure a list of tensors (None entries allowed) in one fused pass.

    No host sync, unless a tensor is a DTensor with a Partial placement, which
    is redistributed first.

    Args:
      tensors: gradients, weights or update deltas; None marks a missing tensor.
      stats_device: where the result vectors live.
    Returns:
      A `TensorStats` whose vectors have one entry per input, None entries included.
    """
    whole = _native_whole_list(tensors, None, stats_device)
    if whole is not None:
        return whole[0]
    present = tuple(t is not None for t in tensors)
    locals_: list[Tensor] = [t for t in tensors if t is not None]
    groups: list[tuple] = []
    cls = dtensor_type()
    if cls is not None and any(isinstance(t, cls) for t in locals_):
        locals_, groups = map(list, zip(*(_local_and_reduce_groups(t) for t in locals_)))
    if locals_:
        norm, maxabs, count = _measure_local(locals_, stats_device)
        if any(groups):
            norm, maxabs, count = _reduce_shards(norm, maxabs, count, groups)
        # Max reductions do not always propagate NaN; the L2 norm does, so make
        # max-abs NaN exactly where the tensor holds a NaN.
        maxabs = torch.where(norm.isnan(), norm, maxabs)
        total = torch.linalg.vector_norm(norm, 2)
    else:
        empty = torch.zeros(0, device=stats_device)
        norm, maxabs, count = empty, empty, empty.long()
        total = torch.zeros((), device=stats_device)
    if all(present):
        return TensorStats(norm, maxabs, count, total, present)
    return TensorStats(*_scatter_missing(norm, maxabs, count, present), total, present)


def _native_whole_list(tensors: Sequence[Optional[Tensor]], weights: Optional[Sequence[Tensor]],
                       stats_device: torch.device) -> Optional[tuple[TensorStats, Optional[Tensor]]]:
    """The common CPU case in one native call and a few tensor ops: all tensors present, plain,
    dense, of one dtype. Inside a training step each tensor op costs tens of microseconds
    (BENCHMARKS.md), so this skips the grouping below. None where it does not apply."""
    if stats_device.type != "cpu":
        return None
    # A None (a tensor with no gradient) is not a plain tensor, so the kernel's scan refuses the list.
    native = _native.grad_stats(tensors, weights)  # type: ignore[arg-type]
    if native is None:
        return None
    return TensorStats(*native[:4], present=(True,) * len(tensors)), native[4]


def grad_and_weight_stats(grads: Sequence[Optional[Tensor]], weights: Sequence[Tensor],
                          stats_device: torch.device) -> tuple[TensorStats, Tensor]:
    """`tensor_stats(grads)` and `l2_norms(weights)`. No host sync.

    On the CPU the native kernel reads each gradient and its weight side by side in one
    pass, which costs less than two passes one after the other (BENCHMARKS.md).
    """
    whole = _native_whole_list(grads, weights, stats_device)
    if whole is not None:
        stats, weight_norms = whole
        return stats, weight_norms if weight_norms is not None else l2_norms(weights, stats_device)
    return tensor_stats(grads, stats_device), l2_norms(weights, stats_device)


def _scatter_missing(norm: Tensor, maxabs: Tensor, count: Tensor,
                     present: tuple[bool, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Expand vectors over present tensors to vectors over all tensors (NaN / -1 where missing)."""
    nan = norm.new_full((1,), math.nan)
    missing = count.new_full((1,), _MISSING_COUNT)
    order, k, n_present = [], 0, len(norm)
    for p in present:
        order.append(k if p else n_present)  # index n_present is the filler appended below
        k += p
    index = _cached_index(tuple(order), norm.device)
    return (torch.cat([norm, nan])[index], torch.cat([maxabs, nan])[index], torch.cat([count, missing])[index])


_INDEX_CACHE: dict[tuple, Tensor] = {}


def _cached_index(order: tuple, device: torch.device) -> Tensor:
    # One host-to-device copy per distinct pattern of missing gradients, then reused.
    key = (order, device)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = torch.tensor(order, dtype=torch.long, device=device)
    return _INDEX_CACHE[key]


def l2_norms(tensors: Sequence[Tensor], stats_device: torch.device) -> Tensor:
    """float32 [P] L2 norm of each tensor (sharded tensors combined across ranks). No host sync.

    The cheap companion of `tensor_stats` for weights and updates, where max-abs
    and non-finite counts are not needed.
    """
    if stats_device.type == "cpu":
        native = _native.norms(tensors)  # one call, no per-tensor ops, where the kernel can read them all
        if native is not None:
            return native
    locals_, groups = zip(*(_local_and_reduce_groups(t.detach()) for t in tensors)) if tensors else ((), ())
    out: list[Optional[Tensor]] = [None] * len(locals_)
    for (device, _dtype), idx in group_by_device_dtype(locals_).items():
        ts = [locals_[i] for i in idx]
        native = _native.norms(ts) if device.type == "cpu" else None
        norms = native.unbind() if native is not None else _foreach_l2(ts)
        for j, i in enumerate(idx):
            out[i] = norms[j].to(stats_device, torch.float32, non_blocking=True)
    if not out:
        return torch.zeros(0, device=stats_device)
    norm = torch.stack(cast(list[Tensor], out))  # every index is in one of the groups, so none is left None
    if any(groups):
        zeros = torch.zeros_like(norm)
        norm, _, _ = _reduce_shards(norm, zeros, zeros.long(), list(groups))
    return norm
