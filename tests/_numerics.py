"""Rounding-error bounds that the tests' tolerances are computed from.

A tolerance in this suite is never "what one CPU happened to produce". It is one of:
- exact (a maximum, a copy, a multiply done the same way twice);
- a worst-case bound from the standard model of floating-point arithmetic,
  fl(a op b) = (a op b)(1 + d), |d| <= u, computed here from the data's size n and the
  unit roundoff u of the precision the computation ran in (Higham, "Accuracy and Stability
  of Numerical Algorithms", 2nd ed., 2002, ch. 2-4);
- a statistical margin, documented where it is used.

Worst-case bounds hold for any summation order, so they hold whichever vector width,
blocking or thread split a machine's kernels use. They are pessimistic (typical errors
are ~sqrt(n) u, not n u) but machine-independent, which is the point.

Notation: u is the unit roundoff (half the machine epsilon): 2^-24 for float32, 2^-53 for
float64. gamma(k, u) = k u / (1 - k u) bounds |prod_{i<=k} (1 + d_i)^{+-1} - 1| (Higham Lemma 3.1).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np
import torch

U64 = 2.0 ** -53
U32 = 2.0 ** -24
U16 = 2.0 ** -11
UBF16 = 2.0 ** -8

_UNIT = {torch.float64: U64, torch.float32: U32, torch.float16: U16, torch.bfloat16: UBF16}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of a floating dtype: 2^-53 (float64), 2^-24 (float32), 2^-11 (float16), 2^-8 (bfloat16)."""
    return _UNIT[dtype]


