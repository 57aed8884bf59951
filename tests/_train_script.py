"""A training script run as a real subprocess by the store tests (kill -9, concurrent reader)."""
import sys
import time

import torch
from torch import nn

import graddoctor as gd


def main(run_dir: str, steps: int, flush_every: int, sleep: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gd.watch(model, opt, run_dir, flush_every=flush_every)
    for step in range(steps):
        x = torch.randn(16, 8)
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
        if (step + 1) % flush_every == 0:
            print(f"flushed {step + 1}", flush=True)
        time.sleep(sleep)
    w.close()
    print("done", flush=True)


if __name__ == "__main__":  # only as a script: importing it must not train and write a run
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
