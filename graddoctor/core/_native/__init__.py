"""The optional native kernels: every statistic watch needs from a CPU tensor, in one read of it.

Entry points (see fused_stats.c): `grad_stats` (a step's gradients), `norms` (weight
norms), `copy_norms` (weight snapshot and its norms), `diff_norms` (update norms),
`input_row` (input batches), `scale_` (a clipping multiply), and `sumsq_maxabs` (the raw
float64 sums, for tests). `grad_stats` also takes the weight norms in the gradients' pass.

Why: on a CPU, `watch`'s statistics pass is bound by memory and by arithmetic width.
PyTorch has no single op that returns both an L2 norm and a max-abs, so the portable
path (`graddoctor.core._stats`) reads every gradient twice. `fused_stats.c` reads it once,
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
blocks and the block sums in float64, so a norm is within gamma_512(u) (about 3e-5
relative, worst case) of the exact value; tests/test_native.py checks that bound against float64.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

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

# Loaded by the first `_scan` that needs it: the kernel calls below come after a scan that
# succeeded, so `_lib` is set there (their `type: ignore[union-attr]`: a check per call would
# cost time inside every training step, and mypy cannot see the order).
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
    lib.gd_clip_scale.argtypes = [i64, p, p, p, f64, p, i32]
    for f in (lib.gd_pass, lib.gd_norms, lib.gd_grad_stats, lib.gd_input_row, lib.gd_scale, lib.gd_clip_scale):
        f.restype = ctypes.c_int
    return lib


def _load() -> Optional[ctypes.CDLL]:
    """Load the library, building it first if this CPU has none in the cache. Tried once per process."""
    global _lib, _loaded, _status
    if _loaded:
        return _lib
    _loaded = True
    errors = []
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"graddoctor-{uid}"):
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

# Plain tensors only: a tensor subclass (DTensor, a quantized wrapper) may have no flat data behind data_ptr().
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
# array.array type codes for the C side's `void *` and int64_t ("q", long long, is 64-bit everywhere).
_POINTER_CODE = next(code for code in "QLI" if array(code).itemsize == ctypes.sizeof(ctypes.c_void_p))


class _Scan(NamedTuple):
    """What a kernel call needs of a list of tensors, gathered by `_scan` in one loop."""

    pointers: array   # data pointers, unsigned, of the platform's pointer size
    numels: array     # entry counts, int64
    dtype: torch.dtype

    def args(self) -> tuple[int, int]:
        """The addresses of the pointer and size arrays, for ctypes (valid while self lives)."""
        return self.pointers.buffer_info()[0], self.numels.buffer_info()[0]


def _scan(tensors: Sequence[Tensor], writable: bool = False) -> Optional[_Scan]:
    """Check that the kernels can read `tensors`, and gather their data pointers and sizes.

    Readable: plain tensors of one dtype (float32/float64/bfloat16), on the CPU, dense
    (contiguous or channels-last). `writable` also refuses tensors that require grad, whose
    in-place changes autograd must see. None where a tensor does not qualify.

    One plain Python loop does it all, because inside a training step each attribute read
    costs about a microsecond: the separate loops (check, sizes, ctypes pointer array) this
    replaces cost ~120 us per list there, this one ~60 us (BENCHMARKS.md).
    """
    if not _enabled or not tensors:
        return None
    dtype = getattr(tensors[0], "dtype", None)
    if dtype not in _DTYPE_CODES or (_lib is None and _load() is None):
        return None
    pointers, numels = [], []
    for t in tensors:
        # is_contiguous() first: the common case, without the call into _dense's other layouts
        if not (type(t) in _PLAIN_TYPES and t.is_cpu and t.dtype == dtype and (t.is_contiguous() or _dense(t))
                and not (writable and t.requires_grad)):
            return None
        pointers.append(t.data_ptr())
        numels.append(t.numel())
    return _Scan(array(_POINTER_CODE, pointers), array("q", numels), dtype)


def supports(tensors: Sequence[Tensor]) -> bool:
    """Whether the kernels can read these tensors (plain tensors of one dtype, CPU, dense, float32/float64/bfloat16)."""
    return _scan(tensors) is not None


def _dense(t: Tensor) -> bool:
    """Whether `t`'s entries fill exactly `numel` consecutive slots from `data_ptr()`.

    Norms, maxima and counts do not depend on the order of the entries, so a
    channels-last gradient (what a conv net trained in channels_last gets) is read
    as it lies in memory, with no copy.
    """
    return (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
            or t.is_contiguous(memory_format=torch.channels_last_3d))


def _pair(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Optional[tuple[_Scan, _Scan]]:
    """Scans of `xs` and `ys` if entry i of every x lies where entry i of its y does (so they pair up in memory)."""
    a, b = _scan(xs), _scan(ys)
    if a is None or b is None or len(xs) != len(ys) or a.dtype != b.dtype:
        return None
    if not all(x.shape == y.shape and x.stride() == y.stride() for x, y in zip(xs, ys)):
        return None
    return a, b


def sumsq_maxabs(tensors: Sequence[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
    """float64 [n] sums of squares and [n] max-abs of each tensor, from one read of each.

    None when the kernel cannot be used for these tensors (see `supports`). A NaN entry
    makes its tensor's sum of squares NaN, an Inf makes it Inf; max-abs skips NaN.
    """
    scan = _scan(tensors)
    if scan is None:
        return None
    rows = torch.empty((len(tensors), 6), dtype=torch.float64)
    pointers, numels = scan.args()
    code = _lib.gd_pass(_STATS, len(tensors), pointers, None, numels,  # type: ignore[union-attr]
                        _DTYPE_CODES[scan.dtype], 1.0, rows.data_ptr(), torch.get_num_threads())
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
    g = _scan(tensors)
    if g is None:
        return None
    w = _scan(weights) if weights is not None else None
    if w is not None and (w.dtype != g.dtype or w.numels != g.numels):
        w = None
    n = len(tensors)
    floats = torch.empty(3 * n + 1 if w is not None else 2 * n + 1, dtype=torch.float32)  # one allocation
    count = torch.empty(n, dtype=torch.int64)
    base = floats.data_ptr()
    pointers, numels = g.args()
    code = _lib.gd_grad_stats(n, pointers, w.args()[0] if w is not None else None, numels,  # type: ignore[union-attr]
                              _DTYPE_CODES[g.dtype], base, base + 4 * n, count.data_ptr(), base + 8 * n,
                              base + 4 * (2 * n + 1) if w is not None else None, torch.get_num_threads())
    if code:
        return None
    return floats[:n], floats[n:2 * n], count, floats[2 * n], floats[2 * n + 1:] if w is not None else None


def _norms(pass_: int, xs: Sequence[Tensor], ys: Optional[Sequence[Tensor]]) -> Optional[Tensor]:
    scans = _pair(xs, ys) if ys is not None else (_scan(xs), None)
    if scans is None:
        return None
    x, y = scans
    if x is None:
        return None
    norm = torch.empty(len(xs), dtype=torch.float32)
    pointers, numels = x.args()
    code = _lib.gd_norms(pass_, len(xs), pointers, y.args()[0] if y is not None else None,  # type: ignore[union-attr]
                         numels, _DTYPE_CODES[x.dtype], 1.0, norm.data_ptr(), torch.get_num_threads())
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
    scan = _scan(tensors, writable=True)
    if scan is None or scan.dtype != torch.float32:
        return False
    pointers, numels = scan.args()
    if _lib.gd_scale(len(tensors), pointers, numels, coef, torch.get_num_threads()):  # type: ignore[union-attr]
        return False
    increment_version(tensors)  # written behind autograd's back: tell it, as an in-place op would
    return True


def clip_scale_(tensors: Sequence[Tensor], total: Tensor, max_norm: float) -> Optional[Tensor]:
    """Clip float32 tensors in place by their global norm `total`, as `clip_grad_norm_` does.

    Returns the float32 0-d coefficient `clamp(max_norm / (total + 1e-6), max=1)`, formed in the
    kernel bit for bit as PyTorch forms it, after multiplying every tensor by it (skipped when it
    is exactly 1). None, with nothing changed, where the kernel cannot (then use PyTorch's ops):
    tensors `scale_` refuses, or a `total` that is not a float32 CPU scalar.
    """
    if not (type(total) is Tensor and total.is_cpu and total.dtype == torch.float32 and total.numel() == 1):
        return None
    scan = _scan(tensors, writable=True)
    if scan is None or scan.dtype != torch.float32:
        return None
    coef = torch.empty((), dtype=torch.float32)
    pointers, numels = scan.args()
    code = _lib.gd_clip_scale(len(tensors), pointers, numels, total.data_ptr(), max_norm,  # type: ignore[union-attr]
                              coef.data_ptr(), torch.get_num_threads())
    if code < 0:
        return None
    if code == 0:
        increment_version(tensors)  # written behind autograd's back: tell it, as an in-place op would
    return coef


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