def gamma(k: int, u: float = U32) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error of k roundings in a product or sum."""
    k = max(int(k), 0)
    assert k * u < 1, (k, u)
    return k * u / (1 - k * u)


def compose(*rels: float) -> float:
    """The relative error of a chain of steps with relative errors `rels`: prod(1 + r) - 1."""
    out = 1.0
    for r in rels:
        out *= 1.0 + r
    return out - 1.0


def _abs_sum(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().double().abs().sum())
    return float(np.sum(np.abs(np.asarray(x, dtype=np.float64))))


def _count(x) -> int:
    return int(x.numel()) if isinstance(x, torch.Tensor) else int(np.size(x))


def sum_rel(n: int, u: float = U32, run: Optional[int] = None) -> float:
    """Bound on |computed - exact| / sum|x_i| for a sum of n terms, in any order.

    Every term takes part in at most n - 1 additions, so the error is at most
    gamma_{n-1} sum |x_i| whatever the summation tree (Higham section 4.2). With `run`, the sum
    is blocked as the native kernel blocks it: at most `run` terms are added at unit
    roundoff `u` before their partial sum moves to float64, where the block sums are added:
    gamma_{run-1}(u) composed with gamma_{n}(float64).
    """
    if n <= 1:
        return 0.0
    if run is None or run >= n:
        return gamma(n - 1, u)
    return compose(gamma(run - 1, u), gamma(n, U64))


def f32_sum_bound(x, run: Optional[int] = None) -> float:
    """Worst-case absolute error of summing the terms `x` in float32, in any order.

    |fl(sum x_i) - sum x_i| <= gamma_{n-1} sum |x_i|, with u = 2^-24 (see `sum_rel`;
    `run`: the float32 block length when block sums are added in float64).
    The terms are taken as exact (pass the float32 values the kernel reads).
    """
    return sum_rel(_count(x), U32, run) * _abs_sum(x)


def f64_sum_bound(x) -> float:
    """Worst-case absolute error of summing the terms `x` in float64 in any order (a float64 oracle's own error)."""
    return sum_rel(_count(x), U64) * _abs_sum(x)


def sumsq_rel(n: int, u: float = U32, run: Optional[int] = None) -> float:
    """Relative bound on a sum of n squares formed at unit roundoff u.

    One rounding per square, then the sum: each term carries at most 1 + (n - 1) roundings,
    and all terms are >= 0, so |computed - exact| <= gamma_n * exact (relative, no
    cancellation). Blocked (`run`): gamma_run(u) composed with gamma_n(float64).
    A fused multiply-add only removes roundings, so the bound covers it.
    """
    if n == 0:
        return 0.0
    if run is None or run >= n:
        return gamma(n, u)
    return compose(gamma(run, u), gamma(n, U64))


def sqrt_rel(r: float) -> float:
    """If s' = s(1 + t) with |t| <= r, then |sqrt(s') / sqrt(s) - 1| <= 1 - sqrt(1 - r)."""
    return 1.0 - math.sqrt(1.0 - r)


def norm_rel(n: int, u: float = U32, run: Optional[int] = None, sqrt_u: Optional[float] = None,
             out_u: float = U32) -> float:
    """Relative bound on an L2 norm of n entries: squares summed at unit roundoff u (see `sumsq_rel`),
    the square root taken at `sqrt_u` (default u) and the result rounded to `out_u` (default float32).

    sqrt halves the relative error of the sum (`sqrt_rel`); each rounding after it adds u.
    Covers PyTorch's float32 `vector_norm` / `_foreach_norm` (any order, run=None) and the
    native kernel (float32 blocks of 512, float64 sums and sqrt).
    """
    return compose(sqrt_rel(sumsq_rel(n, u, run)), u if sqrt_u is None else sqrt_u, out_u)


def total_norm_rel(per_tensor_rel: float, count: int, u: float = U32) -> float:
    """Relative bound on the L2 norm of `count` computed norms, each within `per_tensor_rel`:
    sqrt(sum (n_i (1 + e_i))^2) is within per_tensor_rel of the exact total, then the norm of
    the norms is itself formed at unit roundoff u (`norm_rel(count, u)`)."""
    return compose(per_tensor_rel, norm_rel(count, u))


def clip_coef_rel(total_rel: float, u: float = U32) -> float:
    """Relative bound on clip_grad_norm_'s coefficient max_norm / (total + 1e-6), formed in float32
    from a total norm within `total_rel`: 1/(1 - r) - 1 for the total's error in the denominator,
    then four roundings (the + 1e-6, the reciprocal, max_norm's own rounding to float32, the product)."""
    return compose(total_rel / (1.0 - total_rel), u, u, u, u)


def rel_diff_tol(rel_a: float, rel_b: float) -> float:
    """rtol for comparing a with b when each is within rel_a, rel_b of the same exact value:
    |a - b| <= (rel_a + rel_b) |x| <= (rel_a + rel_b) / (1 - rel_b) |b|."""
    return (rel_a + rel_b) / (1.0 - rel_b)


def mean_std_bounds(x: torch.Tensor, u: float = U32, run: Optional[int] = None) -> tuple[float, float]:
    """Absolute bounds on the mean and the unbiased std of `x` as the native kernel's input pass forms them.

    The kernel subtracts the first entry s, sums d_i = fl(x_i - s) and fl(d_i^2) at unit roundoff u
    (float32 for float32 and bfloat16 data, float64 for float64) in blocks of `run`, the block sums
    in float64, then in float64 mean = s + S/n, var = (Q - S^2/n)/(n - 1), and rounds the mean and
    sqrt(var) to float32.

    - S: each d_i is off by at most u|x_i - s|, the sum by sum_rel(n, u, run) sum|d_i|:
      eS = compose(u, sum_rel) * sum|x_i - s|.
    - Q: each term carries two roundings from d_i (squared) and one from the square, then the sum:
      eQ = compose(u, u, u, sum_rel) * sum (x_i - s)^2.
    - mean: eS / n, then the float32 rounding u32 |mean|.
    - var: (eQ + (2|S| eS + eS^2) / n) / (n - 1); sqrt moves by at most e / (2 sqrt(var)) (and
      sqrt(e) near 0); then u32 |std|.
    The float64 steps (and the float64 oracle) add gamma_n(u64) relative, included.
    """
    d = x.detach().double().flatten()
    n = d.numel()
    s = float(d[0])
    dev = d - s
    srel = sum_rel(n, u, run)
    e_s = compose(u, srel) * float(dev.abs().sum())
    e_q = compose(u, u, u, srel) * float((dev * dev).sum())
    S = float(dev.sum())
    mean = float(d.mean())
    g64 = gamma(n + 4, U64)
    mean_err = e_s / n + U32 * abs(mean) + g64 * (float(d.abs().sum()) / n + abs(s))
    if n < 2:
        return mean_err, math.nan
    var = float(d.var())
    e_var = (e_q + (2 * abs(S) * e_s + e_s ** 2) / n) / (n - 1) + g64 * (float((dev * dev).sum()) + S * S / n) / (n - 1)
    std = math.sqrt(var)
    e_std = min(e_var / (2 * std), math.sqrt(e_var)) if std > 0 else math.sqrt(e_var)
    return mean_err, e_std + U32 * (std + e_std)


def dot_bound(a: torch.Tensor, b: torch.Tensor, u: float = U32) -> torch.Tensor:
    """Elementwise bound on |fl(a @ b) - a @ b| for float matmul: gamma_k |a| @ |b|, k the inner size
    (one rounding per product, k - 1 additions, any order or blocking; Higham eq. 3.11)."""
    k = a.shape[-1]
    return gamma(k, u) * (a.double().abs() @ b.double().abs())


def probabilistic_sum_rel(n: int, u: float = U32, lam: float = 7.0) -> float:
    """Higham & Mary (2019) probabilistic bound: if the rounding errors are independent, mean-zero
    random variables, a sum of n terms has |error| <= gamma~_n(lam) sum |x_i|,
    gamma~_n(lam) = exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1, with probability at least
    1 - 2 n exp(-lam^2 (1 - u)^2 / 2) (lam = 7: > 1 - 5e-11 n). Used only where a test asserts a
    typical-case precision claim that the worst case cannot show."""
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def assert_within(got: Iterable[float], want: Iterable[float], bound, what: str = "") -> None:
    """|got_i - want_i| <= bound_i elementwise (bound a scalar or one per entry), NaN == NaN."""
    got, want = np.asarray(list(got), dtype=np.float64), np.asarray(list(want), dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), got.shape)
    same_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(got) & (got == want)
    err = np.where(same_nan | same_inf, 0.0, np.abs(got - want))
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: |got - want| > bound at {np.flatnonzero(bad)[:5]}: " \
                          f"got {got[bad][:5]}, want {want[bad][:5]}, bound {bound[bad][:5]}"


