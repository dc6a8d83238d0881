"""Where each piece runs (`Placement`), and what the stages of one process share (`Workspace`): data, tokenizer,
prompt builder, rollout engine, reference model and the probe that checks served weights. Everything is built
on first use, so a stage pays only for what it touches."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

MEMORY_MARGIN = 0.05  # of the card, left to CUDA contexts and allocator slack


@dataclass(frozen=True)
class Placement:
    """Devices of the engine and reference model (main process) and of the trainer (its own process), and the
    share of a shared GPU each process may allocate (0 = no cap)."""
    engine: str
    reference: str
    trainer: str
    engine_memory_fraction: float = 0.0
    trainer_memory_fraction: float = 0.0


def place(policy, engine_cfg, trainer_gpu: int = -1) -> Placement:
    """One GPU: engine, reference model and trainer share it; gpu_memory_utilization is the main process's
    share (engine + reference), the trainer process may use the rest. trainer_gpu N >= 1: the trainer has GPU N
    to itself, main keeps GPU 0 (its share still capped). No GPU: everything on the CPU."""
    from grpo.errors import ConfigError
    from grpo.model import pick_device

    device = pick_device(policy.device)
    if device != "cuda":
        if trainer_gpu > 0:
            raise ConfigError(f"trainer_gpu={trainer_gpu} needs GPUs, but this run is on the CPU; pass trainer_gpu=-1")
        return Placement("cpu", "cpu", "cpu")
    share = engine_cfg.gpu_memory_utilization
    if trainer_gpu > 0:
        import torch

        if trainer_gpu >= torch.cuda.device_count():
            raise ConfigError(f"trainer_gpu={trainer_gpu} but {torch.cuda.device_count()} GPU(s) are visible; pass "
                              f"an index below {torch.cuda.device_count()}, or -1 to share GPU 0")
        return Placement("cuda", "cuda", f"cuda:{trainer_gpu}", share, 0.0)
    planned, card = planned_card_gib(), None
    if planned:
        import torch

        card = planned, torch.cuda.get_device_properties(0).total_memory / 2**30
    engine_share, trainer_share = shared_card(share, card)
    return Placement("cuda", "cuda", "cuda", engine_share, trainer_share)


def shared_card(share: float, card_gib: tuple[float, float] | None = None) -> tuple[float, float]:
    """(engine, trainer) fractions of one GPU: the main process gets `share`, the trainer the rest less a margin.
    card_gib (as used, whole card) sizes both for a smaller card than the one present, e.g. (80, 141) runs a
    command as an 80 GB H100 would hold it on a 141 GB H200."""
    scale = min(1.0, card_gib[0] / card_gib[1]) if card_gib else 1.0
    return share * scale, max(0.05, 1 - share - MEMORY_MARGIN) * scale


def planned_card_gib() -> float | None:
    """GRPO_GPU_MEMORY_GIB: the card size in GiB that one GPU's memory caps are planned for, in place of GPU 0's
    (memory caps only; benchmarks use it to check that a command sized for an 80 GB card fits one); None unset."""
    import os

    from grpo.errors import ConfigError

    wanted = os.environ.get("GRPO_GPU_MEMORY_GIB")
    if not wanted:
        return None
    try:
        gib = float(wanted)
    except ValueError:
        gib = 0.0
    if not gib > 0:
        raise ConfigError(f"GRPO_GPU_MEMORY_GIB={wanted!r}: give the card size to plan for in GiB (e.g. 79.6 for an "
                          "80 GB H100), or unset it")
    return gib


def check_placement(cfg) -> Placement:
    """The run's placement, or a one-line ConfigError naming the fix, checked before anything is logged: a
    trainer_gpu the machine lacks, or more trainer and engine ranks than visible GPUs (then no FAILED run is left
    behind)."""
    from grpo.group import check_ranks, is_group, local_ranks

    planned_card_gib()  # a bad GRPO_GPU_MEMORY_GIB is refused on the CPU too, where no cap uses it
    placement = place(cfg.policy, cfg.engine, cfg.group.trainer_gpu)
    if is_group(cfg.group) or cfg.group.engine_ranks:
        import torch

        check_ranks(local_ranks(cfg.group) if is_group(cfg.group) else 1, placement.trainer,
                    torch.cuda.device_count(), cfg.group.engine_ranks)
    return placement


class Workspace:
    def __init__(self, cfg, placement: Placement | None = None, checkpoint: str = "", progress: bool = True,
                 group=None):
        """group: (client, start[, hand_over]) of the ranks that generate and score, a trainer group's
        (grpo.group) or engine ranks (grpo.engine_ranks): they are the engine and the reference model, and this
        process loads neither."""
        self.cfg, self.checkpoint, self.progress, self.group = cfg, checkpoint, progress, group
        self.placement = placement or place(cfg.policy, cfg.engine, cfg.group.trainer_gpu)

    @cached_property
    def splits(self):
        from grpo.tasks import gsm8k

        return gsm8k.load_splits(self.cfg.data.dataset)

    @cached_property
    def tokenizer(self):
        from grpo.model import load_tokenizer

        return load_tokenizer(self.cfg.policy.model)

    @cached_property
    def builder(self):
        from grpo.tasks.gsm8k import PromptBuilder

        return PromptBuilder(self.tokenizer, self.cfg.data.system_prompt, self.cfg.data.shots, self.splits.exemplars)

    @cached_property
    def engine(self):
        from grpo.engines import make_engine

        p = self.placement
        if self.group:
            from grpo.group import GroupEngine

            engine = GroupEngine(*self.group)
        else:
            if p.engine == "cuda" and p.engine_memory_fraction and self.cfg.engine.backend == "hf":
                import torch

                torch.cuda.set_per_process_memory_fraction(p.engine_memory_fraction)
            engine = make_engine(self.cfg.engine, self.cfg.policy.model, p.engine, self.checkpoint,
                                 self.cfg.loop.seed, self.progress)
        if self.checkpoint:  # a checkpoint of main's holds this many trained iterations: the rows' policy_version
            from grpo.artifacts import checkpoint_info

            engine.version = checkpoint_info(self.checkpoint).get("iteration", -1) + 1
        return engine

    @cached_property
    def reference(self):
        """The starting policy, float32 weights scored under the trainer's autocast: KL is exactly 0 at step 0."""
        if self.group:
            from grpo.group import GroupReference

            return GroupReference(*self.group[:2])  # (client, start): scoring needs no weights hand-over
        from grpo.scoring import load_reference

        return load_reference(self.cfg.policy.model, self.placement.reference)

    @cached_property
    def probe(self):
        """A worked exemplar answer under the reference prompt: a fixed sequence to compare served weights on."""
        from grpo.engines.base import Probe
        from grpo.tasks.gsm8k import PromptBuilder, exemplar_text

        problem = self.splits.exemplars[0]
        prompt = PromptBuilder(self.tokenizer, "", 0, []).ids(problem)
        completion = self.tokenizer(exemplar_text(problem), add_special_tokens=False)["input_ids"][:64]
        return Probe(prompt, completion)

    def check_prompt_fits(self) -> None:
        """The longest prompt plus max_new_tokens must fit the model's context, checked before any work."""
        from grpo.errors import ConfigError
        from grpo.model import model_context

        limit = model_context(self.cfg.policy.model)
        longest = max(self.splits.pool + self.splits.validation + self.splits.test, key=lambda p: len(p.question))
        need = len(self.builder.ids(longest)) + self.cfg.engine.max_new_tokens
        if limit and need > limit:
            raise ConfigError(f"the longest prompt ({need - self.cfg.engine.max_new_tokens} tokens with "
                              f"system_prompt and {self.cfg.data.shots} shots) plus max_new_tokens "
                              f"{self.cfg.engine.max_new_tokens} needs {need} tokens, past the model's {limit}; "
                              "shorten system_prompt, lower shots or max_new_tokens")
