"""Several trainer processes as one torch.distributed group, started by `torchrun`: each rank holds the policy
on its own device, generates its share of every rollout and evaluation, scores its share for the reference
model, and trains on its share of every optimiser step with the gradients summed over the group (NCCL on GPUs,
gloo on CPUs). Main talks to rank 0 over the trainer process's JSON protocol; rank 0 passes each request on.

Why every rank does everything: iterations are strictly on-policy (generate, score, then train), so a GPU kept
for generation alone would idle while the others train, and the reverse. Colocated, no GPU idles, and the
weights a rank generates with are its own trained ones, copied on the device: nothing crosses the network but
gradients, requests and results. With max_lag=1, engines of their own (grpo.engine_ranks) generate while the
group trains instead.

Several machines: main's machine is node 0 and holds rank 0; the others join with the command main prints
(`join_command`). The run's work_dir must be on a filesystem every machine sees (checkpoints are loaded by
every rank)."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

GRADIENT_BUCKET = 2**25  # elements summed per collective: 128 MB of float32


def launch_command(group, node_rank: int | str = 0) -> list[str]:
    """torchrun for the trainer group: one machine with its own free port, or node `node_rank` of several
    meeting at group.rendezvous (static rendezvous: node 0's ranks come first, so rank 0 is main's)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(local_ranks(group))]
    if group.nodes == 1:
        cmd += ["--standalone"]
    else:
        host, port = group.rendezvous.rsplit(":", 1)
        cmd += ["--nnodes", str(group.nodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
                "--master-addr", host, "--master-port", port]
    return cmd + ["-m", "grpo.trainer_process"]


def join_command(group) -> str:
    """What to run on each other machine (node k = 1..nodes-1) to join main's trainer group. With ranks=0 on a
    GPU machine, each runs one rank per GPU it has (torchrun's `gpu`: machines may differ, and engine ranks take
    GPUs of main's machine only); otherwise `ranks` each."""
    import torch

    cmd = ["python", *launch_command(group, node_rank="K")[1:]]
    if not group.ranks and torch.cuda.is_available():
        cmd[cmd.index("--nproc-per-node") + 1] = "gpu"
    return " ".join(cmd)


def is_group(group) -> bool:
    """Whether the trainer runs as a torchrun group (several ranks or machines) rather than one process."""
    return local_ranks(group) > 1 or group.nodes > 1


def local_ranks(group) -> int:
    """group.ranks, or 0 = one per visible GPU that the engine ranks leave (1 without a GPU)."""
    if group.ranks:
        return group.ranks
    import torch

    return max(1, torch.cuda.device_count() - group.engine_ranks)


def check_ranks(ranks: int, device: str, gpus: int, engines: int = 0) -> None:
    """One rank per GPU: more ranks (trainer and engine ranks) than visible GPUs would put two on one card (or
    fail to start; NCCL refuses two ranks of a group on one GPU)."""
    from grpo.errors import ConfigError

    if device == "cuda" and ranks + engines > gpus:
        if engines:
            raise ConfigError(f"engine_ranks={engines} and ranks={ranks} need {ranks + engines} GPUs but {gpus} are "
                              f"visible; pass ranks=0 (the GPUs the engines leave) or fewer engine_ranks")
        raise ConfigError(f"ranks={ranks} but {gpus} GPU(s) are visible; pass ranks=0 (one per GPU) or at most "
                          f"{gpus}")


def setup() -> tuple[int, int]:
    """(rank, world size). Under torchrun: joins the group and picks this rank's GPU. Long timeout: ranks wait
    in a broadcast for main's next request while main logs, checkpoints or evaluates."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and os.environ.get("GRPO_GROUP_DEVICE", "cuda") == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    if int(os.environ.get("GROUP_RANK", "0")) != 0:  # torchrun's node rank: a machine other than main's
        exit_without_main_machine()
    return dist.get_rank(), size


def exit_without_main_machine(every: float = 10.0) -> None:
    """End this process when main's machine is gone. Ranks there die with main (torchrun's agent dies with it),
    but a rank on another machine waiting in an NCCL collective for rank 0 may wait out the group's 12-hour
    timeout, holding its GPU: a thread pings the group's TCP store, which torchrun serves from main's machine,
    and exits when it stops answering."""
    import threading
    import time

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=max(30.0, 3 * every)))

    def watch():
        while True:
            time.sleep(every)
            try:
                store.add("grpo-heartbeat", 1)
            except Exception:  # the store's connection error (DistNetworkError, DistStoreError: RuntimeErrors)
                print("grpo trainer rank: main's machine stopped answering (its torchrun store is gone); exiting",
                      file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="main-machine-watch", daemon=True).start()


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(value=None):
    """rank 0's value on every rank (any picklable object)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list | None:
    """Every rank's value, in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:  # engine_ranks=1: one engine process, no group
        return [value]
    out = [None] * size if rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def share(items: list, rank: int, size: int) -> list:
    """This rank's items, dealt in snake order (ranks 0..size-1, then size-1..0, ...): from a list sorted by length
    every rank gets a like share of the total, where dealing round-robin gives the last rank the longest item of
    every round (4% more tokens than rank 0 in a step of 32 rows 140-670 tokens long, which rank 0 waits for)."""
    return [item for k, item in enumerate(items) if _dealt(k, size) == rank]


def unshare(parts: list[list]) -> list:
    """The inverse of `share` over all ranks' parts."""
    dealt = [iter(part) for part in parts]
    return [next(dealt[_dealt(k, len(parts))]) for k in range(sum(map(len, parts)))]


