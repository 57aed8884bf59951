"""The doctor (`graddoctor.doctor`) on three of the seeds' pathologies: it runs each broken training run,
diagnoses it, tries the remedies diagnose ranks and the controls (lower lr, warmup, clipping), and prescribes
the one that trains best.

- a deep sigmoid MLP whose gradient vanishes (seed 000: sigmoid's derivative is at most 0.25 per layer);
- an exploding ReLU RNN, recurrent weight = identity, over 50 steps (seed 002: exploding gradients in RNNs);
- dead ReLUs: every bias at -4, so most units never fire (seed 003: "neurons die irreversibly").
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, cast

import numpy as np
import torch
from torch import Tensor, nn

from ..doctor import doctor as run_doctor
from ..doctor._html import figures as rx_figures
from ..doctor._prescription import Prescription
from ..doctor._ranking import cleared
from ._types import Context, Figure, experiment, result

NAME = "doctor"
STEPS = 100
MARGIN = 0.9  # the best prescription's final loss must be below 0.9 x the baseline's
CASES = {"sigmoid_mlp": "deep sigmoid MLP (10 layers, SGD lr 0.1)",
         "exploding_rnn": "ReLU RNN, recurrent weight = identity, 50 steps (SGD lr 0.01)",
         "dead_relu": "ReLU MLP with every bias at -4 (5 layers, He init, SGD lr 0.05)"}


def _teacher(seed: int, n_in: int = 16, n_out: int = 4, n: int = 8192) -> tuple[Tensor, Tensor]:
    """Labels drawn from softmax(x W / 2) (Gumbel-max): a task with a loss floor above 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    logits = x @ torch.randn(n_in, n_out, generator=g) / 2
    return x, (logits - torch.log(-torch.log(torch.rand(n, n_out, generator=g)))).argmax(1)


def _fixed(x: Tensor, y: Tensor, seed: int, bs: int = 64) -> Callable:
    """The same STEPS batches on every call (each trial trains on the same data)."""
    g = torch.Generator().manual_seed(seed)
    data = [(x[i], y[i]) for i in (torch.randint(0, len(x), (bs,), generator=g) for _ in range(STEPS))]
    return lambda: iter(data)


def _mlp(depth: int, act: type[nn.Module], lr: float, he: bool = False, bias: float | None = None) -> Callable:
    def build():
        sizes = [16] + [32] * (depth - 1) + [4]
        layers: list[nn.Module] = []
        for i in range(depth):
            lin = nn.Linear(sizes[i], sizes[i + 1])
            if he:
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            if bias is not None:
                nn.init.constant_(lin.bias, bias)
            layers += [lin] + ([act()] if i < depth - 1 else [])
        model = nn.Sequential(*layers)
        return model, torch.optim.SGD(model.parameters(), lr=lr)
    return build


