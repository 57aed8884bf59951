"""Mirrors: a real training run watched with a SummaryWriter, a W&B offline run and an MLflow file-store run,
each read back with the backend's own reader and compared with oracles taken in the training loop."""
from __future__ import annotations

import glob
import math
import struct
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor._errors import ConfigError
from graddoctor.core._blocks import block_of, group_by_block
from graddoctor.diagnosis._live import FindingWarning
from graddoctor.mirror import Mirror, MLflowMirror, TensorBoardMirror, as_mirror

STEPS, FLUSH_EVERY, SAMPLE_EVERY = 10, 5, 2
NAN_AT, INF_AT, NAN_LOSS_AT = 3, 6, 8
# the blocks of Net, written out by hand (the oracle for block_of on this model)
BLOCKS = {"inp": ["inp.weight", "inp.bias"], "head": ["head.weight", "head.bias"],
          **{f"layers.{i}": [f"layers.{i}.{j}.{k}" for j in (0, 2) for k in ("weight", "bias")] for i in range(3)}}
# float32 statistics against float64 oracles: a few ulps of float32 over sums of a few hundred terms
RTOL = 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)) for _ in range(3))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class Rows(Mirror):
    """A user's own mirror: keeps what it is given."""

    def __init__(self):
        self.rows, self.texts, self.flushes = [], [], 0

    def scalars(self, step, values):
        self.rows.append((step, dict(values)))

    def text(self, step, tag, text):
        self.texts.append((step, tag, text))

    def flush(self):
        self.flushes += 1


def _norm64(t):
    return float(torch.linalg.vector_norm(t.detach().double()))


