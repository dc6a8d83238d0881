"""The trainer process's weights handed to main's engine in memory, after every finetune: on a GPU one flat bf16
buffer that the worker exports once by CUDA IPC and refreshes in place, on a CPU a safetensors file in /dev/shm."""
from __future__ import annotations

import base64
import math
import os
import pickle
import tempfile
from pathlib import Path


def receive(descriptor: dict, client):
    """Main's side: iterator of (name, tensor) views of the weights the worker exported (`client` keeps the
    opened CUDA buffer, so that later hand-overs read the same memory)."""
    if descriptor["kind"] == "file":
        from safetensors.torch import load_file

        yield from load_file(descriptor["path"]).items()
        return
    handle = descriptor["handle"]
    if client.cuda_buffer is None or client.cuda_buffer[0] != handle:
        rebuild, args = pickle.loads(base64.b64decode(handle))
        client.cuda_buffer = (handle, rebuild(*args))
    buffer = client.cuda_buffer[1]
    for name, offset, shape in descriptor["layout"]:
        yield name, buffer[offset:offset + math.prod(shape)].view(shape)


class Exporter:
    """Worker side of the in-memory hand-over: one flat buffer shared by CUDA IPC (exported once, refreshed in
    place), or a safetensors file in /dev/shm on a CPU."""

    def __init__(self, device: str):
        self.device, self.buffer, self.handle, self.layout = device, None, None, []
        shm = Path("/dev/shm")
        self.folder = Path(tempfile.mkdtemp(prefix="grpo-weights-", dir=shm if shm.is_dir() else None))

    def export(self, trainer) -> dict:
        import torch

        if self.device != "cuda":
            from safetensors.torch import save_file

            tensors = {name: t.detach().contiguous() for name, t in trainer.named_weights()}
            path = self.folder / "weights.safetensors"
            save_file(tensors, str(path.with_suffix(".tmp")))
            os.replace(path.with_suffix(".tmp"), path)
            return {"kind": "file", "path": str(path)}
        params = list(trainer.named_weights())
        if self.buffer is None:
            from torch.multiprocessing.reductions import reduce_tensor

            total, offset = sum(p.numel() for _, p in params), 0
            self.buffer = torch.empty(total, dtype=torch.bfloat16, device="cuda")
            for name, p in params:
                self.layout.append((name, offset, list(p.shape)))
                offset += p.numel()
            self.handle = base64.b64encode(pickle.dumps(reduce_tensor(self.buffer))).decode()
        with torch.no_grad():
            for (name, offset, _), (_, p) in zip(self.layout, params):
                self.buffer[offset:offset + p.numel()].copy_(p.reshape(-1))
        torch.cuda.synchronize()
        return {"kind": "cuda_ipc", "handle": self.handle, "layout": self.layout}

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