def _dealt(k: int, size: int) -> int:
    """The rank that `share` deals item k to."""
    turn, seat = divmod(k, size)
    return seat if turn % 2 == 0 else size - 1 - seat


class GradientSum:
    """The float32 master gradients of an unsharded group's rank, summed over the group while the optimiser step's
    last backward still runs, as DDP's buckets do: as backward yields a parameter's gradient, it goes (added to
    the earlier micro-batches' gradient of that parameter) into its place in a flat bucket, and a bucket's
    all-reduce starts once all of its gradients are in, behind the layers still to go back through. The master's
    gradient stays a view of its bucket until the optimiser drops it; buckets are taken from the allocator as the
    last backward fills them, so that they do not hold memory through the forward passes.

    Buckets hold the parameters in reverse (the order backward yields them) and start strictly in that order on
    every rank, so ranks pair their collectives even if their backwards finish parameters in other orders; a rank
    with no rows in a step (or a parameter backward never reached) sends what it has, or zeros, at `finish`.

    `pairs` are (float32 master, compute) parameters; the compute copy may be the master itself (float32)."""

    def __init__(self, pairs, bucket_elements: int = GRADIENT_BUCKET):
        self.layout: list[tuple[int, list]] = []  # per bucket: (elements, [(master, compute, offset)])
        self.place = {}  # compute parameter -> (bucket, master, offset)
        members, size = [], 0
        for master, compute in list(pairs)[::-1] + [(None, None)]:
            if master is None or (members and size + master.numel() > bucket_elements):
                self.layout.append((size, members))
                for m, c, offset in members:
                    self.place[c] = (len(self.layout) - 1, m, offset)
                members, size = [], 0
            if master is not None:
                members.append((master, compute, size))
                size += master.numel()
                compute.register_post_accumulate_grad_hook(self._gradient_ready)
        self.begin_step()

    def begin_step(self) -> None:
        self.flats, self.bound = [None] * len(self.layout), set()
        self.pending = [len(members) for _, members in self.layout]
        self.armed, self.works, self.started = False, [], 0

    def arm(self) -> None:
        """Call before the step's last backward: its gradients then go out bucket by bucket as they are ready."""
        self.armed = True

    def _gradient_ready(self, compute) -> None:
        if not self.armed:
            return
        bucket, master, offset = self.place[compute]
        self._bind(bucket, master, compute, offset)
        self.pending[bucket] -= 1
        self._start_ready()

    def _bind(self, bucket: int, master, compute, offset: int) -> None:
        """The master's gradient so far plus the compute copy's (as grpo.trainer.grads_to_master adds) in its place."""
        import torch

        if self.flats[bucket] is None:
            self.flats[bucket] = torch.empty(self.layout[bucket][0], dtype=torch.float32, device=master.device)
        view = self.flats[bucket][offset:offset + master.numel()].view_as(master)
        if compute is not master and compute.grad is not None:
            if master.grad is None:
                view.copy_(compute.grad)
            else:
                torch.add(master.grad, compute.grad, out=view)
            compute.grad = None
        elif master.grad is not None:
            view.copy_(master.grad)
        else:
            view.zero_()
        master.grad = view
        self.bound.add(master)

    def _start_ready(self) -> None:
        import torch.distributed as dist

        while self.started < len(self.layout) and self.pending[self.started] <= 0:
            self.works.append(dist.all_reduce(self.flats[self.started], async_op=True))
            self.started += 1

    def finish(self) -> None:
        """After the step's last backward (or none): the buckets not started yet, then wait for every sum."""
        self.armed = False
        for bucket in range(self.started, len(self.layout)):
            for master, compute, offset in self.layout[bucket][1]:
                if master not in self.bound:
                    self._bind(bucket, master, compute, offset)
            self.pending[bucket] = 0
        self._start_ready()
        for work in self.works:
            work.wait()
        self.flats, self.works = [None] * len(self.layout), []  # the gradients keep their buckets till zero_grad


