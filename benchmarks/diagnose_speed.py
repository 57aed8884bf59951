"""Time `graddoctor diagnose` on a synthetic 100k-step x 200-tensor run store.

The store is written with graddoctor's own RunWriter (real SQLite, chunks of 50 steps, as
`watch` writes them): per-step loss, global norm, per-tensor grad norm / max-abs / non-finite
counts and input stats; weight and update norms every 10 steps; activation stats for 20
modules every 25 steps. The run is healthy noise with an explosion near the end, so every rule
has work to do. Baseline in the same process: the SageMaker Debugger default rules
(benchmarks/sagemaker_rules.py) over the same loaded arrays.

    .venv/bin/python benchmarks/diagnose_speed.py [--steps 100000] [--tensors 200] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sagemaker_rules import sagemaker_verdicts  # noqa: E402

from graddoctor.store._run import open_run  # noqa: E402
from graddoctor.store._store import RunWriter  # noqa: E402
from graddoctor.diagnosis import DiagnoseConfig, RunData, diagnose_data  # noqa: E402


def write_store(run_dir: Path, T: int, P: int, M: int = 20, chunk: int = 50, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tensors = [dict(idx=i, name=f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}", module=f"layers.{i // 2}",
                    shape="[64, 64]" if i % 2 == 0 else "[64]", numel=4096 if i % 2 == 0 else 64, dtype="float32")
               for i in range(P)]
    acts = [dict(idx=j, name=f"acts.{j}", kind="relu", lo=None, hi=None, relu_family=1) for j in range(M)]
    meta = dict(config={}, modules={**{f"layers.{i}": "Linear" for i in range(P // 2)}, **{f"acts.{j}": "ReLU" for j in range(M)}},
                act_fields=["mean", "std", "frac_saturated", "frac_zero", "frac_dead_units", "nonfinite"],
                input_fields=["maxabs", "nonfinite", "mean", "std"], optimizer="SGD", lr=[0.1])
    w = RunWriter(run_dir, meta, tensors, acts)
    base_w = np.where(np.arange(P) % 2 == 0, 8.0, 0.5).astype(np.float32)
    boom = int(T * 0.97)
    for s0 in range(0, T, chunk):
        steps = np.arange(s0, min(T, s0 + chunk))
        n = len(steps)
        rise = np.where(steps >= boom, 1.3 ** np.clip(steps - boom, 0, 200), 1.0)
        g = (base_w * 0.01 * np.exp(0.3 * rng.standard_normal((n, P)))).astype(np.float32) * rise[:, None].astype(np.float32)
        loss = (2.0 * np.exp(-steps / T) * np.exp(0.2 * rng.standard_normal(n)) * rise)[:, None]
        chunks = [("loss", steps, loss), ("grad_total_norm", steps, np.sqrt((g.astype(np.float64) ** 2).sum(1, keepdims=True)).astype(np.float32)),
                  ("grad_norm", steps, g), ("grad_maxabs", steps, g / 10), ("grad_nonfinite", steps, np.zeros((n, P), np.int64)),
                  ("input", steps, np.tile(np.array([4.0, 0, 0, 1], np.float32), (n, 1)))]
        samp = steps[steps % 10 == 0]  # watch's defaults: weight norms every step, update norms every 10
        chunks += [("weight_norm", steps, np.tile(base_w, (n, 1))),
                   ("update_norm", samp, np.tile(base_w * 1e-3, (len(samp), 1)))]
        a = steps[steps % 25 == 0]
        act = np.tile(np.array([0.5, 1.0, np.nan, 0.4, 0.02, 0.0], np.float32), (len(a), M))
        chunks.append(("act", a, act))
        w.write(chunks)
    w.close()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def live_flush_cost(run_dir: Path, T: int, repeats: int) -> float:
    """Median cost of one live-diagnosis flush listener call once its history is loaded."""
    import warnings
    from types import SimpleNamespace

    from graddoctor.diagnosis._live import LiveDiagnosis
    from graddoctor import open_run
    from graddoctor.diagnosis._live import _SERIES
    live = LiveDiagnosis(run_dir)
    fake_watch = SimpleNamespace(_writer=None)  # no store writes: only the listener's own work is timed
    with open_run(run_dir) as run:  # the last flush's chunks, as watch hands them to its listeners
        chunks = [(name, st[st > T - 51], data[st > T - 51]) for name in _SERIES
                  for st, data in [run.series(name)] if data is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live(fake_watch, 0, T - 1, [])  # first flush: loads metadata and history
        return timed(lambda: live(fake_watch, T - 50, T - 1, chunks), repeats)[0]


def store_arguments(description: str, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """--steps, --tensors, --repeats: the synthetic store's size and how often each timing runs
    (added to `parser`, which may hold a script's own options)."""
    ap = parser or argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    return ap.parse_args()


def main() -> None:
    args = store_arguments(__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t = time.perf_counter()
        write_store(run_dir, args.steps, args.tensors)
        print(f"wrote {args.steps} steps x {args.tensors} tensors in {time.perf_counter() - t:.1f} s "
              f"({(run_dir / 'graddoctor.sqlite').stat().st_size / 2**20:.0f} MiB)")

        def load():
            with open_run(run_dir) as run:
                return RunData.from_run(run)
        cfg = DiagnoseConfig()
        t_load, data = timed(load, args.repeats)
        t_rules, findings = timed(lambda: diagnose_data(RunData(**{k: getattr(data, k) for k in data.__dataclass_fields__}), cfg),
                                  args.repeats)
        t_sm, _ = timed(lambda: sagemaker_verdicts(data), args.repeats)
        t_live = live_flush_cost(run_dir, args.steps, args.repeats)
    print(f"median of {args.repeats}: load {t_load:.2f} s, graddoctor rules {t_rules:.2f} s "
          f"(total {t_load + t_rules:.2f} s); SageMaker default rules on the same arrays {t_sm:.2f} s "
          f"(rules ratio {t_rules / t_sm:.2f}x)")
    print(f"live diagnosis, per flush after the first (take the flush's chunks + rules on the last 2000 steps): "
          f"{t_live * 1000:.0f} ms")
    print("findings:", [(f.code, f.first_step) for f in findings])


if __name__ == "__main__":
    main()
