"""One base exception and a shallow hierarchy.

Every message names the bad value and what is allowed, so the CLI can print it
as it is. The CLI catches `GradDoctorError` once, at the top.
"""


class GradDoctorError(Exception):
    """Base class of every error graddoctor raises on purpose."""


class RunNotFoundError(GradDoctorError):
    """A run directory, or the store inside it, does not exist."""


class CorruptStoreError(GradDoctorError):
    """The run store exists but cannot be read as a graddoctor store."""


class ConfigError(GradDoctorError, ValueError):
    """An option has a value outside what is allowed."""


class NoGradientsError(GradDoctorError):
    """The model has no parameter that requires a gradient."""


class RunLockedError(GradDoctorError):
    """Another watcher is writing the run directory."""


class RunExistsError(ConfigError):
    """The run directory already holds a recorded run, and neither resume nor overwrite was asked."""


class ResumeMismatchError(ConfigError):
    """`resume=` was asked for, but the model's tensors differ from the recorded run's."""


class UnsupportedModelError(GradDoctorError, TypeError):
    """The model has parameters or gradients graddoctor cannot measure (sparse, complex, meta-device)."""


class WatchClosedError(GradDoctorError, RuntimeError):
    """A `Watch` was used after `close()`."""