def sum_values(values: dict, maxima: tuple[str, ...] = ()) -> dict:
    """Numbers (or 0-d tensors) added over the group; the keys in `maxima` take the group's maximum."""
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    as_tensor = lambda ks: torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device)  # noqa
                                        .reshape(()) for k in ks])
    added, largest = [k for k in keys if k not in maxima], [k for k in keys if k in maxima]
    out = {}
    for ks, op in ((added, dist.ReduceOp.SUM), (largest, dist.ReduceOp.MAX)):
        if ks:
            t = as_tensor(ks)
            dist.all_reduce(t, op=op)
            out.update(zip(ks, t.tolist()))
    return out


class RankWork:
    """One rank's generation and reference scoring, on its own device: a serving copy of the policy (bf16 on a
    GPU), refreshed from the trainer's weights when they have changed, and the reference model."""

    def __init__(self, trainer, batch_size: int):
        self.trainer, self.batch_size = trainer, batch_size
        self.model_name, self.device = trainer.model_name, trainer.device
        self.engine, self.reference, self.version = None, None, None

    def _load_engine(self, tokenizer):
        from grpo.engines.torch_engine import TorchEngine
        from grpo.model import load_model

        if self.engine is None:
            self.engine = TorchEngine(load_model(self.model_name, self.device), tokenizer, self.batch_size,
                                      progress=False)
        return self.engine

    def _engine(self):
        self._load_engine(self.trainer.tokenizer)
        if self.version != self.trainer.step:
            self.engine.update_weights(self.trainer.named_weights(), self.trainer.step)
            self.version = self.trainer.step
        return self.engine

    def generate(self, request: dict) -> dict | None:
        """This rank's share of the prompts; on rank 0, every rank's completions in the prompts' order."""
        rank, size = world()
        engine = self._engine()
        prompts = share(request["prompts"], rank, size)
        outputs = engine.generate(prompts, request["n"], request["temperature"], request["max_new_tokens"],
                                  seed=request["seed"] * 1_000 + rank) if prompts else []
        parts = gather(([[(c.token_ids, c.logprobs, c.truncated) for c in group] for group in outputs],
                        engine.stats.tokens if prompts else 0, engine.stats.seconds if prompts else 0.0))
        if parts is None:
            return None
        return {"completions": unshare([p[0] for p in parts]), "tokens": sum(p[1] for p in parts),
                "seconds": max(p[2] for p in parts)}

    def probe(self, probe) -> list[float]:
        return self._engine().probe_logprobs(probe)

    def score(self, request: dict) -> dict | None:
        """Reference logprobs of this rank's share of the rows; on rank 0, all of them in order."""
        from grpo.scoring import load_reference, score_completions

        rank, size = world()
        if self.reference is None:
            self.reference = load_reference(self.model_name, self.device)
        prompts, completions = share(request["prompts"], rank, size), share(request["completions"], rank, size)
        scored = score_completions(self.reference, prompts, completions, request["temperature"]) if prompts else []
        parts = gather(scored)
        return None if parts is None else {"logprobs": unshare(parts)}


class GroupEngine:
    """Main's view of the group as a rollout engine (`engines.base.Engine`): generation is the ranks'. A trainer
    group's ranks serve their own trained weights, so a hand-over only moves the version on; engine ranks
    (grpo.engine_ranks) are sent them by `hand_over(version)`."""
    name = "group"
    in_place = True

    def __init__(self, client, start, hand_over=None):
        from grpo.engines.base import GenerationStats

        self.client, self.start, self.hand_over, self.version = client, start, hand_over, 0
        self.stats = GenerationStats()
        self.tolerance = 0.05  # bf16 serving copy against the trainer's float32 weights under bf16 autocast

    def generate(self, prompts, n, temperature, max_new_tokens, seed=0):
        from grpo.engines.base import Completion, GenerationStats

        self.start()
        reply = self.client.ask({"op": "generate", "prompts": prompts, "n": n, "temperature": temperature,
                                 "max_new_tokens": max_new_tokens, "seed": seed}, "generating")
        self.stats = GenerationStats(reply["tokens"], reply["seconds"])
        return [[Completion(list(ids), list(logps), bool(cut)) for ids, logps, cut in group]
                for group in reply["completions"]]

    def update_weights(self, weights, version: int) -> None:
        """`weights` (main's in-memory hand-over) is left unread: trainer ranks copy their own trained weights,
        engine ranks receive them by broadcast from the trainer."""
        if self.hand_over:
            self.hand_over(version)
        self.version = version

    def probe_logprobs(self, probe) -> list[float]:
        self.start()
        return self.client.ask({"op": "engine_probe"}, "scoring the probe")["probe"]

    def release(self) -> None:
        pass


class GroupReference:
    """Main's view of the group as the reference model: `score_completions` as in grpo.scoring."""

    def __init__(self, client, start):
        self.client, self.start = client, start

    def score_completions(self, prompts, completions, temperature, progress=None) -> list[list[float]]:
        self.start()
        reply = self.client.ask({"op": "score", "prompts": prompts, "completions": completions,
                                 "temperature": temperature}, "scoring for the reference model")
        if progress:
            progress(len(prompts))
        return reply["logprobs"]
