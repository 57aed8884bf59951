"""The accelerator pass: one Triton kernel reads a whole list of tensors once and returns, per tensor,
the L2 norm, the max-abs and the exact count of non-finite entries.

Multi-tensor style (as PyTorch's `_foreach` kernels and apex's `multi_tensor_apply`): the tensors of one
(device, dtype) group are addressed from the first one's pointer plus a per-tensor element offset, and
every program of the first kernel reads one chunk of one tensor, so a list of any length costs two
launches. The first kernel writes one partial (sum of squares, max-abs, count) per chunk; the second,
one program per tensor, adds its chunks' partials in a fixed order (deterministic, no atomics) and takes
the square root.

Numerics: entries are widened to float32 and their squares summed in float32, as `_foreach_norm`
does for float32 and half types, so the same float32 accumulation bound holds (in any order).
Max-abs is exact. Counts are exact (int32 per chunk, int64 per tensor).

Costs per call, for the host: the table of chunks (which tensor, where it starts) depends only on the
sizes and is made once per list of sizes; the per-tensor offsets depend on the gradients' addresses and
are copied to the device from pinned memory, asynchronously, only when an address changed (the caching
allocator usually hands a step's gradients the same addresses as the last step's). No host sync.

Used for CUDA tensors whenever `triton` imports (it ships with PyTorch's CUDA wheels). The tests run the
same kernels on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, see `enable_on`).
"""
from __future__ import annotations

import importlib
import os
from contextlib import nullcontext
from functools import lru_cache
from typing import Any, Optional

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels read; other dtypes take the PyTorch path
_BLOCK = 1024  # entries per vector op of the first kernel
_CHUNK_BLOCKS = 8  # vector ops per program: one program reads 8192 entries (32 KiB of float32)
_FINISH_BLOCK = 128  # partials a program of the second kernel adds per vector op

_device_types: set[str] = {"cuda"}  # where `available` sends tensors to the kernels (tests add "cpu")


def enable_on(device_types: set[str]) -> set[str]:
    """Set the device types the kernels are used for; returns the previous set.

    Only "cuda" by default. The tests add "cpu" under `TRITON_INTERPRET=1` to run the kernels on CPU
    tensors; on the CPU itself the native kernel is faster, so nothing else should.
    """
    global _device_types
    previous, _device_types = _device_types, set(device_types)
    return previous


@lru_cache(maxsize=1)
def _triton() -> Optional[Any]:
    try:
        import triton
    except Exception:  # missing, or present but broken (no driver): the PyTorch path is used
        return None
    return triton


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where `fused_stats` measures tensors of this device and dtype."""
    return device.type in _device_types and dtype in DTYPES and _triton() is not None


_KERNELS: dict[bool, tuple[Any, Any]] = {}


def _kernels() -> tuple[Any, Any]:
    """The two kernels, made on first use. `triton.jit` decides at decoration time whether a kernel is
    compiled or interpreted, so they are made per value of TRITON_INTERPRET."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret not in _KERNELS:
        _KERNELS[interpret] = _make_kernels(_triton())
    return _KERNELS[interpret]


tl: Any = None  # triton.language, imported on first use: the interpreter finds it in this module's globals