class IRNN(nn.Module):
    """A ReLU RNN whose recurrent weight starts as the identity: over 50 steps its gradient explodes."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            cast(Tensor, self.rnn.weight_hh_l0).copy_(torch.eye(32))
            cast(Tensor, self.rnn.bias_hh_l0).zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _rnn_build():
    model = IRNN()
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def _case(name: str, seed: int) -> tuple[Callable, Callable, Callable]:
    """(build, batches, loss_fn) of one pathology; the data depend on the seed."""
    if name == "exploding_rnn":
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(512, 50, 4, generator=g)  # target: the mean of channel 0 plus half the last channel 1
        return _rnn_build, _fixed(x, x[:, :, 0].mean(1, keepdim=True) + 0.5 * x[:, -1, 1:2], seed, 32), \
            nn.functional.mse_loss
    data = _fixed(*_teacher(seed), seed + 1)
    if name == "sigmoid_mlp":
        return _mlp(10, nn.Sigmoid, 0.1), data, nn.functional.cross_entropy
    return _mlp(5, nn.ReLU, 0.05, he=True, bias=-4.0), data, nn.functional.cross_entropy


def _seeds(preset: str) -> int:
    return {"quick": 1, "default": 2, "full": 3}[preset]


def _max_trials(preset: str) -> int:
    return {"quick": 3, "default": 3, "full": 8}[preset]


@experiment(NAME, "The doctor: try the cures, measure them, prescribe",
            "On a deep sigmoid MLP (vanishing), an exploding RNN and dead ReLUs, the doctor's best prescription "
            "trains clearly better than the broken run as given and clears its critical findings.",
            "graddoctor issue 17; seeds 000 (sigmoid), 002 (exploding RNN), 003 (dead ReLUs)",
            runs=lambda preset: len(CASES) * _seeds(preset), order=95)
def run(ctx: Context):
    seeds = [ctx.seed + k for k in range(_seeds(ctx.preset))]
    rxs: dict[tuple[str, int], Prescription] = {}
    for name in CASES:
        for s in seeds:
            build, batches, loss_fn = _case(name, s)
            rxs[name, s] = run_doctor(build, batches, loss_fn, steps=STEPS, max_trials=_max_trials(ctx.preset),
                                      out=ctx.run_dir(NAME, f"{name}_s{s}"), workers=1, seed=s, progress=False)
            ctx.tick(f"{NAME}/{name}/seed {s}")
    m = _metrics(rxs, seeds)
    ok = all(c["beats_baseline"] and c["critical_cleared"] and c["prescribed"] for per in m["cases"].values()
             for c in per)
    measured = " ".join(
        f"{name.replace('_', ' ')}: " + "; ".join(
            f"{c['best']} {c['best_final_loss']:.3g} vs baseline {c['baseline_final_loss']:.3g} "
            f"(critical {', '.join(c['baseline_critical']) or 'none'}: "
            f"{'cleared' if c['critical_cleared'] else 'LEFT'})"
            for c in per) + "." for name, per in m["cases"].items())
    runs = [Path(t.run_dir) for rx in rxs.values() for t in ((rx.baseline,) if rx.best is rx.baseline
                                                             else (rx.baseline, rx.best))]
    return result(NAME, measured, ok, m, _figures(rxs, seeds), runs, ctx,
                  notes=(f"gd.doctor with {STEPS} steps per trial, max_trials={_max_trials(ctx.preset)}, one process; "
                         f"seeds {seeds} (the seed sets the weights and the data). " +
                         "; ".join(f"{k}: {v}" for k, v in CASES.items()) + ". The lab diagnoses each case's baseline "
                         "and best trial; every trial's findings are in its prescription.json."),
                  rule=(f"on every pathology and seed the doctor prescribes a remedy whose final loss is finite and "
                        f"below {MARGIN} x the baseline's (any finite loss, if the baseline's is not) and which "
                        "leaves none of the baseline's critical findings."))


def _metrics(rxs: dict, seeds: list[int]) -> dict:
    cases: dict[str, list[dict]] = {}
    for (name, s), rx in rxs.items():
        cases.setdefault(name, []).append({
            "seed": s, "best": rx.best.remedy, "best_final_loss": rx.best.final_loss,
            "baseline_final_loss": rx.baseline.final_loss,
            "best_over_baseline": best_over_baseline(rx), "beats_baseline": beats(rx),
            "baseline_findings": list(rx.baseline.findings), "baseline_critical": list(rx.baseline.critical),
            "best_findings": list(rx.best.findings), "critical_cleared": bool(cleared(rx.best, rx.baseline)),
            "prescribed": bool(rx.prescribed), "trials": [t.remedy for t in rx.trials],
            "trial_final_loss": {t.remedy: t.final_loss for t in rx.trials}, "out": rx.out})
    return {"steps": STEPS, "seeds": seeds, "margin": MARGIN, "cases": cases}


def _figures(rxs: dict, seeds: list[int]) -> list[Figure]:
    """For the first seed of each case: the doctor's own figures (loss panels, a heat map per trial)."""
    figs: list[Figure] = []
    for name, what in CASES.items():
        rx = rxs[name, seeds[0]]
        own = rx_figures(rx)
        head = (f"{what}: baseline {rx.baseline.final_loss:.3g} ({', '.join(rx.baseline.findings) or 'healthy'}); "
                f"prescribed {rx.best.remedy} ({rx.best.final_loss:.3g}). Tried: " +
                ", ".join(f"{t.remedy} {t.final_loss:.3g}" for t in rx.trials))
        own[0] = Figure(f"doctor on the {name.replace('_', ' ')} (seed {seeds[0]})", own[0].data,
                        head + ". " + own[0].caption)
        figs += own
    return figs


def best_over_baseline(rx: Prescription) -> float:
    """The best trial's final loss over the baseline's (NaN when the baseline's is not finite)."""
    b = rx.baseline.final_loss
    return float(rx.best.final_loss / b) if np.isfinite(b) else float("nan")


def beats(rx: Prescription) -> bool:
    """The best trial's final loss is finite and below MARGIN x the baseline's (any finite loss beats a
    baseline that went non-finite)."""
    best, base = rx.best.final_loss, rx.baseline.final_loss
    return bool(np.isfinite(best) and (not np.isfinite(base) or best < MARGIN * base))
