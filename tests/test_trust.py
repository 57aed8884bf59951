"""What graddoctor guarantees: it never damages a run, never loses a flushed step, and refuses bad
input by name. Kill tests use real signals on a child process (tests/_trust_child.py); the
disk-full tests use a real, small tmpfs; the read-only tests a real read-only bind mount."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.cli import main as cli_main

CHILD = Path(__file__).with_name("_trust_child.py")


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def train(w, model, opt, steps, seed=0, loss_every=1, nan_loss_at=()):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(16, 6, generator=g)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        given = w.step_index in nan_loss_at or w.step_index % loss_every == 0
        w.step(torch.tensor(math.nan) if w.step_index in nan_loss_at else loss if given else None)
        opt.step()


def record(run_dir, steps=8, **options):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gd.watch(model, opt, run_dir, flush_every=3, **options) as w:
        train(w, model, opt, steps)
    return model, opt


def cli(*argv, capsys):
    code = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ 2: a refused watch writes nothing
def test_a_refused_watch_leaves_the_run_as_it_was(tmp_path, capsys):
    record(tmp_path)
    store = tmp_path / "graddoctor.sqlite"
    before = store.read_bytes()
    summary = cli("runs", "summary", tmp_path, capsys=capsys)
    other = nn.Sequential(nn.Linear(4, 4))  # another model: its tensors would replace the run's
    with pytest.raises(gd.ConfigError, match="already holds a recorded run .steps 0-7.*resume=True.*overwrite=True"):
        gd.watch(other, run_dir=tmp_path)
    assert store.read_bytes() == before
    assert cli("runs", "summary", tmp_path, capsys=capsys) == summary
    assert cli("diagnose", tmp_path, capsys=capsys)[0] == 0


def test_a_corrupt_store_is_refused_and_left_alone(tmp_path):
    store = tmp_path / "graddoctor.sqlite"
    store.write_bytes(b"not a database" * 100)
    with pytest.raises(gd.GradDoctorError, match="left as it is"):
        gd.watch(mlp(), run_dir=tmp_path)
    assert store.read_bytes() == b"not a database" * 100


# ------------------------------------------------------------------ 3: one writer per run directory
def test_a_second_watcher_in_the_same_process_is_refused(tmp_path):
    w = gd.watch(mlp(), run_dir=tmp_path)
    with pytest.raises(gd.GradDoctorError, match=f"being written by another watcher .pid {os.getpid()} on host"):
        gd.watch(mlp(), run_dir=tmp_path)
    w.close()
    gd.watch(mlp(), run_dir=tmp_path, overwrite=True).close()  # free again once closed


def _start(mode, run_dir, *args):
    return subprocess.Popen([sys.executable, str(CHILD), mode, str(run_dir), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc, word, limit=120.0):
    """Lines of the child's stdout up to and including the first that is `word`."""
    lines, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child ended before {word!r}: {proc.stderr.read()}")
        lines.append(line.strip())
        if line.strip() == word:
            return lines
    raise AssertionError(f"no {word!r} within {limit} s")


@pytest.mark.slow
def test_another_process_is_refused_by_pid_and_its_stale_lock_after_sigkill_is_not(tmp_path):
    child = _start("hold", tmp_path)
    try:
        _read_until(child, "ready")
        with pytest.raises(gd.GradDoctorError, match=f"another watcher .pid {child.pid} "):
            gd.watch(mlp(), run_dir=tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / "graddoctor.lock").exists()  # left behind by the killed holder...
    with gd.watch(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)), run_dir=tmp_path,
                  resume=True) as w:  # ...and not in the way
        assert w.step_index == 3  # the three flushed steps survived the SIGKILL
    assert not (tmp_path / "graddoctor.lock").exists()


