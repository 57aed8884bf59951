"""The optional native kernels: every statistic watch needs from a CPU tensor, in one read of it.

Entry points (see fused_stats.c): `grad_stats` (a step's gradients), `norms` (weight
norms), `copy_norms` (weight snapshot and its norms), `diff_norms` (update norms),
`input_row` (input batches), `scale_` (a clipping multiply), and `sumsq_maxabs` (the raw
float64 sums, for tests). `grad_stats` also takes the weight norms in the gradients' pass.

Why: on a CPU, `watch`'s statistics pass is bound by memory and by arithmetic width.
PyTorch has no single op that returns both an L2 norm and a max-abs, so the portable
path (`graddoctor._stats`) reads every gradient twice. `fused_stats.c` reads it once,
with the vector width of the machine it runs on (BENCHMARKS.md has the numbers).

How it is built: on first use, with the system C compiler (`$CC`, else `cc`), as
`cc -O3 -march=native -fopenmp -shared -fPIC`, into a cache directory
(`$GRADDOCTOR_CACHE_DIR`, else `$XDG_CACHE_HOME/graddoctor`, else `~/.cache/graddoctor`),
under a name that hashes the source, the flags and this CPU, so a cache shared by
different machines never runs code built for another CPU. It needs no PyTorch
headers and compiles in well under a second. The OpenMP runtime it links is the
`libgomp.so.1` PyTorch has already loaded, so it shares PyTorch's threads.

When it is not used (everything still works, on the PyTorch path):
- `GRADDOCTOR_NATIVE=0` in the environment, or `set_enabled(False)`;
- no working C compiler (the reason is kept in `status()`);
- tensors that are not on the CPU, not dense (contiguous or channels-last), not
  float32/float64/bfloat16, or a tensor subclass (a DTensor's local shard is read, not the DTensor).

Results differ from PyTorch's `_foreach_norm` only in rounding: squares are summed in
blocks and the block sums in float64, which is closer to the exact value than
PyTorch's float32 reduction (tests/test_native.py checks both against float64).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

_SOURCE = Path(__file__).with_name("fused_stats.c")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# Flag sets tried in order: the fastest first; each later one drops something a compiler may lack.
# Without -march=native the loop is compiled for the oldest CPU of the architecture, which on x86-64
# made it slower than PyTorch (SSE2: 1.6 ms against 0.5 ms with AVX-512, BENCHMARKS.md), so a compiler
# without an OpenMP runtime (Apple's clang) keeps -march=native and runs on one thread instead;
# -fopenmp-simd still honours the `omp simd` reductions, which vectorize the loops.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp-simd"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)

_lib: Optional[ctypes.CDLL] = None
_loaded = False  # whether loading has been tried in this process
_status = "not loaded yet"
_enabled = os.environ.get("GRADDOCTOR_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(enabled: bool) -> bool:
    """Turn the native kernel on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def status() -> str:
    """A line saying whether the native kernel is in use, and if not, why."""
    if not _enabled:
        return "native kernel: off (GRADDOCTOR_NATIVE=0 or set_enabled(False)); statistics use PyTorch ops"
    _load()
    return _status


def prepare() -> None:
    """Build (first use on this CPU) and load the kernel now, so no training step waits for the compiler."""
    if _enabled:
        _load()


