"""A short run with a clip_norm(0.01) guard, run as a subprocess by the summary test."""
import sys

import torch
from torch import nn

import graddoctor as gd


def main(run_dir: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with gd.watch(m, opt, run_dir, guard=gd.clip_norm(0.01)) as w:
        for _ in range(5):
            opt.zero_grad()
            loss = m(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            w.step(loss)
            opt.step()


if __name__ == "__main__":  # only as a script: importing it must not train and write a run
    main(sys.argv[1])
