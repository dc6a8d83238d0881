"""Every error a user can fix, under one base class: the entry points turn any `GrpoError` into one line that
names the fix and a non-zero exit; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class GrpoError(Exception):
    """A problem the user can fix; the message is one line that says how."""


class ConfigError(GrpoError, ValueError):
    """A bad parameter value."""


class DataError(GrpoError, ValueError):
    """Missing or malformed data (dataset files, rollouts, annotated sets)."""


class ModelError(GrpoError, ValueError):
    """A model or checkpoint that cannot be found or loaded."""


class TrackingError(GrpoError, RuntimeError):
    """The MLflow tracking store (or Optuna storage) cannot be used."""


class NumericsError(GrpoError, RuntimeError):
    """Loss or gradient went NaN/inf; nothing from that step was kept."""


class TrainerError(GrpoError, RuntimeError):
    """The trainer process refused a request, died, or stopped answering."""


class ResumeError(GrpoError, RuntimeError):
    """A run cannot be resumed as asked (unknown id, changed parameters, already running)."""