def _cache_dir() -> Path:
    if os.environ.get("GRADDOCTOR_CACHE_DIR"):
        return Path(os.environ["GRADDOCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graddoctor"


def _cpu_fingerprint() -> str:
    """What identifies this CPU's instruction set: -march=native code must not run elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _library_path(directory: Path, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_fingerprint().encode(),
                 sys.platform.encode(), platform.machine().encode()):
        key.update(part)
    return directory / f"fused_stats-{key.hexdigest()[:16]}.so"


def _compile(flags: tuple[str, ...], target: Path) -> Optional[str]:
    """Build the library at `target` (atomically: ranks of one job may race). Returns an error or None."""
    compiler = os.environ.get("CC", "cc")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(_SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return f"{compiler} {' '.join(flags)} failed: {done.stderr.strip()[-300:]}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"{compiler} could not be run: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    f64 = ctypes.c_double
    lib.gd_pass.argtypes = [i32, i64, p, p, p, i32, f64, p, i32]
    lib.gd_norms.argtypes = [i32, i64, p, p, p, i32, f64, p, i32]
    lib.gd_grad_stats.argtypes = [i64, p, p, p, i32, p, p, p, p, p, i32]
    lib.gd_input_row.argtypes = [p, i64, i32, p, i32]
    lib.gd_scale.argtypes = [i64, p, p, f64, i32]
    for f in (lib.gd_pass, lib.gd_norms, lib.gd_grad_stats, lib.gd_input_row, lib.gd_scale):
        f.restype = ctypes.c_int
    return lib


def _load() -> Optional[ctypes.CDLL]:
    """Load the library, building it first if this CPU has none in the cache. Tried once per process."""
    global _lib, _loaded, _status
    if _loaded:
        return _lib
    _loaded = True
    errors = []
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"graddoctor-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        for flags in _FLAG_SETS:
            path = _library_path(directory, flags)
            try:
                if not path.exists():
                    error = _compile(flags, path)
                    if error:
                        errors.append(error)
                        continue
                _lib = _open(path)
                _status = f"native kernel: in use ({path}, built with {' '.join(flags)})"
                return _lib
            except OSError as e:  # unwritable cache directory, or a library that does not load
                errors.append(f"{path}: {e}")
    _status = "native kernel: unavailable, statistics use PyTorch ops; " + " | ".join(errors[-3:])
    return None


# The passes of fused_stats.c that gd_pass and gd_norms take here, and the columns of gd_pass's rows used here.
_STATS, _COPY, _DIFF = 0, 1, 2
SUMSQ, MAXABS = 0, 1
_numels_cache: dict[tuple, Tensor] = {}
# Plain tensors only: a tensor subclass (DTensor, a quantized wrapper) may have no flat data behind data_ptr().
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def supports(tensors: Sequence[Tensor]) -> bool:
    """Whether the kernels can read these tensors (plain tensors of one dtype, CPU, dense, float32/float64/bfloat16)."""
    if not _enabled or not tensors:
        return False
    dtype = getattr(tensors[0], "dtype", None)
    if dtype not in _DTYPE_CODES or (_lib is None and _load() is None):
        return False
    for t in tensors:  # a plain loop: this runs every step, and generator overhead shows here
        if not (type(t) in _PLAIN_TYPES and t.is_cpu and t.dtype == dtype and _dense(t)):
            return False
    return True


def _dense(t: Tensor) -> bool:
    """Whether `t`'s entries fill exactly `numel` consecutive slots from `data_ptr()`.

    Norms, maxima and counts do not depend on the order of the entries, so a
    channels-last gradient (what a conv net trained in channels_last gets) is read
    as it lies in memory, with no copy.
    """
    return (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
            or t.is_contiguous(memory_format=torch.channels_last_3d))


def _pointers(tensors: Sequence[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _same_layout(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> bool:
    """Whether entry i of every x lies where entry i of its y does (so they pair up in memory)."""
    return (len(xs) == len(ys) and supports(ys) and ys[0].dtype == xs[0].dtype
            and all(a.shape == b.shape and a.stride() == b.stride() for a, b in zip(xs, ys)))


def _numels(xs: Sequence[Tensor], key: Optional[tuple] = None) -> Tensor:
    key = key or tuple(t.numel() for t in xs)
    numels = _numels_cache.get(key)
    if numels is None:  # the same model gives the same sizes every step: build the array once
        if len(_numels_cache) >= 256:  # inputs of varying size (sequence lengths) must not grow it forever
            _numels_cache.clear()
        numels = _numels_cache[key] = torch.tensor(key, dtype=torch.int64)
    return numels


def sumsq_maxabs(tensors: Sequence[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
    """float64 [n] sums of squares and [n] max-abs of each tensor, from one read of each.

    None when the kernel cannot be used for these tensors (see `supports`). A NaN entry
    makes its tensor's sum of squares NaN, an Inf makes it Inf; max-abs skips NaN.
    """
    if not supports(tensors):
        return None
    rows = torch.empty((len(tensors), 6), dtype=torch.float64)
    code = _lib.gd_pass(_STATS, len(tensors), _pointers(tensors), None, _numels(tensors).data_ptr(),  # type: ignore[union-attr]
                        _DTYPE_CODES[tensors[0].dtype], 1.0, rows.data_ptr(), torch.get_num_threads())
    return None if code else (rows[:, SUMSQ], rows[:, MAXABS])  # -1: no scratch memory


def grad_stats(tensors: Sequence[Tensor], weights: Optional[Sequence[Tensor]] = None
               ) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]]:
    """A step's gradient statistics from one read of each tensor, ready to store.

    Returns float32 [n] L2 norms, float32 [n] max-abs (NaN where a tensor holds a NaN),
    int64 [n] counts of NaN/Inf entries, the float32 0-d total norm (the L2 norm of the
    norms), and float32 [n] L2 norms of `weights`, read side by side with the gradients in
    the same pass (None if no weights were given, or if they do not pair up with the
    tensors: same dtype and sizes, in order). None when the kernel cannot read `tensors`
    (see `supports`).
    """
    if not supports(tensors):
        return None
    n = len(tensors)
    key = tuple(t.numel() for t in tensors)
    if weights is not None and not (supports(weights) and weights[0].dtype == tensors[0].dtype
                                    and tuple(w.numel() for w in weights) == key):
        weights = None
    floats = torch.empty(3 * n + 1 if weights is not None else 2 * n + 1, dtype=torch.float32)  # one allocation
    count = torch.empty(n, dtype=torch.int64)
    base = floats.data_ptr()
    code = _lib.gd_grad_stats(n, _pointers(tensors), _pointers(weights) if weights is not None else None,  # type: ignore[union-attr]
                              _numels(tensors, key).data_ptr(), _DTYPE_CODES[tensors[0].dtype], base, base + 4 * n,
                              count.data_ptr(), base + 8 * n, base + 4 * (2 * n + 1) if weights is not None else None,
                              torch.get_num_threads())
    if code:
        return None
    return floats[:n], floats[n:2 * n], count, floats[2 * n], floats[2 * n + 1:] if weights is not None else None


def _norms(pass_: int, xs: Sequence[Tensor], ys: Optional[Sequence[Tensor]]) -> Optional[Tensor]:
    if not supports(xs) or (ys is not None and not _same_layout(xs, ys)):
        return None
    norm = torch.empty(len(xs), dtype=torch.float32)
    code = _lib.gd_norms(pass_, len(xs), _pointers(xs), _pointers(ys) if ys is not None else None,  # type: ignore[union-attr]
                         _numels(xs).data_ptr(), _DTYPE_CODES[xs[0].dtype], 1.0, norm.data_ptr(), torch.get_num_threads())
    return None if code else norm


def norms(tensors: Sequence[Tensor]) -> Optional[Tensor]:
    """float32 [n] L2 norms of the tensors (one read of each), or None where the kernel cannot read them."""
    return _norms(_STATS, tensors, None)


def copy_norms(src: Sequence[Tensor], dst: Sequence[Tensor]) -> Optional[Tensor]:
    """Copy each `src` tensor into `dst` and return float32 [n] L2 norms of `src` (one read of each)."""
    return _norms(_COPY, src, dst)


def diff_norms(a: Sequence[Tensor], b: Sequence[Tensor]) -> Optional[Tensor]:
    """float32 [n] L2 norms of `a - b` (the difference taken in the tensors' dtype), nothing written."""
    return _norms(_DIFF, a, b)


def scale_(tensors: Sequence[Tensor], coef: float) -> bool:
    """Multiply float32 tensors in place by `coef` (a float32 value); False if the kernel cannot.

    Each product is one float32 multiply, as `torch._foreach_mul_` by a float32 coefficient
    makes it, so the result is the same bit for bit. Measured inside a training step it was
    never slower than `_foreach_mul_`, and at times several times faster (BENCHMARKS.md).
    Tensors that require grad are left to PyTorch (autograd must see the op). The version
    counters are bumped, as an in-place PyTorch op would bump them. On False nothing was
    changed.
    """
    if not supports(tensors) or tensors[0].dtype != torch.float32 or any([t.requires_grad for t in tensors]):
        return False
    code = _lib.gd_scale(len(tensors), _pointers(tensors), _numels(tensors).data_ptr(), coef,  # type: ignore[union-attr]
                         torch.get_num_threads())
    if code:
        return False
    increment_version(tensors)  # written behind autograd's back: tell it, as an in-place op would
    return True


def input_row(x: Tensor) -> Optional[Tensor]:
    """float32 [4]: max-abs, NaN/Inf count, mean, unbiased std of one tensor, from one read.

    Max-abs is NaN if `x` holds a NaN; mean and std are NaN or Inf if it holds a NaN or Inf,
    as PyTorch's would be; std is NaN for a single entry (as `Tensor.std`); an empty tensor
    gives four NaNs. Mean and variance are summed after subtracting the first entry, so a
    batch far from zero keeps its digits. None where the kernel cannot read `x`.
    """
    if not supports((x,)):
        return None
    row = torch.empty(4, dtype=torch.float32)
    code = _lib.gd_input_row(x.data_ptr(), x.numel(), _DTYPE_CODES[x.dtype], row.data_ptr(),  # type: ignore[union-attr]
                             torch.get_num_threads())
    return None if code else row
