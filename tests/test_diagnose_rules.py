"""Rules on hand-built histories: robust statistics against naive oracles, scenario tables,
robustness on arbitrary histories (hypothesis), the remedy catalogue and the config."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graddoctor.store import _nonfinite_json
from graddoctor._errors import ConfigError
from graddoctor.diagnosis import (CATALOGUE, CAUSES, CODES, RULES, DiagnoseConfig, Finding, RunData, diagnose,
                                 diagnose_data, rank_remedies)
from graddoctor.diagnosis._robust import running_median_mad, sustained, trend_test

from _diag_synth import make_data
from _numerics import U64, gamma

CFG = DiagnoseConfig()
# The shared remedy ids (common brief): the catalogue and graddoctor.treat must both use exactly these.
SHARED_IDS = {"clip_value", "clip_norm", "clip_norm_per_tensor", "auto_clip", "agc", "zclip", "skip_nonfinite",
              "rollback", "lower_learning_rate", "sanitize_inputs", "l1_penalty", "l2_penalty", "relu", "leaky_relu",
              "elu", "he_init", "xavier_init", "lsuv_init", "orthogonal_init", "zero_residual_init", "batch_norm",
              "layer_norm", "add_residual", "rnn_to_lstm", "rnn_to_gru", "layerwise_pretrain", "fewer_layers",
              "smaller_batches", "truncated_bptt", "lr_warmup", "pre_layer_norm", "pass_scaler", "gpt2_init"}

SHARED_IDS |= {"qk_norm", "z_loss"}  # issue 16: attention logit growth, output logit divergence


def codes(d: RunData) -> dict[str, Finding]:
    return {f.code: f for f in diagnose_data(d, CFG)}


# ------------------------------------------------------------------ robust statistics vs naive loops
def test_running_median_mad_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(300)
    x[rng.integers(0, 300, 30)] = np.nan
    x[rng.integers(0, 300, 10)] = np.inf
    med, mad = running_median_mad(x, window=20, min_count=5)
    for t in range(len(x)):
        prev = x[max(0, t - 20):t]
        prev = prev[np.isfinite(prev)]
        if len(prev) < 5:
            assert np.isnan(med[t]) and np.isnan(mad[t])
        else:
            # a median picks a value, or averages the middle two (one rounding either way it is formed);
            # the MAD then takes |x - median| of medians that may differ by that much
            want_med = np.median(prev)
            assert abs(med[t] - want_med) <= 2 * U64 * abs(want_med)
            want_mad = np.median(np.abs(prev - want_med))
            assert abs(mad[t] - want_mad) <= 4 * U64 * (abs(want_med) + want_mad)


def test_trend_test_rho_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    t = np.arange(200.0)
    for y in (rng.standard_normal(200), 5 - 0.01 * t + rng.standard_normal(200), np.round(rng.standard_normal(200))):
        rho, p_dec, p_inc = trend_test(t, y)
        # Pearson's correlation of the ranks on both sides: sums of 2n products (gamma_{2n} of sums bounded,
        # by Cauchy-Schwarz, by the norms rho divides by) and a few roundings more, either way
        assert rho == pytest.approx(scipy_stats.spearmanr(t, y).statistic, abs=2 * gamma(2 * len(t) + 8, U64))
        # 0.5 erfc(-a) + 0.5 erfc(a) = 1 for the same a (negation is exact): only erfc's own error, allowed
        # 16 ulps each (glibc lists <= 5), and the sum's rounding
        assert p_dec + p_inc == pytest.approx(1.0, abs=(2 * 16 * 2 + 1) * U64)
    assert trend_test(t, 5 - 0.01 * t + rng.standard_normal(200))[1] < 1e-3


def test_sustained_matches_a_naive_definition():
    rng = np.random.default_rng(2)
    for _ in range(50):
        mask = rng.random(40) < 0.5
        then_bad = rng.random(40) < 0.1
        got = sustained(mask, 3, then_bad)
        want = np.zeros(40, bool)
        t = 0
        while t < 40:
            if mask[t]:
                e = t
                while e < 40 and mask[e]:
                    e += 1
                if e - t >= 3 or (e < 40 and then_bad[e]):
                    want[t:e] = True
                t = e
            else:
                t += 1
        assert (got == want).all()


# ------------------------------------------------------------------ scenario tables on built histories
def _noisy_loss(T, rng, trend=0.0, level=2.0, sigma=0.3):
    return level * np.exp(sigma * rng.standard_normal(T)) + trend * np.arange(T)


def test_loss_spike_ignores_heavy_minibatch_noise_and_finds_a_real_spike():
    rng = np.random.default_rng(3)
    loss = _noisy_loss(400, rng)  # lognormal: a 2.5-sigma batch is 2x the median
    assert "loss_spike" not in codes(make_data(loss))
    loss[250] = 40 * np.median(loss)
    f = codes(make_data(loss))["loss_spike"]
    assert f.evidence["spike_steps"] == [250] and f.first_step == 250
    # converged: tiny, very heavy-tailed minibatch losses (0.001 -> 0.05) are noise, not setbacks
    converged = np.concatenate([np.linspace(2.0, 0.002, 100), 0.002 * np.exp(1.2 * rng.standard_normal(300))])
    assert "loss_spike" not in codes(make_data(converged))


def test_loss_not_decreasing_is_a_trend_test():
    rng = np.random.default_rng(4)
    T = 400
    slow = 2.0 - 0.5 * np.arange(T) / T + 0.15 * rng.standard_normal(T)  # 25% better, noise 0.15 per batch
    assert "loss_not_decreasing" not in codes(make_data(slow))
    flat = 2.0 + 0.15 * rng.standard_normal(T)
    f = codes(make_data(flat))["loss_not_decreasing"]
    assert f.cause == "unknown" and f.evidence["p_decreasing_recent"] > CFG.trend_p
    rising = 2.0 + 2.0 * np.arange(T) / T + 0.15 * rng.standard_normal(T)
    assert codes(make_data(rising))["loss_not_decreasing"].cause == "learning_rate"
    learned_then_flat = np.concatenate([np.linspace(2.0, 0.1, T // 2), 0.1 + 0.01 * rng.standard_normal(T // 2)])
    assert "loss_not_decreasing" not in codes(make_data(learned_then_flat))


def test_exploding_fires_on_the_rise_before_inf_and_not_on_one_outlier_step():
    rng = np.random.default_rng(5)
    T, P = 200, 3
    scale = np.exp(0.3 * rng.standard_normal(T))
    one_spike = scale.copy()
    one_spike[120] = 1e4
    d = make_data(global_norm=one_spike, grad_norm=np.outer(one_spike, [0.02, 0.02, 0.02]), P=P)
    assert "exploding_gradient" not in codes(d)
    rise = scale.copy()
    rise[150:] *= 2.0 ** np.arange(50)  # x2 per step from step 150
    rise[180:] = np.inf
    nf = np.zeros((T, P), np.int64)
    nf[180:] = 1
    f = codes(make_data(global_norm=rise, grad_norm=np.outer(rise, [0.02] * P), grad_nonfinite=nf, P=P))["exploding_gradient"]
    assert 150 <= f.first_step < 180 and "rise_above_baseline" in f.evidence["forms"]
    assert f.evidence["orders_above_baseline"] >= CFG.explode_rise_orders


def test_depth_profile_vanishing_and_growth_toward_the_input():
    P, T = 6, 100
    w = np.full(P, 4.0)
    vanish = np.outer(np.ones(T), w * 10.0 ** -np.linspace(6, 1, P))  # input side 1e-6, output side 1e-1
    f = codes(make_data(grad_norm=vanish, P=P))["vanishing_gradient"]
    assert "depth_profile" in f.evidence["forms"] and f.layers[0] == "l0.weight"
    grow = np.outer(np.ones(T), w * 10.0 ** np.linspace(1, -1.5, P))
    c = codes(make_data(grad_norm=grow, P=P))
    assert "growth_toward_input" in c["exploding_gradient"].evidence["forms"] and "vanishing_gradient" not in c


def test_not_fooled_by_zero_init_branches_biases_norms_and_embeddings():
    T = 100
    shapes = [(16, 16), (16, 16), (16, 16), (16,), (16,), (100, 16)]
    modules = {"l0": "Linear", "l1": "Linear", "l2": "Linear", "l3": "BatchNorm1d", "l4": "Linear", "l5": "Embedding"}
    P = len(shapes)
    w = np.array([4.0, 0.0, 4.0, 4.0, 1e-9, 40.0], np.float32)  # l1: zero-initialised branch end
    g = np.tile(np.array([0.04, 0.0, 0.04, 1e-9, 1e-12, 1e-9], np.float32), (T, 1))  # tiny on everything left out
    d = make_data(grad_norm=g, weight_norm=np.tile(w, (10, 1)), shapes=shapes, modules=modules, P=P)
    assert d.eligible.tolist() == [0, 2]
    assert not set(codes(d)) & {"vanishing_gradient", "exploding_gradient", "large_weight_update"}


def test_everything_stalls_form():
    P, T = 6, 100
    g = np.full((T, P), 4.0 * 1e-6)  # grad/weight 1e-6 on every layer, profile flat
    f = codes(make_data(grad_norm=g, P=P))["vanishing_gradient"]
    assert f.evidence["forms"] == ["everything_stalls"] and f.severity == "critical"
    # tiny (or zero) updates from healthy gradients: a learning-rate choice or no optimizer step, not vanishing
    for upd in (np.zeros((10, P)), np.full((10, P), 4.0 * 1e-7)):
        assert "vanishing_gradient" not in codes(make_data(update_norm=upd, P=P))


def test_input_outlier_and_nonfinite_input_name_data():
    T = 120
    inputs = np.tile(np.array([3.0, 0.0, 0.0, 1.0], np.float32), (T, 1))
    inputs[:, 0] *= np.exp(0.1 * np.random.default_rng(6).standard_normal(T))
    inputs[70, 0] = 3e4
    inputs[90] = [np.nan, 5.0, np.nan, np.nan]
    loss = np.ones(T)
    loss[90:] = np.nan
    nf = np.zeros((T, 3), np.int64)
    nf[90:] = 4
    c = codes(make_data(loss, inputs=inputs, grad_nonfinite=nf))
    assert c["input_outlier"].evidence["outlier_steps"] == [70] and c["input_outlier"].evidence["nonfinite_steps"][0] == 90
    assert c["nonfinite_gradient"].cause == "data" and c["nonfinite_gradient"].evidence["first_nonfinite"] == "input"
    assert "exploding_gradient" not in c  # the data, not an explosion, made it non-finite


# ------------------------------------------------------------------ robustness on arbitrary histories
_values = st.sampled_from([0.0, 1.0, -1.0, 1e-30, 1e30, 3.5, math.nan, math.inf, -math.inf])


@st.composite
def histories(draw):
    T = draw(st.integers(0, 40))
    P = draw(st.integers(0, 4))
    M = draw(st.integers(0, 3))
    S = draw(st.integers(0, 5))
    A = draw(st.integers(0, 3))
    I = draw(st.integers(0, T))

    def arr(shape, dtype=np.float64):
        return draw(arrays(dtype, shape, elements=_values if dtype != np.int64 else st.integers(-1, 3)))
    shapes = [draw(st.sampled_from([(4, 4), (4,), (), (2, 3, 1, 1)])) for _ in range(P)]
    kinds = [draw(st.sampled_from(["relu", "sigmoid", "tanh", "rnn", "gelu", "rnn_relu"])) for _ in range(M)]
    names = [f"m{i}.w" for i in range(P)]
    return RunData(
        steps=np.arange(T, dtype=np.int64), loss=arr((T,)), global_norm=arr((T,)).astype(np.float32),
        grad_norm=arr((T, P)).astype(np.float32), grad_nonfinite=arr((T, P), np.int64),
        sample_steps=np.arange(S, dtype=np.int64) * 3, weight_norm=arr((S, P)).astype(np.float32),
        update_steps=np.arange(min(S, 3), dtype=np.int64) * 3, update_norm=arr((min(S, 3), P)).astype(np.float32),
        tensors=names, tensor_module=[n.split(".")[0] for n in names], tensor_shape=shapes,
        modules={f"m{i}": draw(st.sampled_from(["Linear", "RNN", "BatchNorm1d", "Embedding", "Conv2d"])) for i in range(P)},
        act_steps=np.arange(A, dtype=np.int64) * 5, act=arr((A, M, 6)).astype(np.float32),
        act_modules=[f"a{j}" for j in range(M)], act_kinds=kinds,
        input_steps=np.arange(I, dtype=np.int64), inputs=arr((I, 4)).astype(np.float32))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(histories())
def test_rules_never_raise_on_arbitrary_histories(d):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no sloppy numerics either (mean of empty, 0/0 ...)
        findings = diagnose_data(d, CFG)
    for f in findings:
        doc = _nonfinite_json.loads(_nonfinite_json.dumps(f.to_dict()))
        assert Finding.from_dict(doc).code == f.code
        assert f.code in CODES and f.cause in CAUSES


@pytest.mark.parametrize("fill", [0.0, math.nan, math.inf])
def test_rules_on_uniform_degenerate_histories(fill):
    T, P = 60, 4
    d = make_data(np.full(T, fill), global_norm=np.full(T, fill), grad_norm=np.full((T, P), fill),
                  weight_norm=np.full((6, P), fill), update_norm=np.full((6, P), fill), P=P,
                  inputs=np.full((T, 4), fill))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        diagnose_data(d, CFG)
    assert diagnose_data(make_data(T=0), CFG) == [] and diagnose_data(make_data(T=1), CFG) == []


# ------------------------------------------------------------------ catalogue and config
def test_catalogue_uses_exactly_the_shared_ids_and_every_id_is_reachable():
    assert set(CATALOGUE) == SHARED_IDS
    reachable = set()
    for code in CODES:
        for cause in CAUSES:
            for init in ("he_init", "xavier_init", "orthogonal_init", "lsuv_init", "gpt2_init"):
                f = Finding(code, "warning", 0, 0, (), {}, cause, "")
                reachable |= {r.id for r in rank_remedies(f, init)}
    assert reachable == SHARED_IDS
    for c in CATALOGUE.values():
        assert c.why and "\n" not in c.why and c.snippet


def test_remedies_name_the_init_that_fits_the_activations():
    sat = np.zeros((3, 2, 6), np.float32)
    sat[:, :, 1] = 0.9
    sat[:, :, 2] = 0.8  # 80% saturated tanh from the first sample
    f = codes(make_data(act=sat, act_kinds=("tanh", "tanh")))["poor_initialization"]
    assert f.evidence["suggested_init"] == "xavier_init" and f.remedies[0].id == "xavier_init"


def test_config_validation_and_options():
    with pytest.raises(ConfigError, match="spike_z"):
        DiagnoseConfig(spike_z=-1.0).validate()
    with pytest.raises(ConfigError, match="dead_fraction"):
        DiagnoseConfig(dead_fraction=2.0).validate()
    with pytest.raises(ConfigError, match="unknown diagnose option"):
        diagnose(make_data(T=3), bogus=1)
    loss = _noisy_loss(300, np.random.default_rng(7))
    loss[200] = 6 * np.median(loss)
    assert "loss_spike" in {f.code for f in diagnose(make_data(loss))}
    assert "loss_spike" not in {f.code for f in diagnose(make_data(loss), spike_factor=10.0)}
    assert list(RULES) and set(RULES) == set(CODES)


def test_rising_gradients_while_the_loss_falls_are_not_an_explosion():
    # a plateau ending: gradients climb 300x back to their starting level while the loss drops
    rng = np.random.default_rng(8)
    T, P = 300, 3
    g = np.concatenate([np.full(20, 1.0), np.full(130, 3e-3), np.full(150, 1.0)]) * np.exp(0.1 * rng.standard_normal(T))
    loss = np.concatenate([np.full(150, 2.0), np.linspace(2.0, 0.1, 150)]) * np.exp(0.05 * rng.standard_normal(T))
    d = make_data(loss, global_norm=g, grad_norm=np.outer(g, [4.0, 4.0, 4.0]), P=P)  # grad/weight 1 after the rise
    assert "exploding_gradient" not in codes(d)
    worse = loss.copy()
    worse[150:] = 2.0 * np.linspace(1, 5, 150)  # same gradients, loss getting worse: an explosion
    g2 = g.copy()
    g2[150:] *= 30  # 30x above where it started
    assert "exploding_gradient" in codes(make_data(worse, global_norm=g2, grad_norm=np.outer(g2, [4.0] * 3), P=P))


def test_remedies_already_in_the_model_are_not_suggested():
    f = Finding("vanishing_gradient", "warning", 0, 0, (), {}, "depth", "")
    ids = [r.id for r in rank_remedies(f, present=frozenset({"batch_norm"}))]
    assert "batch_norm" not in ids and ids[0] == "add_residual"


def test_vanishing_kept_beside_an_explosion_is_not_the_headline():
    """Same severity: an explosion (here an early loss explosion) is listed before a vanishing gradient."""
    from graddoctor.diagnosis._diagnose import _after_an_explosion

    vanish = Finding("vanishing_gradient", "warning", 0, 9, (), {}, "recurrence", "")
    boom = Finding("loss_spike", "warning", 1, 2, (), {"early_explosion": {"factor": 2.2}}, "learning_rate", "")
    later_spike = Finding("loss_spike", "warning", 50, 50, (), {}, "learning_rate", "")
    assert _after_an_explosion([vanish, boom]) == {"vanishing_gradient"}
    assert _after_an_explosion([vanish, later_spike]) == frozenset()  # a mid-run spike is not an explosion
