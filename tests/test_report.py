"""The report renderer: plots survive NaN/Inf, spikes and interventions are found, pages are self-contained."""
from __future__ import annotations

import base64
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.report import _plots as P
from graddoctor.report import write_run_report
from graddoctor.report._html import findings, fmt
from graddoctor.report._views import loss_spikes, run_figures
from graddoctor.treat._interventions import acted

PNG = b"\x89PNG\r\n\x1a\n"
# watch's live diagnosis warns about the NaN run on purpose; the report shows those findings instead.
pytestmark = pytest.mark.filterwarnings("ignore:graddoctor:UserWarning")


def _png(uri: str) -> bytes:
    assert uri.startswith("data:image/png;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    assert data.startswith(PNG)
    return data


def test_plots_survive_nan_and_inf():
    v = np.array([[1.0, np.nan, 1e-3], [np.inf, 2.0, 0.0], [1e-9, -np.inf, 5.0]])
    fig, axes = P.figure(1)
    P.heatmap(axes[0], np.arange(3), ["a", "b", "c"], v, "t")
    _png(P.to_uri(fig))
    fig, axes = P.figure(3)
    P.loss_curve(axes[0], {"all nan": (np.arange(4), np.full(4, np.nan))}, "t", log=True)
    P.profiles(axes[1], ["0", "1"], {"s": np.array([np.inf, 0.0])}, "t")
    P.bars(axes[2], ["x", "y"], {"m": [np.nan, 1.0]}, "t", "v", log=True)
    _png(P.to_uri(fig))
    fig, axes = P.figure(1)
    P.histogram(axes[0], {"h": np.array([0.1, np.nan, 0.9])}, np.linspace(0, 1, 5), "t", "x")
    _png(P.to_uri(fig))


def test_mark_nonfinite_counts_exactly_the_bad_points():
    fig, axes = P.figure(1)
    y = np.array([1.0, np.nan, 2.0, np.inf, -np.inf])
    assert P.mark_nonfinite(axes[0], np.arange(5), y) == 3


CALLER = """
import sys, warnings
import matplotlib
matplotlib.use("pdf")  # the caller's choices, which drawing a report must leave as they are
matplotlib.rcParams.update({"font.size": 13.0, "axes.grid": False, "figure.dpi": 150.0})
before = dict(matplotlib.rcParams)
import torch
from torch import nn
import graddoctor as gd
from graddoctor.lab import run_lab
from graddoctor.report import write_run_report

warnings.simplefilter("ignore")
out = sys.argv[1]
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
with gd.watch(model, None, out + "/run", flush_every=5) as w:
    for _ in range(10):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        w.step()
html = write_run_report([out + "/run"], out + "/run.html").read_text()
assert html.count("data:image/png;base64,") >= 3
lab = run_lab(preset="quick", only=["surface"], out=out + "/lab", progress=False)
assert lab.report.read_text().count("data:image/png;base64,") >= 1
changed = {k: (before[k], v) for k, v in matplotlib.rcParams.items() if v != before[k]}
assert not changed, changed
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""


@pytest.mark.slow
def test_reports_leave_the_callers_matplotlib_as_it_was(tmp_path):
    """A run report and a lab report change neither the caller's backend nor its rcParams, and never
    import pyplot (which picks a backend); in a fresh process, where nothing else has imported it."""
    proc = subprocess.run([sys.executable, "-c", CALLER, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_loss_spikes_finds_injected_spikes_only():
    rng = np.random.default_rng(0)
    loss = 1.0 + 0.01 * rng.standard_normal(200)
    loss[[60, 130]] = 5.0
    loss[90] = np.nan  # a NaN is not a spike and must not break the detector
    assert loss_spikes(loss).tolist() == [60, 130]


def test_acted_distinguishes_clipping_from_observation():
    """treat's `acted` is the one definition; the report's loss plot marks the steps it says acted."""
    from graddoctor.report import _views
    assert _views.acted is acted
    assert acted({"kind": "guard", "data": {"clip_norm.coef": 0.5}})
    assert not acted({"kind": "guard", "data": {"clip_norm.coef": 1.0}})
    assert acted({"kind": "guard", "data": {"agc.clipped": 0.25}})
    assert acted({"kind": "guard", "data": {"clip_norm_per_tensor.min_coef": 0.5, "clip_norm_per_tensor.clipped": 2}})
    assert acted({"kind": "guard", "data": {"a.clip_norm.coef": [0.5]}})  # a chain's key, a value stored as a list
    assert not acted({"kind": "guard", "data": {"zclip.coef": float("nan")}})
    assert not acted({"kind": "guard", "data": {"skip_nonfinite.skipped": 0, "agc.clipped": 0.0}})
    assert acted({"kind": "skipped_step", "data": {}}) and acted({"kind": "rollback", "data": {}})
    assert not acted({"kind": "finding", "data": {"code": "loss_spike"}})
    assert not acted({"kind": "note", "data": {"text": "checkpoint"}})
    assert not acted({"kind": "structure", "data": {"residual": ["h.0"], "post_norm": []}})


def test_the_report_and_the_runs_summary_count_the_same_interventions(tmp_path):
    """A clipped run: the loss plot's purple steps are the steps the summary says the clip acted on."""
    from graddoctor.treat import interventions
    from graddoctor.treat._interventions import intervention_steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gd.watch(model, opt, tmp_path / "run", guard=gd.clip_norm(0.5), flush_every=10) as w:
        for step in range(30):
            x = torch.randn(16, 8) * (10.0 if step % 3 == 0 else 0.1)  # every third batch is clipped
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            w.record_event("note", {"text": "checkpoint"}) if step == 4 else None
            opt.step()
    with gd.open_run(tmp_path / "run") as run:
        steps, (summary,) = intervention_steps(run), interventions(run)
        assert [e["step"] for e in run.events("structure")] == [0]  # watch's record of the model: not an action
    assert summary["what"] == "clip_norm.coef" and 0 < summary["steps"] < 30
    assert len(steps) == summary["steps"] and (steps[0], steps[-1]) == (summary["first_step"], summary["last_step"])
    (loss_plot,) = [f for f in run_figures(tmp_path / "run") if f.title.startswith("loss")]
    assert f"{summary['steps']} step(s) where a recorded intervention acted (guard)" in loss_plot.caption


def test_fmt_and_findings_escape_and_spell_nonfinite():
    assert fmt(float("nan")) == "NaN" and fmt(float("inf")) == "Inf" and fmt(-math.inf) == "-Inf"
    html = findings([{"code": "exploding_gradient", "severity": "critical", "first_step": 3, "last_step": float("nan"),
                      "layers": ["<script>x</script>"], "cause": "initialization", "remedies": [{"id": "clip_by_norm"}],
                      "message": "a & b"}], "run")
    assert "<script>" not in html and "&lt;script&gt;" in html and "clip_by_norm" in html and "NaN" in html


def _diverging_run(run_dir, steps=30):
    """A small MLP whose gradients turn NaN at step 20 (a poisoned batch), recorded with watch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gd.watch(model, opt, run_dir, activation_every=5, flush_every=10) as w:
        for step in range(steps):
            x = torch.randn(32, 8)
            if step >= 20:
                x[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (32,)))
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            w.record_event("note", {"text": "checkpoint"}) if step == 5 else None
            opt.step()


@pytest.mark.slow
def test_run_report_of_a_nan_run_is_self_contained(tmp_path):
    run_dir = tmp_path / "nan<run>"
    _diverging_run(run_dir)
    figs = run_figures(run_dir)
    assert [f.title for f in figs] == ["gradient flow", "per-layer gradient norm", "loss and global gradient norm",
                                       "activation saturation"]
    for f in figs:
        _png(f.data)
    out = write_run_report([run_dir], tmp_path / "r" / "report.html")
    html = out.read_text()
    assert html.count("<figure class=\"plot\">") == 4
    assert "nan&lt;run&gt;" in html and "nan<run>" not in html  # the path is escaped
    assert "<script" not in html and "http://" not in html and "https://" not in html
    # diagnose's findings sit beside the plots: the NaN from step 20 on is named
    assert "nonfinite_gradient" in html


def test_report_cli_errors_on_a_missing_run(tmp_path, capsys):
    from graddoctor.cli import main
    assert main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.html")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_report_cli_writes_default_path(tmp_path, capsys):
    from graddoctor.cli import main
    _diverging_run(tmp_path / "run", steps=12)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").exists()
    assert str(tmp_path / "run" / "report.html") in capsys.readouterr().out


def test_run_report_of_a_run_without_steps(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 1))
    gd.watch(model, None, tmp_path / "empty").close()
    html = write_run_report([tmp_path / "empty"], tmp_path / "e.html").read_text()
    assert "no training step" in html and "<figure" not in html


@pytest.mark.parametrize("seed", range(3))
def test_the_page_marks_exactly_the_spikes_diagnose_reports(seed):
    # One detector: on noise neither marks anything; with spikes, the page's are diagnose's.
    from _diag_synth import make_data

    from graddoctor.diagnosis._config import DiagnoseConfig
    from graddoctor.diagnosis._rules_loss import loss_spike
    rng = np.random.default_rng(seed)
    noise = 1.0 + 0.05 * rng.standard_normal(2000)
    assert loss_spikes(noise).tolist() == [] and loss_spike(make_data(loss=noise), DiagnoseConfig()) is None
    spiky = noise.copy()
    spiky[[300, 1200, 1900]] = [4.0, 6.0, 9.0]
    finding = loss_spike(make_data(loss=spiky), DiagnoseConfig())
    assert loss_spikes(spiky).tolist() == finding.evidence["spike_steps"] == [300, 1200, 1900]
