"""The lab's `transformer` and `doctor` experiments, asserted on the quick preset's run (the session's
`quick_lab_run` fixture), with the numbers recomputed from the run stores where the store is the oracle.

Oracles: the Markov chain's entropy rate by power iteration in float64 (the experiment uses an eigenvector)
bounds every loss from below; watch's attention series (hooked on `c_attn`'s output, every query-key pair)
bounds the experiment's own per-step measurement (causal pairs only) from above; the doctor's final losses are
recomputed from each trial's run store (median of the last 10% of the recorded losses), and its critical
findings by `gd.diagnose` on the stored runs.

Margins seen with the quick preset at seeds 0-4 (`graddoctor lab --preset quick --seed S`): post-LN final loss
2.36-2.54 against pre-LN 1.26-1.31 and post-LN + warmup 1.33-1.71 (the smallest gap 0.82 nats, asserted 0.5);
the GPT's largest attention logit 535-1435 without QK-norm and 12-19.3 with it (asserted > 100, < 50, and 10x);
the doctor's best over its baseline <= 0.80 (dead ReLUs; asserted 0.9), the exploding RNN's baseline non-finite.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import graddoctor as gd
from graddoctor import open_run

pytestmark = pytest.mark.slow  # reads the quick lab run
F32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def tf(quick_lab_results):
    return quick_lab_results["transformer"]


@pytest.fixture(scope="module")
def out(quick_lab_run):
    return quick_lab_run[0]


def _entropy_rate_by_power_iteration() -> float:
    from graddoctor.lab._transformer_models import chain
    p = chain().numpy()
    pi = np.full(len(p), 1.0 / len(p))
    for _ in range(10_000):
        pi = pi @ p
    return float(pi @ -(p * np.log(p)).sum(1))


def _tail(run_dir, frac=0.1) -> float:
    with open_run(run_dir) as run:
        loss = np.asarray(run.loss()[1], dtype=np.float64)
    return float(np.mean(loss[-max(1, round(frac * len(loss))):]))


def test_post_ln_without_warmup_trains_worse_and_warmup_or_pre_ln_fix_it(tf, out):
    m = tf["metrics"]
    assert tf["reproduced"] and m["layers"] >= 12
    h = _entropy_rate_by_power_iteration()
    assert math.isclose(m["entropy_rate"], h, rel_tol=1e-9)
    for s in m["seeds"]:
        loss = {k: _tail(out / f"runs/transformer/{k}_s{s}") for k in ("post_ln", "pre_ln", "post_ln_warmup")}
        # no model beats the entropy rate (tail mean of ~3000 tokens: sampling noise ~0.03 nats)
        assert min(loss.values()) > h - 0.15, loss
        assert loss["post_ln"] > max(loss["pre_ln"], loss["post_ln_warmup"]) + 0.5, loss
        assert loss["pre_ln"] < h + 0.5 and loss["post_ln_warmup"] < h + 0.5, loss


def test_diagnose_names_post_ln_without_warmup(tf, out):
    s = tf["metrics"]["seeds"][0]
    post = gd.diagnose(str(out / f"runs/transformer/post_ln_s{s}"))
    top = [f for f in post if f.severity == "critical"]
    assert top and top[0].cause == "architecture"
    assert [r.id for r in top[0].remedies[:2]] == ["lr_warmup", "pre_layer_norm"]
    # the cures are healthy: no critical finding on pre-LN or on post-LN with warmup
    for kind in ("pre_ln", "post_ln_warmup"):
        assert not [f for f in gd.diagnose(str(out / f"runs/transformer/{kind}_s{s}")) if f.severity == "critical"]


def test_attention_logits_grow_without_qk_norm_and_stay_bounded_with_it(tf, out):
    from graddoctor.lab.transformer import recorded_max_logit
    m = tf["metrics"]
    s = m["qk_seeds"][0]
    for name, lo, hi in (("plain", 100, math.inf), ("qk_norm", 0, 50)):
        steps, recorded = recorded_max_logit(out / f"runs/transformer/gpt_{name}_s{s}")
        own = np.asarray(m["max_attention_logit_per_step"][name])
        assert len(steps) >= 5 and len(own) == m["qk_steps"]
        # watch sees every query-key pair, the model only the causal ones: recorded >= own, to float32 rounding
        assert (recorded >= own[steps] * (1 - 8 * F32)).all()
        assert lo < max(own.max(), recorded.max()) < hi
    plain, qk = np.asarray(m["max_attention_logit"]["plain"]), np.asarray(m["max_attention_logit"]["qk_norm"])
    assert (plain >= 10 * qk).all()
    assert np.mean(m["qk_final_loss"]["qk_norm"]) < np.mean(m["qk_final_loss"]["plain"])
    # the finding, on the run diagnosed by the lab
    codes = {rel: {f["code"] for f in fs} for rel, fs in tf["findings"].items()}
    assert "attention_logit_growth" in codes[f"runs/transformer/gpt_plain_s{s}"]
    assert "attention_logit_growth" not in codes[f"runs/transformer/gpt_qk_norm_s{s}"]


def test_the_doctor_prescribes_a_cure_for_each_pathology(quick_lab_results, out):
    from graddoctor.doctor import load_prescription
    r = quick_lab_results["doctor"]
    m = r["metrics"]
    assert r["reproduced"] and set(m["cases"]) == {"sigmoid_mlp", "exploding_rnn", "dead_relu"}
    for name, per in m["cases"].items():
        for c in per:
            rx = load_prescription(c["out"])
            assert rx.prescribed and rx.best.remedy == c["best"] != "baseline"
            base = np.asarray(rx.baseline.losses, dtype=np.float64)
            with open_run(rx.best.run_dir) as run:  # the best trial's loss from its own store
                best = float(np.median(np.asarray(run.loss()[1], dtype=np.float64)[-10:]))
            assert math.isclose(best, rx.best.final_loss, rel_tol=1e-6)
            assert math.isfinite(best)
            base_final = float(np.median(base[-10:]))
            assert not math.isfinite(base_final) or best < m["margin"] * base_final, (name, best, base_final)
            # every critical finding diagnose makes on the stored baseline is gone from the best trial
            critical = {f.code for f in gd.diagnose(rx.baseline.run_dir) if f.severity == "critical"}
            assert critical, name
            left = {f.code for f in gd.diagnose(rx.best.run_dir) if f.severity == "critical"}
            assert not critical & left, (name, left)
    assert len(r["figures"]) >= 3  # per case: the loss panels and a heat map per trial
