"""Accelerate in a plain loop: `gd.watch(model, accelerator_optimizer, run_dir, scaler=accelerator)`.

The oracle is Accelerate's own `clip_grad_norm_`, which returns the total norm before it clips;
watch is stepped before it, so the two read the same gradients. Also, with a real
`torch.amp.GradScaler("cpu")`: watch leaves still-scaled gradients bit for bit as they were, and a
later `unscale_` (what Accelerate's `clip_grad_norm_` does under fp16) still works.
"""
import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd

accelerate = pytest.importorskip("accelerate")

# float32 norms of the same gradients summed in a different order (foreach vs. watch's pass)
# differ by a few ulps times sqrt(number of tensors): far below this
NORM_RTOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton: each test builds its Accelerator from scratch."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _model_and_data(seed=0, n=8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]
    return model, batches


@pytest.mark.slow  # importing accelerate.Accelerator takes ~3 s
def test_plain_loop_records_the_pre_clip_norm_accelerate_returns(tmp_path):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model, batches = _model_and_data()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    returned, losses = [], []
    with gd.watch(model, optimizer, tmp_path / "run", scaler=accelerator, live_diagnosis=False) as w:
        for x, y in batches:
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            w.step(loss)
            returned.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.1)))
            losses.append(float(loss.detach()))
            optimizer.step()
            optimizer.zero_grad()
    run = gd.open_run(tmp_path / "run")
    steps, norms = run.global_norm()
    assert list(steps) == list(range(len(batches)))
    np.testing.assert_allclose(norms, returned, rtol=NORM_RTOL)
    assert min(returned) > 0.1  # watch saw the gradients before clipping to 0.1
    np.testing.assert_allclose(run.loss()[1], losses, rtol=1e-7)


@pytest.mark.slow  # importing accelerate.Accelerator takes ~3 s
def test_gradient_accumulation_records_one_step_per_real_optimizer_step(tmp_path):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, batches = _model_and_data(n=7)  # 7 micro-batches: 3 full steps and a last one of 1 (end of data)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5), loader)
    returned = []
    with gd.watch(model, optimizer, tmp_path / "run", scaler=accelerator, live_diagnosis=False) as w:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    w.step(loss)
                    returned.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.1)))
                optimizer.step()  # AcceleratedOptimizer steps only when sync_gradients
                optimizer.zero_grad()
    steps, norms = gd.open_run(tmp_path / "run").global_norm()
    assert len(returned) == 4 and list(steps) == [0, 1, 2, 3]
    np.testing.assert_allclose(norms, returned, rtol=NORM_RTOL)


@pytest.mark.slow  # importing accelerate.Accelerator takes ~3 s
def test_fp16_on_cpu_runs_without_a_scaler_and_watch_accepts_that_accelerator(tmp_path):
    """Accelerate creates no GradScaler on the CPU (fp16 there runs in float32): scaler=accelerator is then no scaler."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is None
    model, batches = _model_and_data(n=2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    with gd.watch(model, optimizer, tmp_path / "run", scaler=accelerator, live_diagnosis=False) as w:
        assert w.scaler is None
        x, y = batches[0]
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        w.step()
        expected = float(accelerator.clip_grad_norm_(model.parameters(), 0.1))
    np.testing.assert_allclose(gd.open_run(tmp_path / "run").global_norm()[1], [expected], rtol=NORM_RTOL)


def test_watch_leaves_scaled_gradients_untouched_and_a_later_unscale_works(tmp_path):
    """A real GradScaler on the CPU, no guard: w.step() measures the true gradients by dividing the scale
    out of its statistics; the gradients stay scaled, bit for bit, for the loop's own unscale_."""
    model, batches = _model_and_data(n=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    true_norms = []
    with gd.watch(model, optimizer, tmp_path / "run", scaler=scaler, live_diagnosis=False) as w:
        for x, y in batches:
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            before = [p.grad.clone() for p in model.parameters()]
            w.step(loss)
            for p, g in zip(model.parameters(), before):
                assert torch.equal(p.grad, g)  # still scaled, bit for bit
            scaler.unscale_(optimizer)  # would raise if watch had unscaled already
            true_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    run = gd.open_run(tmp_path / "run")
    # the scale is a power of two, so dividing it out of the norm is exact up to the norm's own rounding
    np.testing.assert_allclose(run.global_norm()[1], true_norms, rtol=NORM_RTOL)
    steps, amp = run.amp()
    assert list(steps) == [0, 1, 2]
    assert np.all(amp[:, 0] == 2.0**12) and np.all(amp[:, 1] == 0)  # the scale each step took, no overflow
