"""REMEDIES: each shared remedy id mapped to the code that implements it, or to a documented snippet.

Values are callables (the graddoctor function that is the remedy) or, for remedies that are a
change to the user's own training code, a string with the snippet. The diagnose catalogue uses
the same ids; a test checks that both cover exactly the same set.
"""
from __future__ import annotations

from typing import Callable, Union

from . import init, surgery
from ._adaptive import agc, auto_clip, zclip
from ._pretrain import layerwise_pretrain
from ._regularization import l1_penalty, l2_penalty
from ._rollback import rollback
from ._skip import skip_nonfinite
from ._transforms import clip_norm, clip_norm_per_tensor, clip_value


def _swap(new: str) -> Callable:
    import torch.nn as nn

    def swap(model, old=(nn.Sigmoid, nn.Tanh)):
        """Swap saturating activations for `{new}` (graddoctor.treat.surgery.swap_activation)."""
        return surgery.swap_activation(model, old, {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01),
                                                    "elu": nn.ELU}[new])
    swap.__name__ = f"swap_to_{new}"
    return swap


def _norm(kind: str) -> Callable:
    def add(model):
        return surgery.add_norm(model, kind=kind)
    add.__name__ = f"add_{kind}_norm"
    add.__doc__ = f"Insert {kind} normalization after each Linear/Conv feeding an activation (surgery.add_norm)."
    return add


REMEDIES: dict[str, Union[Callable, str]] = {
    "clip_by_value": clip_value,
    "clip_by_norm": clip_norm,
    "clip_per_tensor": clip_norm_per_tensor,
    "auto_clip": auto_clip,
    "agc": agc,
    "zclip": zclip,
    "skip_nonfinite": skip_nonfinite,
    "rollback": rollback,
    "lower_learning_rate": 'for g in opt.param_groups:\n    g["lr"] *= 0.1   # or a warmup / decay schedule',
    "sanitize_inputs": "x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)\n"
                       "x = ((x - mean) / std).clamp(-10, 10)   # normalize with training-set statistics, cap outliers",
    "l1_regularization": l1_penalty,
    "l2_regularization": l2_penalty,
    "relu": _swap("relu"),
    "leaky_relu": _swap("leaky_relu"),
    "elu": _swap("elu"),
    "he_init": init.he_,
    "xavier_init": init.xavier_,
    "lsuv_init": init.lsuv_,
    "orthogonal_init": init.orthogonal_,
    "zero_residual_init": init.zero_residual_,
    "batch_norm": _norm("batch"),
    "layer_norm": _norm("layer"),
    "residual_connections": surgery.add_residual,
    "lstm": surgery.rnn_to_lstm,
    "gru": surgery.rnn_to_gru,
    "layerwise_pretraining": layerwise_pretrain,
    "fewer_layers": "model = make_model(depth=depth // 2)   # rebuild with fewer layers; each layer is one more "
                    "factor in the backprop product",
    "smaller_batches": "loader = DataLoader(dataset, batch_size=batch_size // 4, shuffle=True)   # and scale lr down",
    "truncated_bptt": "h = None\nfor chunk in seq.split(35, dim=1):   # backprop through at most 35 steps\n"
                      "    out, h = rnn(chunk, h)\n    loss = loss_fn(out, target_chunk); loss.backward(); opt.step(); "
                      "opt.zero_grad()\n    h = h.detach()   # cut the graph here",
}
