"""`as_mirror`: the objects `watch(mirror=...)` and the callbacks accept, turned into `Mirror`s.

Recognised by duck typing and class names, so that neither Lightning, W&B, MLflow nor TensorBoard is
imported to recognise its object (each mirror imports its package only when built).
"""
from __future__ import annotations

from typing import Any, Optional

from .._errors import ConfigError
from ._base import Mirror
from ._mlflow import MLflowMirror
from ._tensorboard import TensorBoardMirror
from ._wandb import WandbMirror

ALLOWED = ("a torch.utils.tensorboard.SummaryWriter, a W&B run (wandb.init()), an mlflow.ActiveRun, "
           "graddoctor.mirror.MLflowMirror(run_id), a Lightning TensorBoardLogger/WandbLogger/MLFlowLogger, "
           "or a graddoctor.mirror.Mirror")


def as_mirror(obj: Any, strict: bool = True) -> Optional[Mirror]:
    """The `Mirror` for `obj` (see ALLOWED); for anything else, `ConfigError` (strict) or None
    (`strict=False`: a callback given all of a trainer's loggers, e.g. a CSVLogger, skips the others)."""
    if isinstance(obj, Mirror):
        return obj
    lightning = _lightning_logger_kind(obj)
    if lightning is not None:
        return _from_lightning(obj, lightning)
    if _is_summary_writer(obj):
        return TensorBoardMirror(obj)
    if _is_wandb_run(obj):
        return WandbMirror(obj)
    if _is_mlflow_active_run(obj):
        import mlflow
        return MLflowMirror(obj.info.run_id, mlflow.get_tracking_uri())
    if strict:
        raise ConfigError(f"mirror={_describe(obj)} is not allowed: use {ALLOWED}, or a list of them")
    return None


def as_mirrors(objs: Any) -> list[Mirror]:
    """`as_mirror` of one object or of each in a list or tuple (strict: the first unknown one is refused)."""
    items = list(objs) if isinstance(objs, (list, tuple)) else [objs]
    return [m for m in (as_mirror(o) for o in items) if m is not None]


def _lightning_logger_kind(obj: Any) -> Optional[str]:
    names = {c.__name__ for c in type(obj).__mro__}
    for kind in ("TensorBoardLogger", "WandbLogger", "MLFlowLogger"):
        if kind in names and hasattr(obj, "experiment"):
            return kind
    return None


def _from_lightning(logger: Any, kind: str) -> Mirror:
    """A Lightning logger's mirror: its `experiment` (SummaryWriter, W&B run, MlflowClient) and run id."""
    if kind == "TensorBoardLogger":
        return TensorBoardMirror(logger.experiment)
    if kind == "WandbLogger":
        return WandbMirror(logger.experiment)
    client = logger.experiment  # an MlflowClient; asking for it also starts the logger's run
    return MLflowMirror(logger.run_id, client.tracking_uri)


def _is_summary_writer(obj: Any) -> bool:
    return all(callable(getattr(obj, a, None)) for a in ("add_scalar", "add_text", "flush"))


def _is_wandb_run(obj: Any) -> bool:
    return (type(obj).__module__.startswith("wandb.")
            and all(callable(getattr(obj, a, None)) for a in ("log", "define_metric")))


def _is_mlflow_active_run(obj: Any) -> bool:
    return (any(c.__name__ == "ActiveRun" for c in type(obj).__mro__)
            and isinstance(getattr(getattr(obj, "info", None), "run_id", None), str))


def _describe(obj: Any) -> str:
    text = repr(obj)
    return f"{text[:60]}... ({type(obj).__name__})" if len(text) > 60 else f"{text} ({type(obj).__name__})"
