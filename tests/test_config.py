import dataclasses
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from conftest import ROOT

from grpo.config import (ENTRY_POINTS, SECTIONS, Config, ConfigError, fields_for, mlproject_text, parse_args,
                         search_space)


def test_mlproject_is_generated_from_config():
    assert (ROOT / "MLproject").read_text() == mlproject_text(), "run: python -m grpo.config --write"
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(spec["entry_points"]) == {"main", "rollout", "annotate", "finetune", "evaluate", "sweep"}
    for name, entry in spec["entry_points"].items():
        flags = set(re.findall(r"--(\w+) \{\1\}", entry["command"]))
        assert flags == set(entry["parameters"]), name  # every parameter reaches the script
    done = subprocess.run([sys.executable, "-m", "grpo.config", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_field_names_are_unique_across_sections():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


def test_each_entry_point_declares_only_what_it_reads():
    params = lambda entry: {f.name for f in fields_for(entry)}  # noqa: E731
    # annotate reads temperature and the model from the rollouts it scores; it runs no engine
    assert {"temperature", "backend", "gpu_memory_utilization", "learning_rate"}.isdisjoint(params("annotate"))
    assert {"scale_std", "drop_flat_groups", "rollouts"} <= params("annotate")
    # finetune reads temperature and the token limit from the rows it trains on
    assert {"temperature", "max_new_tokens", "backend", "problems"}.isdisjoint(params("finetune"))
    assert {"learning_rate", "annotated", "output", "overwrite"} <= params("finetune")
    assert {"n_trials", "objective"}.isdisjoint(params("main")) and {"n_trials"} <= params("sweep")
    assert params("main") == params("sweep") - {f.name for f in fields_for(None) if f.name in
                                                 {g.name for g in dataclasses.fields(SECTIONS["sweep"])}}
    assert set(ENTRY_POINTS) == {"main", "rollout", "annotate", "finetune", "evaluate", "sweep"}


def test_conda_env_and_pyproject_agree():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"][-1]["pip"]
    assert sorted(pyproject) == sorted(conda)


def test_cli_parses_types_and_defaults():
    cfg = parse_args("rollout", ["--attempts", "4", "--temperature", "0.5", "--problems", "2"])
    assert (cfg.sampling.attempts, cfg.sampling.temperature, cfg.sampling.problems) == (4, 0.5, 2)
    assert cfg.policy.model == "smollm2-135m"
    assert parse_args("annotate", ["--scale_std", "false"]).scoring.scale_std is False
    assert Config().replace(learning_rate=3e-5).optim.learning_rate == 3e-5


@pytest.mark.parametrize("argv, message", [
    (["--attempts", "1"], "attempts must be >= 2"),
    (["--temperature", "-0.5"], "temperature must be > 0.0"),
    (["--backend", "tpu"], "backend must be one of auto, hf, vllm"),
    (["--attempts", "many"], "invalid int value"),
    (["--nonsense", "1"], "unrecognized arguments"),
    (["--temperature", "nan"], "temperature must be a finite number"),
])
def test_bad_values_give_one_clear_line(argv, message):
    done = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "rollout.py"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


@pytest.mark.parametrize("changes, message", [
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0.0"),
    ({"gpu_memory_utilization": 1.0}, "gpu_memory_utilization must be < 1"),
    ({"shots": 9}, "shots must be <= 8"),
    ({"search": "model"}, "not searchable"),
    ({"nonsense": 1}, "unknown parameter(s) nonsense"),
    ({"max_lag": 2}, "max_lag must be 0 or 1"),
    ({"max_lag": 1, "ranks": 2}, "max_lag=1 overlaps the engine with the trainer"),
    ({"max_lag": 1, "nodes": 2, "rendezvous": "host:29500"}, "in a trainer group (ranks > 1 or nodes > 1)"),
    ({"trainer_gpu": 0}, "trainer_gpu=0 is the engine's GPU"),
    ({"trainer_gpu": 1, "ranks": 2}, "trainer_gpu=1 places one trainer process"),
    ({"shard": True}, "shard=true splits the trainer's state over a trainer group's ranks"),
    ({"engine_ranks": 2, "trainer_gpu": 1}, "engine_ranks=2 places the trainer on the GPUs after the engines'"),
])
def test_validation_refuses_bad_values(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config().replace(**changes)


def test_engine_ranks_take_the_overlap_that_a_trainer_group_alone_cannot():
    cfg = Config().replace(max_lag=1, ranks=2, engine_ranks=2)  # the engines generate while the group trains
    assert (cfg.loop.max_lag, cfg.group.ranks, cfg.group.engine_ranks) == (1, 2, 2)
    cfg = Config().replace(max_lag=1, nodes=2, rendezvous="host:29500", engine_ranks=2)  # and across machines
    assert (cfg.loop.max_lag, cfg.group.nodes, cfg.group.engine_ranks) == (1, 2, 2)


def test_search_space():
    assert set(search_space()) == {"temperature", "attempts", "learning_rate", "max_draws", "scale_std",
                                   "overlong_buffer", "kl_coef", "epsilon_high", "loss_reduction"}
