"""A training run in a second process that waits for its reader after every flush (tests/test_store.py).

After each flush it prints `flushed N` (N steps are in the store) and blocks until a line arrives on
stdin, so the reader sees the store between two flushes, whatever the machine's load. The run is
closed after the last flush; then it prints `done`.
"""
import sys

import torch
from torch import nn

import graddoctor as gd


def main(run_dir: str, steps: int, flush_every: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gd.watch(model, opt, run_dir, flush_every=flush_every)
    for step in range(steps):
        loss = (model(torch.randn(16, 8)) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        w.step(loss)  # flushes, in this call, every flush_every steps
        opt.step()
        if (step + 1) % flush_every == 0:
            print(f"flushed {step + 1}", flush=True)
            if sys.stdin.readline() != "go\n":  # the reader went away
                sys.exit(1)
    w.close()
    print("done", flush=True)


if __name__ == "__main__":  # only as a script: importing it must not train and write a run
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
