"""Rollout engines in processes of their own beside the trainer (`engine_ranks` = E): E processes, one per GPU (a
torchrun group when E > 1), that generate and score for the reference their share of every request, as a trainer
group's ranks do, but never train. The trainer (one process, or a torchrun group, sharded or not) takes the GPUs
after theirs. Main holds no model: it talks to both over the trainer process's protocol.

Weights: after each finetune the trainer's rank 0 broadcasts the new weights, tensor by tensor in the serving
dtype, to every engine over a process group of their own (the trainer's rank 0 is its rank 0, the engines 1..E;
NCCL between GPUs, gloo on CPUs). The engines and the trainer are separate torchrun groups, so this group is made
outside torch's global one: each side builds its backend on a TCP store that main hosts (every member is on main's
machine), under a fresh name for each start of the trainer, so that a restarted trainer meets the engines anew.

Why separate processes: with max_lag=1 the engines sample and score iteration i+1 while the trainer learns from i,
each on GPUs of its own, where a colocated group's ranks generate and train in turn."""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch

from grpo.group import RankWork, world
from grpo.model import serving_dtype


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them (all of them when it is unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_split(group) -> tuple[str, str]:
    """(the engines', the trainer's) CUDA_VISIBLE_DEVICES: the first engine_ranks GPUs, then the trainer's ranks."""
    from grpo.group import local_ranks

    gpus, engines = visible_gpus(), group.engine_ranks
    return ",".join(gpus[:engines]), ",".join(gpus[engines:engines + local_ranks(group)])


class Meeting:
    """Main's side: the TCP store where the trainer's rank 0 and the engines meet; `spec()` names a new group."""

    def __init__(self, engines: int):
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.size, self.made = engines + 1, 0

    def spec(self) -> dict:
        self.made += 1
        return {"address": f"127.0.0.1:{self.store.port}", "name": f"weights-{self.made}", "size": self.size}


class Channel:
    """One member of the weights group: rank 0 sends (`send`), ranks 1..E receive (`receive`)."""

    def __init__(self, spec: dict, rank: int, device: str):
        import torch.distributed as dist

        host, port = spec["address"].rsplit(":", 1)
        store = dist.PrefixStore(spec["name"], dist.TCPStore(host, int(port), is_master=False,
                                                             timeout=timedelta(minutes=10)))
        if device == "cuda":
            self.backend = dist.ProcessGroupNCCL(store, rank, spec["size"], dist.ProcessGroupNCCL.Options())
        else:
            self.backend = dist.ProcessGroupGloo(store, rank, spec["size"], timedelta(hours=12))
        self.spec, self.device = spec, "cuda" if device == "cuda" else "cpu"

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self.backend.broadcast(tensor, 0).wait()
        return tensor

    def send(self, layout: list[tuple[str, list[int]]], weights) -> None:
        """layout: (name, shape) of each tensor that `weights` yields as (name, tensor), in its order."""
        header = torch.tensor(list(json.dumps(layout).encode()), dtype=torch.uint8, device=self.device)
        self._broadcast(torch.tensor([header.numel()], dtype=torch.int64, device=self.device))
        self._broadcast(header)
        dtype = serving_dtype(self.device)  # what the engines serve
        for (name, shape), (sent, tensor) in zip(layout, weights, strict=True):
            assert name == sent and list(tensor.shape) == shape, f"{sent} {list(tensor.shape)} is not {name} {shape}"
            self._broadcast(tensor.detach().to(device=self.device, dtype=dtype).contiguous())

    def receive(self):
        """(name, tensor) of each tensor rank 0 sends, as it arrives (an engine copies each before the next)."""
        size = self._broadcast(torch.zeros(1, dtype=torch.int64, device=self.device))
        header = self._broadcast(torch.empty(int(size.item()), dtype=torch.uint8, device=self.device))
        dtype = serving_dtype(self.device)  # what the engines serve
        for name, shape in json.loads(bytes(header.tolist()).decode()):
            yield name, self._broadcast(torch.empty(shape, dtype=dtype, device=self.device))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Sender:
    """The trainer's side: rank 0 sends its weights to the engines named in a request's channel spec. Sharded, every
    rank reads the weights (each tensor is gathered from all of them), and rank 0 alone sends."""

    def __init__(self):
        self.channel = None

    def send(self, trainer, spec: dict) -> float:
        started = time.perf_counter()
        weights = trainer.named_weights()
        if world()[0] != 0:
            for _ in weights:  # this rank's part of each gather
                pass
            return 0.0
        if self.channel is None or self.channel.spec != spec:
            self.channel = Channel(spec, 0, trainer.device)
        self.channel.send(trainer.weight_layout(), weights)
        _synchronize(trainer.device)
        return time.perf_counter() - started


class EngineRanks:
    """Main's side: the engine ranks' client, started beside the trainer, and the hand-over of weights to them."""

    def __init__(self, cfg):
        from grpo.trainer_process import TrainerClient

        self.cfg, self.client, self.started = cfg, TrainerClient(cfg.loop.trainer_timeout), False
        self.meeting, self.channel = None, None  # where the trainer's rank 0 and the engines meet; their group now

    @property
    def alive(self) -> bool:
        return self.client.alive

    def start(self, placement, probe) -> None:
        """Once a run: engines that died mid-run stop it (restarted, they would meet a trainer that may be
        training, with its replies in flight), and the resumed run starts them anew."""
        from grpo.config import Group
        from grpo.errors import TrainerError
        from grpo.group import local_ranks

        if self.started:
            raise TrainerError("the engine ranks stopped (their traceback is above); the run can be resumed")
        self.started = True
        group = self.cfg.group
        self.client.start(self.cfg.policy.model, self.cfg.optim, placement.engine, "", 0.0, probe,
                          Group(ranks=group.engine_ranks), self.cfg.engine.generation_batch_size, role="engine",
                          gpus=gpu_split(group)[0] if placement.engine == "cuda" else None,
                          sharing=local_ranks(group))  # the trainer's processes (1 unless a group)

    def trainer_placement(self, placement) -> dict:
        """TrainerClient.start's gpus and sharing for the trainer beside these engines."""
        return {"gpus": gpu_split(self.cfg.group)[1] if placement.trainer == "cuda" else None,
                "sharing": self.cfg.group.engine_ranks}

    def send(self, trainer, version: int, fresh: bool = False) -> float:
        """The trainer's weights to every engine: its rank 0 broadcasts, the engines receive; the seconds rank 0
        took (gathering a sharded trainer's tensors included). fresh: the trainer or the engines were
        (re)started, so they meet in a new group."""
        if self.meeting is None:
            self.meeting = Meeting(self.cfg.group.engine_ranks)
        if fresh or self.channel is None:
            self.channel = self.meeting.spec()
        what = "handing the new weights to the engine ranks"
        replies = [trainer.post({"op": "send_weights", "channel": self.channel}, what),
                   self.client.post({"op": "receive_weights", "channel": self.channel, "version": version}, what)]
        sent, _ = [reply() for reply in replies]  # both sides are in the broadcast together
        return sent["sent"]

    def close(self, kill: bool = False) -> None:
        self.client.close(kill)


class EngineWork(RankWork):
    """An engine rank: RankWork's generation and reference scoring, its weights received from the trainer."""

    def __init__(self, model_name: str, device: str, batch_size: int):
        from grpo.model import load_tokenizer

        self.model_name, self.device, self.batch_size = model_name, device, batch_size
        self.tokenizer = load_tokenizer(model_name)
        self.engine, self.reference, self.channel = None, None, None

    def _engine(self):
        return self._load_engine(self.tokenizer)

    def receive(self, request: dict) -> float:
        """The trainer's weights into this rank's engine (request: channel spec, version); seconds it took."""
        started = time.perf_counter()
        engine = self._engine()
        if self.channel is None or self.channel.spec != request["channel"]:
            self.channel = Channel(request["channel"], 1 + world()[0], self.device)
        engine.update_weights(self.channel.receive(), request["version"])
        _synchronize(self.device)
        return time.perf_counter() - started
