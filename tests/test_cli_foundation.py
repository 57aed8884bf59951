"""The command line as a user meets it: `graddoctor.cli.main` in process (one torch import for the
module), and the real console script where the process itself matters (its help and exit codes)."""
import subprocess

import pytest

from _cli import EXE, run


def test_help_for_every_command():
    for args in ([], ["runs"], ["runs", "summary"], ["demo"], ["diagnose"], ["lab"], ["report"], ["serve"]):
        out = run(*args, "--help")
        assert out.returncode == 0, out.stderr
        assert "usage: graddoctor" in out.stdout


@pytest.mark.slow
def test_the_console_script_helps_and_refuses_like_main():
    # both at once: each process spends its time importing torch, and the box has 2 cores
    procs = [subprocess.Popen([EXE, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arg in ("--help", "frobnicate")]
    try:
        (help_out, _), (_, refused_err) = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 0 and "usage: graddoctor" in help_out and "diagnose" in help_out
    assert procs[1].returncode == 2 and "invalid choice" in refused_err and "Traceback" not in refused_err


def test_demo_shows_the_sigmoid_net_vanishing(tmp_path):
    out = run("demo", "--out", str(tmp_path), "--steps", "8", check=True).stdout
    ratios = {line.split("(")[1].split(",")[0]: float(line.rsplit(":", 1)[1])
              for line in out.splitlines() if line.startswith("first/last layer gradient-norm ratio")}
    assert ratios["sigmoid"] < 1e-4 < 0.1 < ratios["relu_he"] < 10


def test_summary_of_a_run(tmp_path):
    run("demo", "--out", str(tmp_path), "--steps", "5", check=True)
    out = run("runs", "summary", str(tmp_path / "sigmoid"))
    assert out.returncode == 0
    assert "steps: 5" in out.stdout and "non-finite steps: none" in out.stdout
    assert "state: finished (watch closed it at" in out.stdout
    assert "gradient L2 norm per layer" in out.stdout and "18" in out.stdout


def test_summary_of_a_run_that_was_not_closed(tmp_path):
    """A run whose process ended without watch.close() (killed, or still training) says so."""
    import torch
    from torch import nn

    import graddoctor as gd
    from graddoctor.report._summary import format_summary
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    w = gd.watch(model, None, tmp_path, flush_every=2, live_diagnosis=False)
    for _ in range(3):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        w.step(loss)
    with gd.open_run(tmp_path) as r:  # read before close: steps 0-1 flushed, step 2 still buffered
        text = format_summary(r)
    assert "state: not closed" in text and "steps: 2 " in text
    w.close()
    with gd.open_run(tmp_path) as r:
        assert "state: finished" in format_summary(r) and r.num_steps == 3


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "no run store"),
    (lambda d: (d.mkdir(), (d / "graddoctor.sqlite").write_text("garbage" * 200)), "not a readable graddoctor store"),
])
def test_bad_run_dir_exits_non_zero_with_a_message(tmp_path, setup, message):
    d = tmp_path / "run"
    setup(d)
    out = run("runs", "summary", str(d))
    assert out.returncode == 2
    assert message in out.stderr and str(d) in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_command_is_refused():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_summary_lists_interventions_and_live_findings(tmp_path):
    import re

    import graddoctor as gd
    from _guarded_script import main as guarded_run

    guarded_run(str(tmp_path / "g"))  # in this process: the summary reads the store, whoever wrote it
    out = run("runs", "summary", str(tmp_path / "g"), check=True).stdout
    smallest = float(re.search(r"smallest coefficient ([0-9.e-]+)", out).group(1))
    _, total = gd.open_run(tmp_path / "g").global_norm()
    assert smallest == pytest.approx(0.01 / (float(total.max()) + 1e-6), rel=1e-2)  # clip_grad_norm_'s coefficient
    run("demo", "--out", str(tmp_path / "d"), "--steps", "60", check=True)
    out = run("runs", "summary", str(tmp_path / "d" / "sigmoid"), check=True).stdout
    assert "findings recorded while training:" in out and "vanishing_gradient" in out
    assert "interventions: none" in out
