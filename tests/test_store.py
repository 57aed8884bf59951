"""The run store: round trip, NaN/Inf kept, crash safety, a reader beside a writer, clear errors."""
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.store._store import STORE_NAME, RunWriter, read_series

SCRIPT = Path(__file__).with_name("_train_script.py")
LOCKSTEP = Path(__file__).with_name("_lockstep_writer.py")


def test_round_trip_keeps_values_and_nonfinite_bits(tmp_path):
    w = RunWriter(tmp_path, {"k": [1, 2]}, [dict(idx=0, name="a", module="", shape="[2]", numel=2, dtype="float32")], [])
    data = np.array([[1.5, math.nan], [math.inf, -math.inf], [0.0, -0.0]], dtype=np.float32)
    counts = np.array([[0, -1], [3, 0], [0, 0]], dtype=np.int64)
    w.write([("x", np.array([0, 1, 2]), data), ("c", np.array([0, 1, 2]), counts)], [(1, "note", {"v": math.nan})])
    w.write([("x", np.array([3]), np.array([[2.0, 3.0]], dtype=np.float32))])
    w.close()
    run = gd.open_run(tmp_path)
    steps, got = run.series("x")
    assert steps.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(got[:3].view(np.uint32), data.view(np.uint32))  # bit for bit
    np.testing.assert_array_equal(run.series("c")[1], counts)
    assert run.meta["k"] == [1, 2]
    ev = run.events("note")
    assert ev[0]["step"] == 1 and math.isnan(ev[0]["data"]["v"])


def train(run_dir, steps, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    grads = []
    with gd.watch(model, run_dir=run_dir, **options) as w:
        for step in range(steps):
            model.zero_grad()
            loss = model(torch.randn(5, 4)).pow(2).mean()
            loss.backward()
            if step == 3:
                model[0].weight.grad[0, 0] = float("nan")
            grads.append([p.grad.detach().clone() for p in model.parameters()])
            w.step(loss)
    return grads


def test_watch_round_trip_matches_the_gradients(tmp_path):
    grads = train(tmp_path, 7, flush_every=3)
    run = gd.open_run(tmp_path)
    assert run.tensors == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert run.layers == ["0", "2"]
    for i, name in enumerate(run.tensors):
        h = run.tensor_history(name)
        assert h.steps.tolist() == list(range(7))
        expected = np.array([float(torch.linalg.vector_norm(g[i].double())) for g in grads])
        np.testing.assert_allclose(h.grad_norm, expected, rtol=1e-5)
    layer = run.layer_history("0")
    assert layer.grad_nonfinite.tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert math.isnan(layer.grad_norm[3]) and math.isnan(run.global_norm()[1][3])
    assert layer.sample_steps.tolist() == list(range(7))  # weight norms: every step by default
    assert layer.update_steps.tolist() == [0]  # update norms: sample_every=10 by default


@pytest.mark.slow
def test_sigkill_leaves_every_flushed_step(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "100000", "5", "0.002"],
                            stdout=subprocess.PIPE, text=True)
    flushed = 0
    for line in proc.stdout:
        flushed = int(line.split()[1])
        if flushed >= 20:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = gd.open_run(tmp_path)
    steps, loss = run.loss()
    assert len(steps) >= flushed  # every flush it announced is there
    assert steps.tolist() == list(range(len(steps)))  # and nothing half-written
    assert len(steps) % 5 == 0
    assert np.isfinite(loss).all()
    assert "closed_at" not in run.meta  # killed: watch.close() never ran, and readers can tell


@pytest.mark.slow
def test_reader_while_writer_is_running(tmp_path):
    """A reader in this process beside a writer in another: after each flush the writer waits for the reader
    (tests/_lockstep_writer.py), which must see exactly the steps flushed so far, and the run grow."""
    steps, every = 400, 10
    proc = subprocess.Popen([sys.executable, str(LOCKSTEP), str(tmp_path), str(steps), str(every)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen, run = [], None
    watchdog = threading.Timer(120, proc.kill)  # a hung writer ends the test instead of blocking readline
    watchdog.start()
    try:
        for flushed in range(every, steps + 1, every):
            assert proc.stdout.readline() == f"flushed {flushed}\n"
            if run is None:
                run = gd.open_run(tmp_path)
            run.refresh()
            seen.append(run.num_steps)
            assert run.loss()[0].tolist() == list(range(flushed))  # the flushed steps, nothing half-written
            proc.stdin.write("go\n")
            proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"
        assert proc.wait(timeout=60) == 0
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert len(set(seen)) > 2, seen  # the reader saw the run grow
    assert seen == sorted(seen)
    assert seen == list(range(every, steps + 1, every))  # and at each flush, exactly the flushed steps
    run.refresh()
    assert run.num_steps == 400


def test_missing_run_dir_gives_clear_error(tmp_path):
    with pytest.raises(gd.RunNotFoundError, match="does not exist"):
        gd.open_run(tmp_path / "nope")
    with pytest.raises(gd.RunNotFoundError, match=STORE_NAME):
        gd.open_run(tmp_path)


def test_corrupt_store_gives_clear_error(tmp_path):
    (tmp_path / STORE_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(gd.CorruptStoreError, match="not a readable graddoctor store"):
        gd.open_run(tmp_path)


@pytest.mark.parametrize("damage", ["substr(data, 1, 7)", "x''", "substr(steps, 1, 8)"])
def test_a_damaged_chunk_gives_clear_error(tmp_path, damage):
    """Blobs cut short or emptied (a disk fault, a stray write): the error names the series, not numpy."""
    train(tmp_path, 3)
    con = sqlite3.connect(tmp_path / STORE_NAME)
    column = "steps" if "steps" in damage else "data"
    with con:
        con.execute(f"UPDATE chunks SET {column} = {damage} WHERE series = 'grad_norm'")
    con.close()
    with gd.open_run(tmp_path) as run, pytest.raises(gd.CorruptStoreError, match="series 'grad_norm'"):
        run.series("grad_norm")


def test_foreign_sqlite_file_is_refused(tmp_path):
    con = sqlite3.connect(tmp_path / STORE_NAME)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    with pytest.raises(gd.CorruptStoreError, match="missing tables"):
        gd.open_run(tmp_path)


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    train(tmp_path, 2)
    with pytest.raises(gd.ConfigError, match="already holds a recorded run"):
        train(tmp_path, 2)
    train(tmp_path, 3, overwrite=True)
    assert gd.open_run(tmp_path).num_steps == 3


def test_layer_history_loads_fast_enough_to_be_practical(tmp_path):
    # 2000 steps x 200 tensors written as 40 flushes; not a timing assertion, a size check.
    tensors = [dict(idx=i, name=f"l{i}.weight", module=f"l{i}", shape="[1]", numel=1, dtype="float32") for i in range(200)]
    w = RunWriter(tmp_path, {}, tensors, [])
    rng = np.random.default_rng(0)
    for k in range(40):
        steps = np.arange(k * 50, (k + 1) * 50)
        w.write([("loss", steps, rng.random((50, 1))), ("grad_norm", steps, rng.random((50, 200)).astype(np.float32)),
                 ("grad_maxabs", steps, rng.random((50, 200)).astype(np.float32)),
                 ("grad_nonfinite", steps, np.zeros((50, 200), dtype=np.int64))])
    w.close()
    size = (tmp_path / STORE_NAME).stat().st_size
    assert size < 2000 * 200 * 4 * 2 * 1.2  # two float32 series dominate; counts compress away
    h = gd.open_run(tmp_path).layer_history("l7")
    assert len(h.steps) == 2000