def _make_kernels(triton: Any) -> tuple[Any, Any]:
    global tl
    tl = importlib.import_module("triton.language")

    @triton.jit
    def chunk_partials(base, offsets, numels, chunk_tensor, chunk_start, sumsq, maxabs, count,
                       BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_start + c)  # int64: tensors may hold more than 2^31 entries
        n = tl.load(numels + t)
        ptr = base + tl.load(offsets + t)
        acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
        acc_max = tl.zeros([BLOCK], dtype=tl.float32)
        acc_bad = tl.zeros([BLOCK], dtype=tl.int32)
        for k in range(CHUNK_BLOCKS):
            idx = start + k * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
            ax = tl.abs(x)
            acc_sq += x * x
            acc_max = tl.maximum(acc_max, ax)
            acc_bad += (~(ax < float("inf"))).to(tl.int32)  # NaN compares false, so it counts too
        tl.store(sumsq + c, tl.sum(acc_sq, axis=0))
        tl.store(maxabs + c, tl.max(acc_max, axis=0))
        tl.store(count + c, tl.sum(acc_bad, axis=0))

    @triton.jit
    def finish(first_chunk, sumsq, maxabs, count, norm_out, maxabs_out, count_out, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        lo = tl.load(first_chunk + t)
        hi = tl.load(first_chunk + t + 1)
        acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
        acc_max = tl.zeros([BLOCK], dtype=tl.float32)
        acc_bad = tl.zeros([BLOCK], dtype=tl.int64)
        for b in range(lo, hi, BLOCK):
            idx = b + tl.arange(0, BLOCK)
            m = idx < hi
            acc_sq += tl.load(sumsq + idx, mask=m, other=0.0)
            acc_max = tl.maximum(acc_max, tl.load(maxabs + idx, mask=m, other=0.0))
            acc_bad += tl.load(count + idx, mask=m, other=0).to(tl.int64)
        tl.store(norm_out + t, tl.sqrt_rn(tl.sum(acc_sq, axis=0)))
        tl.store(maxabs_out + t, tl.max(acc_max, axis=0))
        tl.store(count_out + t, tl.sum(acc_bad, axis=0))

    return chunk_partials, finish


def _chunk_table(numels: tuple[int, ...], device: torch.device, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each tensor's size; for each chunk, the tensor it belongs to and its first entry; each tensor's
    first chunk (and the end)."""
    key = (numels, device, chunk)
    if key not in _TABLES:
        per = [-(-n // chunk) for n in numels]  # an empty tensor has no chunk: its partials sum to 0
        tensor_of = [t for t, k in enumerate(per) for _ in range(k)]
        start_of = [j * chunk for k in per for j in range(k)]
        first = [0]
        for k in per:
            first.append(first[-1] + k)
        _TABLES[key] = (_to_device(list(numels), torch.int64, device), _to_device(tensor_of, torch.int32, device),
                        _to_device(start_of, torch.int64, device), _to_device(first, torch.int32, device))
    return _TABLES[key]


_TABLES: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
_OFFSETS: dict[tuple, Tensor] = {}


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":  # pinned + non_blocking: an asynchronous copy (a pageable one waits for the device)
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _offsets(ts: list[Tensor], base_tensor: Tensor) -> Optional[Tensor]:
    """Each tensor's first entry, in elements from `base_tensor`'s; None if one is not a whole
    number of elements away (never for tensors of one dtype from an allocator that aligns to it)."""
    item = base_tensor.element_size()
    base = base_tensor.data_ptr()
    # An empty tensor is never read (it has no chunk), and its address may be anything: offset 0.
    deltas = [t.data_ptr() - base if t.numel() else 0 for t in ts]
    if any(d % item for d in deltas):
        return None
    key = (base_tensor.device, item, base, tuple(deltas))
    if key not in _OFFSETS:
        if len(_OFFSETS) >= 64:  # addresses that keep changing: keep the cache small
            _OFFSETS.clear()
        _OFFSETS[key] = _to_device([d // item for d in deltas], torch.int64, ts[0].device)
    return _OFFSETS[key]


def fused_stats(ts: list[Tensor], block: int = _BLOCK, chunk_blocks: int = _CHUNK_BLOCKS
                ) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """float32 L2 norms, float32 max-abs and int64 non-finite counts of tensors of one device and dtype
    (in `DTYPES`), on that device, in two kernel launches. No host sync.

    Max-abs of a tensor holding a NaN is not specified here (the caller sets it to NaN from the norm).
    None if the tensors cannot be addressed from one base (the caller takes the PyTorch path).
    `block` and `chunk_blocks` (powers of two) size the programs; the tests shrink them to make many
    chunks out of small tensors.
    """
    triton = _triton()
    ts = [t if t.is_contiguous() else t.contiguous() for t in ts]  # a copy, only for a strided gradient
    base = next((t for t in ts if t.numel()), ts[0])  # the pointer the offsets count from: one that is read
    device = ts[0].device
    offsets = _offsets(ts, base)
    if triton is None or offsets is None:
        return None
    numels = tuple(t.numel() for t in ts)
    numel_t, chunk_tensor, chunk_start, first = _chunk_table(numels, device, block * chunk_blocks)
    n_chunks, n = len(chunk_start), len(ts)
    sumsq = torch.empty(n_chunks, dtype=torch.float32, device=device)
    maxabs = torch.empty(n_chunks, dtype=torch.float32, device=device)
    count = torch.empty(n_chunks, dtype=torch.int32, device=device)
    out = (torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device),
           torch.empty(n, dtype=torch.int64, device=device))
    chunk_partials, finish = _kernels()
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():  # Triton launches on the current one
        if n_chunks:
            chunk_partials[(n_chunks,)](base, offsets, numel_t, chunk_tensor, chunk_start, sumsq, maxabs, count,
                                        BLOCK=block, CHUNK_BLOCKS=chunk_blocks)
        finish[(n,)](first, sumsq, maxabs, count, *out, BLOCK=_FINISH_BLOCK)
    return out


