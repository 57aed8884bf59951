"""Seed 000: the chain x0 -> b1 -> b2 -> b3 -> b4 -> C of single sigmoid neurons.

    dC/db1 = s'(z1) w2 s'(z2) w3 s'(z3) w4 s'(z4) dC/da4

(seed 000 writes w2 twice in this product; the chain rule gives w2, w3, w4.)
We train the chain with SGD and `watch`, and at every step compare each bias
gradient from this analytic product with autograd's and with the norm watch
recorded. With weights of ordinary size every factor |w s'(z)| is below 1
(s' is at most 0.25), so the gradient shrinks toward the input; with weights
of 8 and biases that put z near 0, each factor is about 2 and it grows.
"""
from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from ..core._compose import watch
from ..report import _plots as P
from ..store._run import open_run
from ._types import Context, Figure, experiment, result

NAME = "chain"
U64, U32 = 2.0 ** -53, 2.0 ** -24  # unit roundoff of float64 and float32
# exp is accurate to 1 ulp (2u relative) in glibc, SLEEF's u10 functions (PyTorch's vectorized CPU exp)
# and numpy's SIMD loops; the bound below allows that much for every exp.
EXP_REL = 2 * U64


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def chain_net(w: list[float], b: list[float]) -> nn.Sequential:
    """Four Linear(1, 1) + Sigmoid pairs in float64 with the given weights and biases."""
    layers: list[nn.Module] = []
    for wi, bi in zip(w, b):
        lin = nn.Linear(1, 1).double()
        with torch.no_grad():
            lin.weight.fill_(wi)
            lin.bias.fill_(bi)
        layers += [lin, nn.Sigmoid()]
    return nn.Sequential(*layers)


def analytic_bias_grads(w: np.ndarray, b: np.ndarray, x0: float, y: float) -> np.ndarray:
    """dC/db_i for C = (a4 - y)^2 / 2 from the product of seed 000 (a naive loop, no autograd)."""
    a: float | np.ndarray = x0
    zs = []
    for wi, bi in zip(w, b):
        z = wi * a + bi
        zs.append(z)
        a = sigmoid(z)
    upstream = a - y  # dC/da4
    grads = np.zeros(len(w))
    for i in reversed(range(len(w))):
        ds = sigmoid(zs[i]) * (1 - sigmoid(zs[i]))
        grads[i] = ds * upstream
        upstream = grads[i] * w[i]  # dC/da_{i-1} = dC/dz_i * w_i
    return grads


def rounding_bound(w: np.ndarray, b: np.ndarray, x0: float, y: float) -> np.ndarray:
    """First-order bound on the relative error of each dC/db_i as `analytic_bias_grads` forms it in float64.

    Autograd runs the same operations (z = w a + b, s = 1 / (1 + exp(-z)), s' = s (1 - s), products
    back to front), so each of the two is within this bound of the exact value and they differ by at
    most twice it. Each rounding is at most u = 2^-53 relative (a fused multiply-add only removes
    some), exp at most EXP_REL. Forward, with da the absolute error of a and dz that of z:
      dz_i <= |w_i| da_{i-1} + u |w_i a_{i-1}| + u |z_i|
      rel(s_i) <= (1 - s_i)(EXP_REL + dz_i) + 2u        (exp(-z) / (1 + exp(-z)) = 1 - s)
      rel(1 - s_i) <= s_i rel(s_i) / (1 - s_i) + u       (cancellation: large where s is near 1)
      rel(s'_i) <= rel(s_i) + rel(1 - s_i) + u
    Backward: rel(a_4 - y) <= da_4 / |a_4 - y| + u, and each product adds u:
      rel(dC/db_i) <= rel(a_4 - y) + sum_{j >= i} rel(s'_j) + (2 (4 - i) + 1) u.
    Second-order terms (u^2) are left out; they are ~1e-16 of these.
    """
    a, da, parts = float(x0), 0.0, []
    for wi, bi in zip(w, b):
        z = wi * a + bi
        dz = abs(wi) * da + U64 * abs(wi * a) + U64 * abs(z)
        s = float(sigmoid(z))
        rel_s = (1 - s) * (EXP_REL + dz) + 2 * U64
        rel_1ms = s * rel_s / (1 - s) + U64 if s < 1 else np.inf
        parts.append(rel_s + rel_1ms + U64)
        a, da = s, s * rel_s
    rel_up = da / abs(a - y) + U64 if a != y else np.inf
    n = len(parts)
    return np.array([rel_up + sum(parts[i:]) + (2 * (n - 1 - i) + 1) * U64 for i in range(n)])


