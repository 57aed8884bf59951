"""Seed 000's example: 1 input, 3 hidden, 1 output sigmoid neurons.

dC/db1 = s'(z1) w2 s'(z2) w3 s'(z3) w4 s'(z4) dC/da4, and its tails for b2, b3, b4,
computed by hand here and compared with what watch recorded in the store.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def analytic_bias_grads(w, b, x, y):
    """Forward and backward by hand for C = (a4 - y)^2 / 2."""
    a, zs = x, []
    for wi, bi in zip(w, b):
        z = wi * a + bi
        zs.append(z)
        a = sigmoid(z)
    dC_da4 = a - y
    ds = [sigmoid(z) * (1 - sigmoid(z)) for z in zs]  # s'(z) = s(z)(1 - s(z)) <= 0.25
    grads = []
    for k in range(4):  # dC/db_{k+1} = s'(z_{k+1}) * prod_{j>k+1} w_j s'(z_j) * dC/da4
        g = ds[k]
        for j in range(k + 1, 4):
            g *= w[j] * ds[j]
        grads.append(g * dC_da4)
    return grads


def chain(w, b):
    layers = []
    for wi, bi in zip(w, b):
        lin = nn.Linear(1, 1)
        with torch.no_grad():
            lin.weight.fill_(wi)
            lin.bias.fill_(bi)
        layers += [lin, nn.Sigmoid()]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("w,b", [
    ([0.8, -0.5, 0.9, 0.7], [0.1, -0.2, 0.3, 0.05]),     # |w| < 1: shrinks toward the input
    ([9.0, 8.0, -7.0, 10.0], [-4.0, -3.5, 3.0, -5.0]),    # large weights at the sigmoid's centre: grows
])
def test_recorded_bias_gradients_equal_the_analytic_product(tmp_path, w, b):
    x, y = 0.5, 1.0
    model = chain(w, b)
    with gd.watch(model, run_dir=tmp_path) as watcher:
        loss = 0.5 * (model(torch.tensor([[x]], dtype=torch.float64)) - y).pow(2).sum()
        loss.backward()
        watcher.step(loss)
    expected = analytic_bias_grads(w, b, x, y)
    # this loop and autograd form the same float64 product, each within the first-order bound of
    # graddoctor.lab.chain.rounding_bound of the exact one; watch stores the float32 norm (WATCH_REL)
    # and the float32 max-abs (one rounding) of autograd's
    from graddoctor.lab.chain import U32, WATCH_REL, rounding_bound
    bound = 2 * rounding_bound(np.array(w), np.array(b), x, y)
    run = gd.open_run(tmp_path)
    for k in range(4):
        h = run.tensor_history(f"{2 * k}.bias")
        assert abs(float(h.grad_norm[0]) - abs(expected[k])) <= ((1 + bound[k]) * (1 + WATCH_REL) - 1) * abs(expected[k])
        assert abs(float(h.grad_maxabs[0]) - abs(expected[k])) <= ((1 + bound[k]) * (1 + U32) - 1) * abs(expected[k])
    steps, loss_values = run.loss()
    assert loss_values[0] == float(loss.detach())  # a float64 loss is stored as it is


def test_gradients_shrink_toward_the_input_with_small_weights():
    g = analytic_bias_grads([0.8, -0.5, 0.9, 0.7], [0.1, -0.2, 0.3, 0.05], 0.5, 1.0)
    # Every factor w_j s'(z_j) is below 0.25 in size, so each earlier bias gets less.
    assert abs(g[0]) < abs(g[1]) < abs(g[2]) < abs(g[3])
    assert abs(g[0]) / abs(g[3]) < 0.25 ** 3
