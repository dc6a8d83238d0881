"""The trainer's full state to disk without blocking training: a snapshot copied off the device (training waits
only for that copy), written by a thread into a temp folder that is renamed into place, then older checkpoints
deleted. One write at a time; a write's error surfaces at the next save or wait. Sharded (FSDP2), the ranks first
gather the whole state into rank 0's host memory, in the calling thread (a collective cannot run from a writer
thread beside the ranks' next ones), and rank 0 alone writes it."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path

import torch

from grpo.artifacts import CHECKPOINT_INFO, atomic_folder, prune_checkpoints, state_once, to_host

OPTIMIZER_STATE = "optimizer.pt"  # AdamW state and RNG, beside the Hugging Face files of the weights
# torch pins host memory with cudaHostAlloc by default, which holds a driver lock while it pins: a first save's
# 15 GB (1B shape) stalled generation in the same process for 8.6 s (a trainer group's rank 0 generates while it
# saves). malloc + cudaHostRegister in 8 threads pinned it in 2.3 s and did not slow generation
# (benchmarks/checkpoint_overlap.py, H200).
PINNED_BY_REGISTER = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def host_allocator_conf(conf: str) -> str:
    """PYTORCH_CUDA_ALLOC_CONF for a trainer process on a GPU: the user's `conf` with PINNED_BY_REGISTER, unless
    the user chose how to pin."""
    if "pinned_" in conf:
        return conf
    return ",".join(filter(None, [conf, PINNED_BY_REGISTER]))


class CheckpointWriter:
    """Writes the state of `model` (float32 master weights) and `optimizer`, and loads it back; `snapshot_taken` is
    clear while a snapshot is being copied, so that the trainer changes no weight under it."""

    def __init__(self, model, optimizer, tokenizer, device: str, sharded: bool = False):
        self.model, self.optimizer, self.tokenizer, self.device = model, optimizer, tokenizer, device
        self.sharded = sharded
        self._writer: threading.Thread | None = None
        self._pinned: dict[tuple, torch.Tensor] = {}  # host buffers of GPU checkpoints, reused by every save
        self.snapshot_taken = threading.Event()
        self.snapshot_taken.set()
        self.write_error: BaseException | None = None

    def save(self, path: Path, info: dict, background: bool = True) -> None:
        """Weights, optimiser state, RNG and `info` (iteration, step: written last, it marks the folder complete)
        to `path`. In the background: a thread copies the state out and writes it."""
        self.wait()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        gathered = self._gathered() if self.sharded else None
        if self.sharded and gathered is None:  # not rank 0: its part was the gather
            return
        job = lambda: self._write(path, *(gathered or self._snapshot()), info,  # noqa: E731
                                  self.model.config.to_json_string(), rng)
        if not background:
            return job()
        if gathered is None:
            self.snapshot_taken.clear()
        self._writer = threading.Thread(target=self._guarded, args=(job,), name="checkpoint-writer", daemon=True)
        self._writer.start()

    def load(self, path: Path) -> None:
        """The optimiser state and RNG of the checkpoint at `path` (its weights are the model's already), if it
        has them. AdamW's kernels stay this run's choice (fused unless sharded), not the saving run's."""
        if not (path / OPTIMIZER_STATE).is_file():
            return
        saved = torch.load(path / OPTIMIZER_STATE, map_location="cpu" if self.sharded else self.device)
        how = {key: self.optimizer.param_groups[0][key] for key in ("fused", "foreach")}
        saved["optimizer"]["param_groups"] = [{**g, **how} for g in saved["optimizer"]["param_groups"]]
        if self.sharded:
            from grpo.sharding import load_optimizer_state

            load_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["torch"].cpu())  # map_location put it on the GPU with the rest
        random.setstate(saved["rng"]["python"])

    def wait(self) -> None:
        """Until the last write is complete; its error, if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise error

    @torch.no_grad()
    def _snapshot(self):
        """Host copies of the weights (tied ones once: HF re-ties them on load) and of the optimiser state. On a
        GPU they go on a side stream into pinned buffers kept for the next save, so that work queued meanwhile on
        the device (a trainer group's ranks generate while rank 0 saves) does not wait behind the copy."""
        try:
            state = ({name: t for name, t in state_once(self.model)}, self.optimizer.state_dict())
            if self.device != "cuda":
                return to_host(state)
            stream = torch.cuda.Stream(device=self.model.device)
            stream.wait_stream(torch.cuda.default_stream(self.model.device))
            with torch.cuda.stream(stream):
                host = to_host(state, self._pinned, ())
            stream.synchronize()
            return host
        finally:
            self.snapshot_taken.set()

    @torch.no_grad()
    def _gathered(self):
        """Sharded: (weights, optimiser state) whole in host memory on rank 0 (into the pinned buffers on a GPU),
        None on the other ranks."""
        from grpo.group import world
        from grpo.sharding import full_state

        if world()[0] != 0:
            full_state(self.model, self.optimizer, lambda path, tensor: None)
            return None
        pinned = self._pinned if self.device == "cuda" else None
        state = full_state(self.model, self.optimizer, lambda path, tensor: to_host(tensor, pinned, path))
        if self.device == "cuda":
            torch.cuda.synchronize()
        return state

    def _guarded(self, job) -> None:
        try:
            job()
        except BaseException as e:  # surfaced by wait() in the training thread
            self.write_error = e
        finally:
            self.snapshot_taken.set()

    def _write(self, path: Path, weights, optimizer, info, config, rng) -> None:
        from safetensors.torch import save_file

        with atomic_folder(path) as tmp:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if os.environ.get("GRPO_FAILPOINT") == "checkpoint-write":  # tests: kill -9 the run mid-write
                os.killpg(os.getpgid(0), signal.SIGKILL)
            (tmp / "config.json").write_text(config)
            self.model.generation_config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            torch.save({"optimizer": optimizer, "rng": rng}, tmp / OPTIMIZER_STATE)
            (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=1))  # last: marks the folder complete
        prune_checkpoints(path.parent.parent, keep=path)