# ------------------------------------------------------------------ 4: resume
def test_resume_continues_the_run_as_if_never_stopped(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()))
    with gd.watch(model, opt, tmp_path / "whole", flush_every=3) as w:
        train(w, model, opt, 10)
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    with gd.watch(model, opt, tmp_path / "parts", flush_every=3) as w:
        train(w, model, opt, 6)
    with gd.watch(model, opt, tmp_path / "parts", flush_every=3, resume=True) as w:
        assert w.step_index == 6
        g = torch.Generator().manual_seed(0)
        [torch.randn(16, 6, generator=g) for _ in range(6)]  # the batches of steps 0-5 were used
        for _ in range(4):
            x = torch.randn(16, 6, generator=g)
            loss = (model(x) - x[:, :3]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
    whole, parts = gd.open_run(tmp_path / "whole"), gd.open_run(tmp_path / "parts")
    for series in ("loss", "grad_total_norm", "grad_norm", "weight_norm", "update_norm"):
        (s1, d1), (s2, d2) = whole.series(series), parts.series(series)
        assert s1.tolist() == s2.tolist()
        np.testing.assert_array_equal(d1, d2)  # the same float32 operations on the same values
    assert [r["step"] for r in parts.meta["resumed"]] == [6]


def test_resume_at_an_earlier_checkpoint_drops_the_replayed_steps(tmp_path):
    record(tmp_path, steps=8)
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gd.watch(model, opt, tmp_path, flush_every=3, resume=5) as w:
        assert w.step_index == 5
        train(w, model, opt, 2)
    steps, _ = gd.open_run(tmp_path).global_norm()
    assert steps.tolist() == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(gd.ConfigError, match=r"resume=9 is not allowed: this run has steps 0-6; .* 0\.\.7"):
        gd.watch(model, opt, tmp_path, resume=9)


def test_resume_with_other_tensors_names_them(tmp_path):
    record(tmp_path)
    other = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4), nn.Linear(4, 4))
    with pytest.raises(gd.ConfigError) as e:
        gd.watch(other, run_dir=tmp_path, resume=True)
    msg = str(e.value)
    assert "'3.weight', '3.bias'" in msg and "2.weight float32[3, 12] -> float32[4, 12]" in msg
    assert gd.open_run(tmp_path).tensors == [n for n, _ in mlp().named_parameters()]  # left as it was


def test_resume_into_an_empty_directory_starts_a_run(tmp_path):
    with gd.watch(mlp(), run_dir=tmp_path / "new", resume=True) as w:
        assert w.step_index == 0


# ------------------------------------------------------------------ 5: reading needs no write access
def _can_bind_read_only() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True)
    return probe.returncode == 0