# The L2 norm watch records for a one-element float64 gradient: a square, a sqrt (u each, the sqrt
# halving the square's) and the rounding to float32.
WATCH_REL = (1 + 0.5 * U64) * (1 + U64) * (1 + U32) - 1


def _params(net: nn.Sequential) -> tuple[np.ndarray, np.ndarray]:
    lins = [m for m in net if isinstance(m, nn.Linear)]
    return (np.array([m.weight.item() for m in lins]), np.array([m.bias.item() for m in lins]))


def train_chain(net: nn.Sequential, run_dir, steps: int, x0: float, y: float, lr: float) -> dict[str, np.ndarray]:
    """SGD on one example; returns analytic and autograd bias gradients per step, [steps, 4] each."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    x, t = torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[y]], dtype=torch.float64)
    ana, auto, bound = [], [], []
    with watch(net, opt, run_dir, overwrite=True, flush_every=50, activation_every=5, live_diagnosis=False) as w:
        for _ in range(steps):
            loss = 0.5 * ((net(x) - t) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            ana.append(analytic_bias_grads(*_params(net), x0, y))
            bound.append(rounding_bound(*_params(net), x0, y))
            # backward() above set every bias's .grad
            auto.append([cast(Tensor, m.bias.grad).item() for m in net if isinstance(m, nn.Linear)])
            opt.step()
    return {"analytic": np.array(ana), "autograd": np.array(auto), "bound": np.array(bound)}


def recorded_bias_norms(run_dir) -> np.ndarray:
    """|dC/db_i| per step as recorded by watch (the L2 norm of a one-element gradient is its magnitude)."""
    with open_run(run_dir) as run:
        return np.stack([run.tensor_history(f"{2 * i}.bias").grad_norm for i in range(4)], axis=1)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _over(a: np.ndarray, b: np.ndarray, rel: np.ndarray) -> float:
    """max |a - b| / (rel |b|): how much of its rounding bound the difference uses (0 where a == b)."""
    err = np.abs(a - b)
    return float(np.max(np.where(err == 0, 0.0, err / np.maximum(rel * np.abs(b), 1e-300))))


@experiment(NAME, "Seed 000: the chain of four sigmoid neurons",
            "dC/db1 = s'(z1) w2 s'(z2) w3 s'(z3) w4 s'(z4) dC/da4; s' <= 0.25, so with small weights the "
            "gradient shrinks toward the input (vanishing); with large weights it grows (exploding).",
            "seed 000; Nielsen, Neural Networks and Deep Learning, ch. 5", runs=lambda preset: 2, order=0)
def run(ctx: Context):
    steps = ctx.pick(20, 50, 100)
    rng = np.random.default_rng(ctx.seed)
    cases = {"small weights (N(0,1))": (rng.normal(0, 1, 4), rng.normal(0, 1, 4)),
             # w = 8 and b = -4 put every z near 0 for a ~ 0.5, where s' = 0.25: each factor |w s'| ~ 2.
             "large weights (w=8)": (np.full(4, 8.0), np.array([-8.0, -4.0, -4.0, -4.0]))}
    x0, y, out, runs = 1.0, 0.0, {}, []
    for label, (w, b) in cases.items():
        key = "small" if label.startswith("small") else "large"
        run_dir = ctx.run_dir(NAME, key)
        g = train_chain(chain_net(list(w), list(b)), run_dir, steps, x0, y, lr=0.5)
        g["recorded"] = recorded_bias_norms(run_dir)
        out[key] = g
        runs.append(run_dir)
        ctx.tick(f"{NAME}/{key}")
    m = _metrics(out)
    ok = (m["autograd_err_over_bound"] <= 1 and m["watch_err_over_bound"] <= 1
          and m["small_b1_over_b4"] < 1 and m["large_b1_over_b4"] > 1)
    measured = (f"analytic vs autograd: max relative error {m['max_rel_err_autograd']:.1e} (watch's float32 record: "
                f"{m['max_rel_err_watch']:.1e}); |dC/db1|/|dC/db4| = {m['small_b1_over_b4']:.3g} with small weights, "
                f"{m['large_b1_over_b4']:.3g} with w = 8.")
    return result(NAME, measured, ok, m, _figures(out, cases), runs, ctx,
                  notes="Seed 000's printed product repeats w2; the chain rule (and autograd) uses w2, w3, w4.",
                  rule=("analytic vs autograd within twice the float64 rounding bound of the product "
                        "(chain.rounding_bound, ~1e-15 here), watch's float32 record within that plus float32 "
                        "rounding, and |dC/db1|/|dC/db4| < 1 with small weights but > 1 with w = 8."))


def _metrics(out: dict) -> dict:
    m = {}
    m["max_rel_err_autograd"] = max(_rel_err(o["autograd"], o["analytic"]) for o in out.values())
    m["max_rel_err_watch"] = max(_rel_err(o["recorded"], np.abs(o["analytic"])) for o in out.values())
    # the errors over their bounds (<= 1 expected): analytic and autograd each within `bound` of the exact value
    m["autograd_err_over_bound"] = max(_over(o["autograd"], o["analytic"], 2 * o["bound"]) for o in out.values())
    m["watch_err_over_bound"] = max(
        _over(o["recorded"], np.abs(o["analytic"]), (1 + 2 * o["bound"]) * (1 + WATCH_REL) - 1) for o in out.values())
    for k, o in out.items():
        g0 = np.abs(o["analytic"][0])
        m[f"{k}_abs_grad_b1_to_b4_step0"] = g0.tolist()
        m[f"{k}_b1_over_b4"] = float(g0[0] / g0[3])
    return m


def _figures(out: dict, cases: dict) -> list[Figure]:
    fig, axes = P.figure(2)
    for ax, (key, label) in zip(axes, zip(out, cases)):
        o = out[key]
        P.bars(ax, ["b1", "b2", "b3", "b4"], {"analytic product": np.abs(o["analytic"][0]),
                                              "autograd": np.abs(o["autograd"][0]),
                                              "recorded by watch": o["recorded"][0]},
               f"|dC/db_i| at step 0, {label}", "|dC/db| (log)", log=True)
        ax.set_xlabel("bias (b1 nearest the input)")
    figs = [Figure("Per-bias gradients: analytic product vs autograd vs watch", P.to_uri(fig),
                   "Left: every factor |w s'(z)| < 1, so the gradient shrinks toward the input. Right: w = 8 makes "
                   "each factor about 2, so it grows.")]
    fig, axes = P.figure(2)
    for ax, key in zip(axes, out):
        g = np.abs(out[key]["recorded"])
        for i in range(4):
            P.line(ax, np.arange(len(g)), g[:, i], label=f"b{i + 1}", log=True)
        ax.set(xlabel="training step", ylabel="|dC/db| (log)", title=f"bias gradients over training ({key} weights)")
        ax.legend()
    figs.append(Figure("Bias gradients during training (as recorded by watch)", P.to_uri(fig)))
    figs.append(Figure("Sigmoid and tanh with their derivatives", _activation_plot(),
                       "The sigmoid's derivative peaks at 0.25 and is near 0 beyond |z| > 4; tanh' peaks at 1."))
    return figs


def _activation_plot() -> str:
    z = np.linspace(-6, 6, 241)
    s, t = sigmoid(z), np.tanh(z)
    fig, axes = P.figure(2)
    for ax, (name, f, df, peak) in zip(axes, [("sigmoid", s, s * (1 - s), 0.25), ("tanh", t, 1 - t ** 2, 1.0)]):
        ax.plot(z, f, label=name)
        ax.plot(z, df, label=f"{name}' (max {peak:g})")
        ax.axhline(peak, color="grey", linestyle=":", linewidth=0.8)
        ax.set(xlabel="pre-activation z", ylabel="value", title=f"{name}(z) and its derivative")
        ax.legend()
    return P.to_uri(fig)
