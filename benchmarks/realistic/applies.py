"""Does a remedy apply to the model it was prescribed for? Apply it to a fresh model of the run and see.

A catalogue cure with an `apply` callable is called on a freshly built model of the run: model-taking cures
(init schemes, surgery, penalties, rollback) with the model and, where their signature asks for one, the
optimizer or an input batch; gradient transforms (whose first parameter is not the model) through their own
snippet, which hands them to `gd.watch(model, opt, None, guard=...)`, so the guard is built against the model's
parameters; so are cures whose signature asks for a number (a penalty's strength).
Then one forward and backward pass of the result must run. A cure without `apply` is a change to the user's
own code (its snippet); it is reported as such. An id the catalogue does not know does not apply.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

import graddoctor as gd
from graddoctor.treat._catalogue import CATALOGUE, UnknownRemedyError

from .runs import RunSpec
from .train import logits_of, loss_of

APPLIES, SNIPPET, UNKNOWN = "applies", "snippet", "unknown id"


def check_remedy(spec: RunSpec, remedy_id: str) -> str:
    """'applies', 'snippet' (a change to the user's code), 'unknown id', or 'fails: <error>'."""
    try:
        cure = CATALOGUE[remedy_id]
    except UnknownRemedyError:
        return UNKNOWN
    if cure.apply is None:
        return SNIPPET
    setup = spec.build(spec.seed)
    x, y = setup.batches(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _apply(cure, setup.model, setup.opt, x)
            _forward_backward(model, x, y)
    except Exception as e:  # the point: any error means the cure does not apply to this model
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return APPLIES


def _apply(cure: Any, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> nn.Module:
    params = [p for p in inspect.signature(cure.apply).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {"model": model, "optimizer": opt, "x": x, "data": x, "x_batch": x, "x_train": x}
    if not params or params[0].name != "model" or any(p.name not in by_name for p in params):
        return _run_snippet(cure.snippet, model, opt, x)  # a gradient transform, or a cure that needs a number
    out = cure.apply(*[by_name[p.name] for p in params])
    # surgery returns (new model, changes); init schemes and penalties work in place / return a value
    return out[0] if isinstance(out, tuple) and isinstance(out[0], nn.Module) else model


def _run_snippet(snippet: str, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> nn.Module:
    """Run the catalogue's snippet as the user would paste it (it calls the cure's apply function)."""
    act = next((type(m).__name__ for m in model.modules()
                if type(m).__module__.startswith("torch.nn.modules.activation")), "ReLU")
    namespace: dict[str, Any] = {"gd": gd, "nn": nn, "torch": torch, "model": model, "opt": opt, "run_dir": None,
                                 "x_batch": x, "x_train": x, "loss": torch.zeros(())}
    exec(snippet.replace("{act}", f"nn.{act}"), namespace)  # noqa: S102
    if "w" in namespace:  # a guard handed to gd.watch: built against the model's parameters, then closed
        namespace["w"].close()
    return namespace["model"]


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    loss_of(logits_of(model(x)), y).backward()
