"""A plain training loop under watch, run as a child process by tests/test_trust.py.

    python _trust_child.py MODE RUN_DIR [FLUSH_EVERY]

It prints "step N" (flushed) after each `w.step()`, so the parent knows how far it got, and
never closes the watch by itself unless MODE says so:
  hold       train 3 steps, flush, then print "ready" and wait forever (to be killed)
  loop       train until killed (SIGTERM, SIGINT or SIGKILL from the parent)
  own-term   install its own SIGTERM handler first; on SIGTERM it stops the loop and closes
  filler=P   (disk full) train, fill the disk with the file P after 10 steps, free it after 25, stop at 40
  keep=P     as filler=P, but the disk stays full until the watch is closed
"""
import os
import signal
import sys
import time
import warnings

import torch
from torch import nn

import graddoctor as gd


def main(mode: str, run_dir: str, flush_every: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stop = []
    if mode == "own-term":
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    warnings.simplefilter("always")
    w = gd.watch(model, opt, run_dir, flush_every=flush_every, live_diagnosis=False)
    step = 0
    while not stop:
        x = torch.randn(32, 8)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
        print(f"step {step}", flush=True)
        step += 1
        if mode == "hold" and step == 3:
            w.flush()
            print("ready", flush=True)
            while True:
                time.sleep(1)
        if mode.startswith(("filler=", "keep=")):
            disk_full(mode.split("=", 1)[1], step, free=mode.startswith("filler="))
            if step == 40:
                break
        time.sleep(0.002)
    w.close()
    print("closed", flush=True)


def disk_full(path: str, step: int, free: bool) -> None:
    if step == 10:  # fill the filesystem: every later write fails with "database or disk is full"
        with open(path, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        print("disk full", flush=True)
    if step == 25 and free:
        os.remove(path)
        print("disk freed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1000)
