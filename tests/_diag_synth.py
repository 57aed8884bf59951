"""Hand-built histories (RunData) for rule tests: every array chosen by the test, nothing trained."""
from __future__ import annotations

import numpy as np

from graddoctor.diagnosis import RunData


def make_data(loss=None, global_norm=None, grad_norm=None, weight_norm=None, *, T=None, P=3, width=16,
              update_norm=None, sample_every=10, inputs=None, act=None, act_kinds=(), modules=None,
              grad_nonfinite=None, shapes=None) -> RunData:
    """A RunData of T steps and P weight matrices [width, width] named l0.weight, l1.weight, ...

    Defaults describe a healthy run: grad/weight 1e-2 on every layer, loss 1.0, global norm 1.
    """
    if T is None:
        T = len(loss) if loss is not None else (len(global_norm) if global_norm is not None else 100)
    steps = np.arange(T, dtype=np.int64)
    loss = np.ones(T) if loss is None else np.asarray(loss, dtype=np.float64)
    shapes = shapes or [(width, width)] * P
    w0 = np.array([np.sqrt(np.prod(s)) * (1.0 / np.sqrt(s[-1])) for s in shapes], dtype=np.float32)
    s_steps = steps[::sample_every]
    weight_norm = np.tile(w0, (len(s_steps), 1)) if weight_norm is None else np.asarray(weight_norm, np.float32)
    grad_norm = (np.tile(w0 * 1e-2, (T, 1)) if grad_norm is None else np.asarray(grad_norm, np.float32)).reshape(T, P)
    if global_norm is None:
        global_norm = np.sqrt(np.square(grad_norm.astype(np.float64)).sum(axis=1))
    update_norm = (weight_norm * 1e-3 if update_norm is None else np.asarray(update_norm, np.float32))
    nf = np.zeros((T, P), np.int64) if grad_nonfinite is None else np.asarray(grad_nonfinite, np.int64)
    names = [f"l{i}.weight" for i in range(P)]
    kinds = list(act_kinds)
    act = np.zeros((0, len(kinds), 6), np.float32) if act is None else np.asarray(act, np.float32)
    a_steps = steps[:: max(1, T // max(1, len(act)))][: len(act)] if len(act) else np.zeros(0, np.int64)
    inp = np.tile(np.array([3.0, 0.0, 0.0, 1.0], np.float32), (T, 1)) if inputs is None else np.asarray(inputs, np.float32)
    return RunData(steps=steps, loss=loss, global_norm=np.asarray(global_norm, np.float32), grad_norm=grad_norm,
                   grad_nonfinite=nf, sample_steps=s_steps, weight_norm=weight_norm, update_steps=s_steps[: len(update_norm)],
                   update_norm=update_norm, tensors=names, tensor_module=[n.rsplit(".", 1)[0] for n in names],
                   tensor_shape=[tuple(s) for s in shapes],
                   modules=modules if modules is not None else {n.rsplit(".", 1)[0]: "Linear" for n in names},
                   act_steps=a_steps, act=act, act_modules=[f"a{j}" for j in range(len(kinds))], act_kinds=kinds,
                   input_steps=steps[: len(inp)], inputs=inp)
