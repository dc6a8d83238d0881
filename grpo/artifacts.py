"""Everything a run writes to disk, and how: JSONL rows, folders written under a temp name and renamed into
place (so nothing half-written is ever read), checkpoints, a main run's resume state and its lock."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from grpo.errors import DataError, ResumeError

if TYPE_CHECKING:
    import torch

TMP_PREFIX = ".tmp-"  # temp folders and files; whatever carries it after a crash is garbage
OURS = ".grpo-output"  # marks a folder this project created, so it may replace it later
CHECKPOINT_INFO = "grpo_checkpoint.json"  # inside every checkpoint: iteration, optimiser step, model


try:  # rows are mostly float logprobs, whose text the standard library writes ~25x slower (benchmarks/rows_io.py)
    import orjson
except ImportError:  # an install without it works the same, slower
    orjson = None


def dumps(value, exact_nonfinite: bool = True) -> str:
    """JSON text of one row or message: orjson where installed, else (or for what it refuses, such as lone
    surrogates or numpy scalars) the standard library. Both write the same values, except non-finite floats: null
    in orjson's text, NaN/Infinity in the standard library's. So text with a null in it is written again by the
    standard library unless exact_nonfinite is off (rows: their floats are logprobs and rewards, always finite,
    and their nulls are rows left unscored)."""
    if orjson is not None:
        try:
            text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
            if not exact_nonfinite or b"null" not in text:
                return text.decode()
        except TypeError:  # orjson.JSONEncodeError
            pass
    return json.dumps(value)


def loads(text: str | bytes):
    """The value of one JSON line (the standard library's NaN/Infinity too, which orjson refuses)."""
    if orjson is not None:
        try:
            return orjson.loads(text)
        except ValueError:  # orjson.JSONDecodeError; the standard library says what is wrong, or reads NaN
            pass
    return json.loads(text)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write atomically (temp file + rename), so a killed run never leaves a half file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with tmp.open("w", encoding="utf-8") as handle:  # orjson writes text as UTF-8, not \u escapes
        for row in rows:
            handle.write(dumps(row, exact_nonfinite=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    with path.open(encoding="utf-8") as handle:
        try:
            return [loads(line) for line in handle if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a JSONL file of rows ({e.msg})") from None


def claim_output(folder: Path, overwrite: bool) -> Path:
    """A folder a stage may write into: new, empty, or one this project created. A folder holding someone
    else's files is refused unless overwrite, because the stage may replace what is there."""
    folder = check_replaceable(folder, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OURS).touch()
    return folder


def check_replaceable(folder: Path, overwrite: bool) -> Path:
    """A folder a stage may replace as a whole: absent, empty, or one this project wrote (else refused)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"output {folder} is a file; pass a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / OURS).exists() and not overwrite:
        raise DataError(f"output {folder} already holds files that grpo did not write; pass another folder, "
                        "or overwrite=true to replace it")
    return folder


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename (the old one, if any,
    moved aside first and deleted after). On an exception the temp folder is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TMP_PREFIX}{final.name}-"))
    try:
        yield tmp
        (tmp / OURS).touch()
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}{final.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_partials(folder: Path) -> None:
    """Temp files and folders a killed run left behind (complete ones were renamed into place)."""
    for partial in Path(folder).rglob(f"{TMP_PREFIX}*"):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


# --- checkpoints: <run folder>/checkpoints/iter-NNNN, complete once renamed into place ---

def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / "checkpoints" / f"iter-{iteration:04d}"


def checkpoint_info(path: str | Path) -> dict:
    info = Path(path) / CHECKPOINT_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (the one with the highest trained iteration)."""
    done = [p for p in (Path(folder) / "checkpoints").glob("iter-*") if (p / CHECKPOINT_INFO).is_file()]
    return max(done, key=lambda p: checkpoint_info(p)["iteration"], default=None)


def prune_checkpoints(folder: Path, keep: Path) -> None:
    """Only the newest complete checkpoint is needed to resume; older ones cost ~16 bytes a parameter each."""
    keep_iteration = checkpoint_info(keep)["iteration"]
    for old in (Path(folder) / "checkpoints").glob("iter-*"):
        if old != keep and checkpoint_info(old).get("iteration", -1) < keep_iteration:
            shutil.rmtree(old, ignore_errors=True)


# --- a main run's state, next to its checkpoints ---

class RunState:
    """Which stages of a main run finished (with their metrics), which MLflow run each stage used, and the
    run's parameters; rewritten atomically after every change."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"done": {}, "runs": {}}

    def _save(self) -> None:
        tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def done(self, key: str) -> dict | None:
        return self.data["done"].get(key)

    def mark(self, key: str, metrics: dict) -> None:
        self.data["done"][key] = metrics
        self._save()

    def started(self, key: str, run_id: str) -> None:
        """Record the MLflow run now used for `key`."""
        self.data["runs"][key] = run_id
        self._save()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self._save()


_HELD: set[Path] = set()


class RunLock:
    """One process at a time works on a run folder: a second resume of the same run is refused, not raced.
    Re-entering a lock this process holds is a no-op."""

    def __init__(self, folder: Path):
        self.path = Path(folder).resolve() / "lock"
        self.handle = None

    def __enter__(self):
        import fcntl

        if self.path in _HELD:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            raise ResumeError(f"run {self.path.parent.name} is already running (pid {owner}); wait for it to end, "
                              "or stop it, before resuming") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        _HELD.add(self.path)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            _HELD.discard(self.path)
            self.handle.close()  # closing releases the lock


def state_once(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, detached tensor) of the state dict, tied tensors once: HF re-ties them on load."""
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            yield name, tensor.detach()


def to_host(value, pinned: dict | None = None, path: tuple = ()):
    """CPU copies of the tensors in a nested state (dicts, lists, tuples). With `pinned`, GPU tensors are copied
    asynchronously into pinned buffers kept in pinned[path] for the next call (the caller synchronises)."""
    import torch

    if isinstance(value, torch.Tensor):
        if pinned is None or value.device.type != "cuda":
            return value.detach().to("cpu", copy=True)
        buffer = pinned.get(path)
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffer = pinned[path] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return buffer.copy_(value.detach(), non_blocking=True)
    if isinstance(value, dict):
        return {k: to_host(v, pinned, path + (k,)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v, pinned, path + (k,)) for k, v in enumerate(value))
    return value
