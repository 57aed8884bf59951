"""The doctor's prescription as JSON/text/HTML, its ranking rule, its CLI and its Lightning entry."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.doctor._prescription import Prescription, load_prescription
from graddoctor.doctor._ranking import rank
from graddoctor.doctor._trial import Trial

from _cli import run

SCRIPT = '''
import torch
from torch import nn
g = torch.Generator().manual_seed(0)
X = torch.randn(256, 8, generator=g)
Y = (X[:, 0] > 0).long()
DATA = [(X[i:i + 32], Y[i:i + 32]) for i in range(0, 256, 32)]
def build():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return m, torch.optim.SGD(m.parameters(), lr=LR)
def batches():
    return iter(DATA)
loss_fn = nn.functional.cross_entropy
'''


def _trial(name, loss, critical=(), cost=0, losses=None):
    return Trial(name, loss, findings=tuple(critical), critical=tuple(critical), cost=cost,
                 losses=losses if losses is not None else [loss])


def test_ranking_follows_the_stated_rule():
    base = _trial("baseline", 2.0, ("vanishing_gradient",))
    nan = _trial("a", math.nan, losses=[1.0, math.nan])
    tied_critical = _trial("b", 1.00, ("vanishing_gradient",))
    tied_costly = _trial("c", 1.02, cost=3)
    tied_cheap = _trial("d", 1.04, cost=1)
    worse = _trial("e", 1.5)
    order = [t.remedy for t in rank([nan, worse, tied_costly, base, tied_critical, tied_cheap], base)]
    # within 5% of 1.00: the critical finding left ranks last of the tie, then cost; non-finite last of all
    assert order == ["d", "c", "b", "e", "baseline", "a"]


def test_to_json_is_strict_json_and_keeps_nan_and_inf(tmp_path):
    base = _trial("baseline", math.inf, ("nonfinite_gradient",), losses=[1.0, math.inf])
    best = _trial("clip_norm", 0.5, losses=[1.0, math.nan, 0.5])
    rx = Prescription(base, best, [best, base], False, 3, {"rollback": "why"}, out=str(tmp_path))
    text = rx.to_json()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in strict JSON"))
    assert doc["trials"][1]["final_loss"] == "Infinity" and doc["trials"][0]["losses"][1] == "NaN"
    assert doc["prescribed"] == "clip_norm" and doc["trials"][0]["cleared_critical"] is False  # a NaN step
    rx.save(tmp_path)
    back = load_prescription(tmp_path)
    assert back.baseline.final_loss == math.inf and math.isnan(back.best.losses[1])
    assert back.best.remedy == "clip_norm" and back.to_json() == text


@pytest.mark.parametrize("args, needle", [
    (["doctor", "missing.py"], "'missing.py' is not a file"),
    (["doctor", "SCRIPT", "--budget", "0"], "'0' is not allowed"),
    (["doctor", "SCRIPT", "--steps", "0"], "'0' is not allowed"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    script = tmp_path / "s.py"
    script.write_text("x = 1\n")
    done = run(*[str(script) if a == "SCRIPT" else a for a in args])
    assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_cli_names_what_the_script_lacks(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def build(): pass\n")
    done = run("doctor", script, "--out", tmp_path / "o")
    assert done.returncode == 2 and "does not define batches, loss_fn" in done.stderr


def test_bad_arguments_raise_config_error():
    with pytest.raises(gd.ConfigError, match="steps=0 is not allowed"):
        gd.doctor(lambda: None, lambda: iter(()), nn.functional.mse_loss, steps=0)
    with pytest.raises(gd.ConfigError, match="budget_s=-1 is not allowed"):
        gd.doctor(lambda: None, lambda: iter(()), nn.functional.mse_loss, budget_s=-1)
    with pytest.raises(gd.ConfigError, match="build\\(\\) returned NoneType"):
        gd.doctor(lambda: None, lambda: iter([(torch.zeros(1), torch.zeros(1))]), nn.functional.mse_loss, steps=1)


@pytest.mark.slow
def test_cli_doctor_json_and_report(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("LR", "50.0"))  # diverges: a non-finite baseline
    out = tmp_path / "rx"
    done = run("doctor", script, "--steps", "20", "--max-trials", "2", "--workers", "1", "--json", "--out", out)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["healthy"] is False and len(doc["trials"]) == 3
    assert doc == json.loads((out / "prescription.json").read_text())
    for t in doc["trials"]:
        assert Path(t["run_dir"]).parent == out
    page = run("report", out)
    assert page.returncode == 0, page.stderr
    html = (out / "report.html").read_text()
    assert "Prescription" in html and html.count("<b>gradient flow: ") == sum(bool(t["losses"]) for t in doc["trials"])


@pytest.mark.slow
def test_lightning_module_and_datamodule(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())],
                                     nn.Linear(16, 2))

        def training_step(self, batch, i):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(512, 16, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=64)

    rx = gd.doctor.lightning(Net, Data(), steps=40, out=tmp_path, workers=1, max_trials=3)
    assert rx.baseline.findings and len(rx.baseline.losses) == 40
    # the oracle: the module's own training_step in a plain loop gives the baseline's losses
    torch.manual_seed(0)
    m = Net()
    opt = m.configure_optimizers()
    losses = []
    while len(losses) < 40:
        for batch in Data().train_dataloader():
            loss = m.training_step(batch, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert rx.baseline.losses == pytest.approx(losses[:40], rel=1e-5)