# Runs graddoctor commands in one process (one torch import) and prints [[code, stdout, stderr], ...].
READER = """
import contextlib, io, json, sys
from graddoctor.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _read_only(run_dir: Path, commands: list[list[str]]) -> list[list]:
    """Run graddoctor commands with run_dir read-only: for root, a read-only bind mount in a private
    mount namespace; for an ordinary user, a directory without write permission."""
    argv = [sys.executable, "-c", READER, json.dumps(commands)]
    if os.geteuid() != 0:
        run_dir.chmod(0o555)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True)
        finally:
            run_dir.chmod(0o755)
    else:
        script = (f'mount --bind "{run_dir}" "{run_dir}" && mount -o remount,ro,bind "{run_dir}" && '
                  f'! touch "{run_dir}/probe" 2>/dev/null && exec "$@"')
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and not _can_bind_read_only(), reason="root without mount namespaces")
@pytest.mark.parametrize("killed", [False, True], ids=["closed", "killed-mid-run"])
def test_a_run_in_a_read_only_place_can_be_read(tmp_path, capsys, killed):
    run_dir = tmp_path / "run"
    if killed:  # the writer died holding the store open: its write-ahead log is still there
        child = _start("hold", run_dir, 1)
        _read_until(child, "ready")
        child.send_signal(signal.SIGKILL)
        child.wait()
    else:
        record(run_dir)
    commands = [["runs", "summary", str(run_dir)], ["diagnose", str(run_dir)]]
    want = [cli(*argv, capsys=capsys)[:2] for argv in commands]
    report = tmp_path / "report.html"
    got = _read_only(run_dir, commands + [["report", str(run_dir), "-o", str(report)]])
    assert [g[:2] for g in got[:2]] == [list(w) for w in want], got
    assert got[2][0] == 0, got[2]
    assert report.stat().st_size > 1000


# ------------------------------------------------------------------ 6: a missing loss is not a NaN loss
def _codes(run_dir, at_least="warning"):
    bar = ["info", "warning", "critical"].index(at_least)
    return sorted(f.code for f in gd.diagnose(run_dir) if f.rank >= bar)


@pytest.mark.parametrize("seed", range(3))
def test_a_loss_every_tenth_step_is_diagnosed_as_the_full_loss(tmp_path, seed):
    runs = {}
    for every in (1, 10):
        torch.manual_seed(seed)
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        with gd.watch(model, opt, tmp_path / str(every)) as w:
            train(w, model, opt, 300, seed=seed, loss_every=every)
        runs[every] = _codes(tmp_path / str(every))
    assert runs[1] == [] and runs[10] == []  # healthy, and no "critical nonfinite" from missing losses
    steps, loss = gd.open_run(tmp_path / "10").loss()
    assert steps.tolist() == list(range(0, 300, 10)) and np.isfinite(loss).all()


def test_a_nan_loss_among_missing_ones_is_still_critical(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gd.watch(model, opt, tmp_path, live_diagnosis=False) as w:
        train(w, model, opt, 60, loss_every=10, nan_loss_at=(33,))
    (f,) = [f for f in gd.diagnose(tmp_path) if f.code == "nonfinite_gradient"]
    assert f.severity == "critical" and f.first_step == 33 and f.last_step == 33


def test_views_say_a_missing_loss_is_missing(tmp_path, capsys):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gd.watch(model, opt, tmp_path) as w:
        train(w, model, opt, 25, loss_every=10)
    _, loss = gd.open_run(tmp_path).loss()
    code, out, _ = cli("runs", "summary", tmp_path, capsys=capsys)
    assert code == 0 and "steps: 25" in out.replace("steps:  ", "steps: ") and "nan" not in out.lower()
    assert f"last loss: {loss[-1]:.3g} (step 20)" in out  # the last loss given, not the NaN of a step without one


# ------------------------------------------------------------------ 7: disk full
def _tmpfs_run(mode: str, tmp_path: Path, size="768k"):
    """Run the child with its run dir on a fresh tmpfs of `size`; returns (stdout, stderr, store copy)."""
    copy = tmp_path / "copy"
    script = (f'mount -t tmpfs -o size={size} tmpfs "{tmp_path}/fs" && '
              f'"{sys.executable}" "{CHILD}" {mode}"{tmp_path}/fs/fill" "{tmp_path}/fs/run" 5; '
              f'code=$?; cp -r "{tmp_path}/fs/run" "{copy}"; exit $code')
    (tmp_path / "fs").mkdir()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr, copy


needs_tmpfs = pytest.mark.skipif(not _can_bind_read_only(), reason="needs root and mount namespaces for a tmpfs")


@pytest.mark.slow
@needs_tmpfs
def test_a_full_disk_keeps_the_steps_and_writes_them_when_space_returns(tmp_path):
    out, err, copy = _tmpfs_run("filler=", tmp_path)
    assert "disk full" in out and "disk freed" in out and "closed" in out
    assert err.count("could not write steps") == 1 and "Training goes on" in err  # warned once, not raised
    run = gd.open_run(copy)
    for series in ("loss", "grad_total_norm", "grad_norm"):
        assert run.series(series)[0].tolist() == list(range(40))  # nothing lost
    assert "closed_at" in run.meta


@pytest.mark.slow
@needs_tmpfs
def test_steps_that_never_fit_are_named_at_close(tmp_path):
    out, err, copy = _tmpfs_run("keep=", tmp_path)
    assert "closed" in out and "Traceback" not in err
    lost = [line for line in err.splitlines() if "could not be written" in line]
    assert len(lost) == 1 and "and are lost" in lost[0]
    first = int(lost[0].split("steps ")[1].split("-")[0])
    assert gd.open_run(copy).series("grad_total_norm")[0].tolist() == list(range(first))  # all before it are kept


# ------------------------------------------------------------------ 8: signals
def _steps_seen(lines):
    return [int(x.split()[1]) for x in lines if x.startswith("step ")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_flushes_and_closes_the_run(tmp_path, sig):
    child = _start("loop", tmp_path)
    lines = _read_until(child, "step 30")
    child.send_signal(sig)
    rest, err = child.communicate(timeout=60)
    lines += rest.splitlines()
    assert child.returncode in (-sig, 128 + sig, 1)  # dies of SIGTERM; Ctrl-C: KeyboardInterrupt, exit 1
    if sig == signal.SIGTERM:
        assert child.returncode == -signal.SIGTERM and "Traceback" not in err
    run = gd.open_run(tmp_path)
    recorded = run.series("grad_total_norm")[0].tolist()
    last_printed = max(_steps_seen(lines))
    assert recorded == list(range(len(recorded))) and len(recorded) >= 31  # none of the 30+ steps lost
    assert recorded[-1] >= last_printed - 1 and "closed_at" in run.meta
    for series in ("loss", "grad_norm", "weight_norm"):  # no half-written step
        assert run.series(series)[0].tolist() == recorded


@pytest.mark.slow
def test_the_users_own_sigterm_handler_is_kept(tmp_path):
    child = _start("own-term", tmp_path)
    _read_until(child, "step 5")
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and "closed" in out, err  # the user's handler ran; ours did not replace it


# ------------------------------------------------------------------ 10: clear errors from the API
def sparse_model():
    return nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))


@pytest.mark.parametrize("make, kwargs, pattern", [
    (sparse_model, {}, r"'0' is Embedding\(sparse=True\).*use sparse=False"),
    (lambda: nn.Linear(3, 3, dtype=torch.complex64), {}, "parameter 'weight' is complex64: .*real floating-point"),
    (lambda: nn.Linear(3, 3).to("meta"), {}, "meta device.*run_dir=None"),
    (mlp, dict(overwrite="no"), "overwrite='no' is not allowed: use True or False"),
    (mlp, dict(live_diagnosis="off"), "live_diagnosis='off' is not allowed: use True or False"),
    (mlp, dict(input_stats=None), "input_stats=None is not allowed: use True or False"),
    (mlp, dict(flush_every=10**30), r"flush_every=1000000000000000000000000000000 is not allowed: use an integer in 1\.\."),
    (mlp, dict(flush_every=0), r"flush_every=0 is not allowed"),
    (mlp, dict(flush_every=2.0), r"flush_every=2\.0 is not allowed"),
    (mlp, dict(saturation_margin="x"), r"saturation_margin='x' is not allowed: use a number in \(0, 0\.5\)"),
    (mlp, dict(saturation_margin=math.nan), r"saturation_margin=nan is not allowed"),
    (mlp, dict(activation_every=-1), r"activation_every=-1 is not allowed"),
    (mlp, dict(resume="yes"), r"resume='yes' is not allowed"),
    (mlp, dict(resume=True, overwrite=True), r"not both"),
])
def test_bad_models_and_options_are_refused_by_name(tmp_path, make, kwargs, pattern):
    with pytest.raises(gd.GradDoctorError, match=pattern):
        gd.watch(make(), run_dir=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run" / "graddoctor.sqlite").exists()


def test_sparse_gradients_from_elsewhere_are_refused_at_the_first_step():
    emb = nn.Embedding(10, 4)
    w = gd.watch(emb)
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 4), (10, 4), check_invariants=True)
    with pytest.raises(gd.GradDoctorError, match="'weight' has a sparse_coo gradient"):
        w.step()


@pytest.mark.parametrize("run_dir, pattern", [("", "run_dir='' is not allowed"),
                                              ("FILE", "is a file, not a directory")])
def test_bad_run_dirs_are_refused(tmp_path, monkeypatch, run_dir, pattern):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    with pytest.raises(gd.ConfigError, match=pattern):
        gd.watch(mlp(), run_dir=run_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written in the current folder


def test_use_after_close_is_a_clear_error(tmp_path):
    w = gd.watch(mlp(), run_dir=tmp_path)
    w.close()
    with pytest.raises(gd.GradDoctorError, match=r"record_event\('note'\) called after close"):
        w.record_event("note", {})
    with pytest.raises(RuntimeError, match="after close"):  # still a RuntimeError, as before
        w.step()


def test_two_steps_without_an_optimizer_step_warn_once(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = gd.watch(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(w, model, opt, 3)  # a correct loop: silent
        assert not caught
        for _ in range(3):
            model(torch.randn(2, 6)).sum().backward()
            w.step()
            w.step()  # the bug: a second step() for one optimizer step
            opt.step()
    (warning,) = [c for c in caught if "no optimizer.step()" in str(c.message)]
    assert "at step 4" in str(warning.message) and warning.filename == __file__
