"""Every remedy snippet in the diagnose catalogue runs against graddoctor's real API."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graddoctor as gd
from graddoctor.diagnosis import CATALOGUE, remedy


class _RNNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _namespace(remedy_id, tmp_path):
    torch.manual_seed(0)
    recurrent = remedy_id in ("lstm", "gru", "truncated_bptt")
    model = _RNNNet() if recurrent else nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(),
                                                       nn.Linear(8, 2))
    if remedy_id == "zero_residual_init":  # needs residual branches to zero
        model, _ = gd.surgery.add_residual(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    return dict(gd=gd, nn=nn, torch=torch, model=model, opt=opt, run_dir=tmp_path / "run", x=x, x_batch=x,
                x_train=torch.randn(64, 4), loss=model(torch.randn(4, 5, 3) if recurrent else x).pow(2).mean(),
                rnn=model.rnn if recurrent else None, seq=torch.randn(2, 70, 3), h=torch.zeros(1, 2, 8),
                DataLoader=DataLoader, dataset=TensorDataset(x), batch_size=8, depth=4,
                make_model=lambda depth: nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)]))


@pytest.mark.parametrize("remedy_id", sorted(CATALOGUE))
def test_snippet_runs(remedy_id, tmp_path):
    ns = _namespace(remedy_id, tmp_path)
    before = [p.detach().clone() for p in ns["model"].parameters()]
    snippet = remedy(remedy_id, act="nn.Sigmoid").snippet
    exec(compile(snippet, f"<remedy {remedy_id}>", "exec"), ns)
    if "w" in ns and isinstance(ns["w"], gd.Watch):
        ns["w"].close()
    assert isinstance(ns["model"], nn.Module)  # the snippet leaves a model to keep training
    if remedy_id in ("relu", "leaky_relu", "elu"):
        assert not any(isinstance(m, nn.Sigmoid) for m in ns["model"].modules())
    if remedy_id in ("lstm", "gru"):
        assert not any(type(m) is nn.RNN for m in ns["model"].modules())
    if remedy_id in ("he_init", "xavier_init", "orthogonal_init", "lsuv_init"):
        after = list(ns["model"].parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_catalogue_ids_match_treat():
    from graddoctor.treat._remedies import REMEDIES
    assert set(CATALOGUE) == set(REMEDIES)