def clipped_grad_rel(total_rel: float, clips: int = 1, u: float = U32) -> float:
    """Relative bound on a gradient after `clips` norm clips in a row, each scaling by a coefficient
    formed from a total norm measured within `total_rel` of the exact total of its (already
    perturbed) input: e_j = compose(e_{j-1}, clip_coef_rel(compose(total_rel, e_{j-1})), u), the
    last u for the float32 multiply. (A clip's normalisation partly cancels e_{j-1}; not counted.)"""
    e = 0.0
    for _ in range(clips):
        e = compose(e, clip_coef_rel(compose(total_rel, e), u), u)
    return e


def adam_step_gain(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> list[float]:
    """K_t, t = 1..steps: a bound on |m_hat_t| / sqrt(v_hat_t) (and on sum_i w_i |g_i| / sqrt(v_hat_t)) for Adam.

    m_hat_t = sum_i a_i g_i, v_hat_t = sum_i b_i g_i^2 with a_i = (1 - beta1) beta1^(t-i) / (1 - beta1^t),
    b_i = (1 - beta2) beta2^(t-i) / (1 - beta2^t); by Cauchy-Schwarz sum a_i |g_i| <= sqrt(sum a_i^2 / b_i)
    sqrt(v_hat_t). So a relative change <= r of every gradient moves Adam's update lr m_hat / (sqrt(v_hat) + eps)
    by at most 2 r lr K_t (r K_t through m_hat, r K_t through sqrt(v_hat)), first order in r.
    """
    out = []
    for t in range(1, steps + 1):
        s = 0.0
        for i in range(1, t + 1):
            a = (1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t)
            b = (1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t)
            s += a * a / b
        out.append(math.sqrt(s))
    return out


def adam_drift_atol(grads, dgrads, weights, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
    """First-order bound, per entry, on how far two Adam runs from the same weights on the same batches
    drift apart when step t's gradients (|grads[t]|, what Adam is fed) differ by at most dgrads[t].

    With bias-corrected weights a_s (first moment) and b_s (second), V = sum b_s g_s^2 and
    D = sqrt(sum b_s dg_s^2) >= |sqrt(V') - sqrt(V)| (the triangle inequality), the step
    lr m_hat / (sqrt(v_hat) + eps) moves by <= lr (sum a_s |dg_s| + sum a_s |g_s| D / sqrt(V)) / (sqrt(V) + eps);
    Adam's own ~10 roundings of the step on either side add 2 gamma_10 of it; each side rounds w - step
    once (u (|w| + step)). Summed over the steps: the feedback of a weight difference into the next
    gradient (H dw) is second order over a few small steps and left out. `weights[t]`: |w| at step t.
    """
    out = torch.zeros_like(grads[0])
    for t in range(1, len(grads) + 1):
        a = [(1 - beta1) * beta1 ** (t - s) / (1 - beta1 ** t) for s in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - s) / (1 - beta2 ** t) for s in range(1, t + 1)]
        m_abs = sum(ai * g.abs() for ai, g in zip(a, grads[:t]))
        dm = sum(ai * d for ai, d in zip(a, dgrads[:t]))
        root = torch.sqrt(sum(bi * g * g for bi, g in zip(b, grads[:t])))
        d_root = torch.sqrt(sum(bi * d * d for bi, d in zip(b, dgrads[:t])))
        step = lr * m_abs / (root + eps)
        d_step = lr * (dm + m_abs * d_root / root.clamp_min(1e-300)) / (root + eps)
        out = out + d_step + 2 * gamma(10) * step + 2 * U32 * (weights[t - 1] + step)
    return out


def torch_mean_std_bounds(x: torch.Tensor) -> tuple[float, float]:
    """Absolute bounds on PyTorch's float32 `x.mean()` and `x.std()` against float64, any reduction order.

    mean: a float32 sum of n terms (gamma_{n-1} sum |x|), the division and the stored value (u each).
    var: the two-pass and the updating (Welford) algorithms both keep the sum of squared deviations
    within ~n u sum x_i^2 (Chan, Golub & LeVeque 1983; Higham section 1.9): gamma_{2n} sum x_i^2, over n - 1.
    std: sqrt moves by at most e / (2 std) (sqrt(e) near 0), then u.
    """
    d = x.detach().double().flatten()
    n = d.numel()
    mean, std = float(d.mean()), float(d.std())
    e_mean = gamma(n - 1) * float(d.abs().sum()) / n + 2 * U32 * abs(mean)
    e_var = gamma(2 * n) * float((d * d).sum()) / (n - 1)
    e_std = min(e_var / (2 * std), math.sqrt(e_var)) if std > 0 else math.sqrt(e_var)
    return e_mean, e_std + U32 * (std + e_std)


def orthogonality_bound(m: int, n: int, gain: float = 1.0, u: float = U32) -> float:
    """Entrywise bound on |W W^T - gain^2 I| where W^T (or W) = gain x the Q of a Householder QR of an
    m x n matrix, m >= n (torch.nn.init.orthogonal_), W W^T formed in float32 (inner length m).

    Higham Thm 19.4: each column of the computed Q is within gamma~_{mn} = c m n u / (1 - c m n u) of an
    exactly orthonormal one; with c = 1 (Higham leaves c a small constant; the bound is far from tight,
    a random matrix's Q is orthonormal to ~sqrt(m) u). Then an entry of Q^T Q is within 2 g + g^2 of the
    identity's, the gain adds one rounding per factor and the dot products of length m add gamma_m.
    """
    g = gamma(m * n, u)
    return gain * gain * (compose(2 * g + g * g, u, u) + gamma(m, u) * (1 + g) ** 2)