def train(run_dir, mirror, on_step=None, on_finding=None):
    """Ten SGD steps with a NaN gradient entry at NAN_AT, an Inf one at INF_AT (both zeroed before the
    optimizer step, so the weights stay finite) and a NaN loss given at NAN_LOSS_AT. Returns the oracles."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    names = [n for n, _ in model.named_parameters()]
    oracle = {"total": {}, "block": {}, "ratio": {}, "block_ratio": {}, "loss": {}}
    w = gd.watch(model, opt, run_dir, mirror=mirror, on_finding=on_finding,
                 flush_every=FLUSH_EVERY, sample_every=SAMPLE_EVERY)
    for s in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        bad = {NAN_AT: math.nan, INF_AT: math.inf}.get(s)
        if bad is not None:
            model.layers[1][0].weight.grad[0, 0] = bad
        grads = [p.grad for p in model.parameters()]
        oracle["total"][s] = float(torch.nn.utils.get_total_norm(grads))
        per = dict(zip(names, (_norm64(g) for g in grads)))
        oracle["block"][s] = {b: math.sqrt(sum(per[n] ** 2 for n in ns)) for b, ns in BLOCKS.items()}
        given = torch.tensor(math.nan) if s == NAN_LOSS_AT else loss
        oracle["loss"][s] = float(given.detach())
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        w.step(given)
        if bad is not None:
            model.layers[1][0].weight.grad[0, 0] = 0.0
        opt.step()
        if s % SAMPLE_EVERY == 0:
            u2 = {n: _norm64(p.detach().double() - before[n]) ** 2 for n, p in model.named_parameters()}
            w2 = {n: _norm64(before[n]) ** 2 for n in names}
            oracle["ratio"][s] = math.sqrt(sum(u2.values()) / sum(w2.values()))
            oracle["block_ratio"][s] = {b: math.sqrt(sum(u2[n] for n in ns) / sum(w2[n] for n in ns))
                                        for b, ns in BLOCKS.items()}
        if on_step is not None:
            on_step(s)
    w.close()
    return oracle


def _close(got, want):
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want):
        return got == want
    return math.isclose(got, want, rel_tol=RTOL)


def _expected(oracle):
    """{tag: {step: value}} the mirrors must hold (tags as on TensorBoard and W&B)."""
    out = {"graddoctor/grad_norm": oracle["total"], "graddoctor/loss": oracle["loss"],
           "graddoctor/update_ratio": oracle["ratio"],
           "graddoctor/nonfinite": {s: float(s in (NAN_AT, INF_AT, NAN_LOSS_AT)) for s in range(STEPS)}}
    for b in BLOCKS:
        out[f"graddoctor/grad_norm/{b}"] = {s: v[b] for s, v in oracle["block"].items()}
        out[f"graddoctor/update_ratio/{b}"] = {s: v[b] for s, v in oracle["block_ratio"].items()}
    return out


def _assert_matches(read, oracle, rename=lambda tag: tag):
    """`read(tag) -> {step: value}` holds every expected value, NaN and Inf included, at its step."""
    for tag, want in _expected(oracle).items():
        got = read(rename(tag))
        assert sorted(got) == sorted(want), (tag, sorted(got), sorted(want))
        bad = {s: (got[s], want[s]) for s in want if not _close(got[s], want[s])}
        assert not bad, (tag, bad)


# ---------------------------------------------------------------- one run, three backends
def _wandb_history(path):
    """The history rows of an offline run's `.wandb` file, read with the record format's own rules
    (a 7-byte header, then records in 32 KiB blocks: crc32c, length, type, payload) and W&B's protobuf."""
    from wandb.proto import wandb_internal_pb2
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    pos, block, payload, rows = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        n, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        payload += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # full, or last of a split record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """One watched training run mirrored to TensorBoard, W&B (offline) and MLflow (file store), and what
    the TensorBoard event file held after the 4th and the 5th step."""
    tmp = tmp_path_factory.mktemp("mirror")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow
        import wandb
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(tmp / "tb"))
        run = wandb.init(project="graddoctor-test", dir=str(tmp), mode="offline")
        previous_uri = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri((tmp / "mlruns").as_uri())
        active = mlflow.start_run()
        seen, findings = {}, []

        def on_step(s):
            if s in (FLUSH_EVERY - 2, FLUSH_EVERY - 1):  # after the 4th and the 5th step
                writer.flush()
                seen[s + 1] = _tb_scalars(tmp / "tb").get("graddoctor/grad_norm", {})

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FindingWarning)
                oracle = train(tmp / "run", [writer, run, active], on_step, findings.append)
        finally:
            writer.close()
            run.finish()
            mlflow.end_run()
            mlflow.set_tracking_uri(previous_uri)
        run_file = glob.glob(str(tmp / "wandb" / "offline-run-*" / "run-*.wandb"))
        assert len(run_file) == 1, run_file
        yield {"tmp": tmp, "oracle": oracle, "seen": seen, "findings": findings, "wandb": run_file[0],
               "mlflow": (tmp / "mlruns").as_uri(), "mlflow_run": active.info.run_id}


def _tb_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def _tb_texts(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    ea.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in ea.Tensors("graddoctor/findings/text_summary")]


@pytest.mark.slow
def test_tensorboard_holds_the_oracles_values_nan_and_inf_included(mirrored):
    scalars = _tb_scalars(mirrored["tmp"] / "tb")
    _assert_matches(lambda tag: scalars.get(tag, {}), mirrored["oracle"])
    assert not any(t.startswith("graddoctor/grad_norm/layers.1.") for t in scalars), "blocks, not tensors"


@pytest.mark.slow
def test_values_are_written_at_flushes_only(mirrored):
    assert mirrored["seen"][FLUSH_EVERY - 1] == {}
    assert sorted(mirrored["seen"][FLUSH_EVERY]) == list(range(FLUSH_EVERY))


@pytest.mark.slow
def test_each_finding_reaches_tensorboard_as_text_and_the_users_on_finding_still_runs(mirrored):
    findings = mirrored["findings"]
    assert any(f.code == "nonfinite_gradient" for f in findings), [f.code for f in findings]
    texts = _tb_texts(mirrored["tmp"] / "tb")
    assert sorted((f.last_step, f.code) for f in findings) == sorted(
        (step, next(f.code for f in findings if f.code in text)) for step, text in texts)
    assert all(f.message in text for f in findings for _, text in texts if f.code in text)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_values_with_its_step_metric(mirrored):
    rows = _wandb_history(mirrored["wandb"])
    values: dict[str, dict[int, float]] = {}
    for row in rows:
        if "graddoctor/step" not in row:
            continue
        step = int(row["graddoctor/step"])
        for key, text in row.items():
            if key.startswith("graddoctor/") and key not in ("graddoctor/step", "graddoctor/findings"):
                values.setdefault(key, {})[step] = float(text)  # json's NaN, Infinity, -Infinity
    _assert_matches(lambda tag: values.get(tag, {}), mirrored["oracle"])
    texts = [row["graddoctor/findings"] for row in rows if "graddoctor/findings" in row]
    assert {f.code for f in mirrored["findings"]} == {c for f in mirrored["findings"] for t in texts
                                                      if (c := f.code) in t}


@pytest.mark.slow
def test_mlflow_file_store_holds_the_values(mirrored):
    from mlflow import MlflowClient
    client = MlflowClient(mirrored["mlflow"])
    run_id = mirrored["mlflow_run"]

    def read(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    global_leaf = {"graddoctor/grad_norm": "graddoctor/grad_norm/global",
                   "graddoctor/update_ratio": "graddoctor/update_ratio/global"}
    _assert_matches(read, mirrored["oracle"], lambda tag: global_leaf.get(tag, tag))
    text = open(client.download_artifacts(run_id, "graddoctor/findings.txt", str(mirrored["tmp"]))).read()
    assert all(f.message in text for f in mirrored["findings"])


# ---------------------------------------------------------------- no backend needed
def test_a_users_mirror_gets_one_row_per_step_and_one_flush_per_flush(tmp_path):
    rows = Rows()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FindingWarning)
        oracle = train(tmp_path / "run", rows)
    assert rows.flushes == STEPS // FLUSH_EVERY
    by_step: dict[int, dict] = {}
    for step, values in rows.rows:
        by_step.setdefault(step, {}).update(values)
    _assert_matches(lambda tag: {s: v[tag] for s, v in by_step.items() if tag in v}, oracle)


class Broken(Mirror):
    def scalars(self, step, values):
        raise OSError("disk full")

    def text(self, step, tag, text):
        pass


def test_a_failing_mirror_warns_once_and_training_and_the_other_mirrors_go_on(tmp_path):
    rows = Rows()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path / "run", [Broken(), rows])
    failed = [str(c.message) for c in caught if "mirror" in str(c.message)]
    assert len(failed) == 1 and "Broken" in failed[0] and "disk full" in failed[0], failed
    assert sorted({s for s, _ in rows.rows}) == list(range(STEPS))
    with gd.open_run(tmp_path / "run") as run:
        assert run.num_steps == STEPS


@pytest.mark.parametrize("bad", [object(), "runs/tb", [Rows(), 3.5]])
def test_an_unknown_mirror_is_refused_in_one_line_and_nothing_is_written(tmp_path, bad):
    model = Net()
    with pytest.raises(ConfigError) as e:
        gd.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", mirror=bad)
    message = str(e.value)
    assert "\n" not in message and "mirror=" in message and "SummaryWriter" in message
    assert type(bad[-1] if isinstance(bad, list) else bad).__name__ in message
    assert not (tmp_path / "run").exists()


def test_a_mirror_needs_a_run_dir():
    model = Net()
    with pytest.raises(ConfigError, match="mirror= needs a run_dir"):
        gd.watch(model, mirror=Rows())


def test_as_mirror_not_strict_skips_what_it_does_not_know():
    assert as_mirror(object(), strict=False) is None
    rows = Rows()
    assert as_mirror(rows) is rows


# ---------------------------------------------------------------- blocks
@pytest.mark.parametrize("name, block", [
    ("transformer.h.3.attn.c_attn.weight", "transformer.h.3"), ("layers.0.linear1.weight", "layers.0"),
    ("transformer.wte.weight", "transformer.wte"), ("lm_head.weight", "lm_head"), ("0.weight", "0"),
    ("encoder.layer.11.output.dense.bias", "encoder.layer.11"), ("scale", "scale")])
def test_block_of(name, block):
    assert block_of(name) == block


def test_group_by_block_keeps_model_order_and_bounds_the_number_of_groups():
    names = ["wte.weight"] + [f"h.{i}.{p}" for i in range(200) for p in ("w", "b")] + ["ln_f.weight"]
    assert list(group_by_block(names[:7])) == ["wte", "h.0", "h.1", "h.2"]
    groups = group_by_block(names, max_groups=64)
    assert len(groups) <= 64
    assert sorted(i for idx in groups.values() for i in idx) == list(range(len(names)))
    assert list(groups)[:3] == ["wte", "h.0-3", "h.4-7"] and list(groups)[-1] == "ln_f"  # numbered blocks merge
    assert groups["h.0-3"] == list(range(1, 9))
    many = [f"m{i}.weight" for i in range(100)]  # no numbered family: consecutive blocks merge
    assert list(group_by_block(many, max_groups=50))[:2] == ["m0..m1", "m2..m3"]


# ---------------------------------------------------------------- Lightning's loggers
@pytest.mark.slow
def test_lightning_loggers_become_mirrors_and_others_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
    from mlflow import MlflowClient
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    mirror = as_mirror(tb)
    assert isinstance(mirror, TensorBoardMirror) and mirror.writer is tb.experiment
    ml = MLFlowLogger(tracking_uri=(tmp_path / "mlruns").as_uri())
    mirror = as_mirror(ml)
    assert isinstance(mirror, MLflowMirror) and mirror.run_id == ml.run_id
    mirror.scalars(7, {"graddoctor/grad_norm/global": math.inf, "graddoctor/loss": math.nan})
    mirror.flush()
    history = MlflowClient((tmp_path / "mlruns").as_uri()).get_metric_history(ml.run_id, "graddoctor/grad_norm/global")
    assert [(m.step, m.value) for m in history] == [(7, math.inf)]
    csv = CSVLogger(str(tmp_path / "csv"))
    assert as_mirror(csv, strict=False) is None
    with pytest.raises(ConfigError, match="CSVLogger"):
        as_mirror(csv)
    assert np.isnan(MlflowClient((tmp_path / "mlruns").as_uri())
                    .get_metric_history(ml.run_id, "graddoctor/loss")[0].value)
