import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from grpo.config import Config, ConfigError, mlproject_text, parse_args, search_space

ROOT = Path(__file__).resolve().parent.parent


def test_mlproject_is_generated_from_config():
    assert (ROOT / "MLproject").read_text() == mlproject_text(), "run: python -m grpo.config --write"
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(spec["entry_points"]) == {"main", "rollout", "annotate", "finetune", "evaluate", "sweep"}
    for name, entry in spec["entry_points"].items():
        flags = set(re.findall(r"--(\w+) \{\1\}", entry["command"]))
        assert flags == set(entry["parameters"]), name  # every parameter reaches the script


def test_conda_env_and_pyproject_agree():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"][-1]["pip"]
    assert sorted(pyproject) == sorted(conda)


def test_cli_parses_types_and_defaults():
    cfg = parse_args("rollout", ["--attempts", "4", "--temperature", "0.5", "--problems", "2"])
    assert (cfg.attempts, cfg.temperature, cfg.problems, cfg.model) == (4, 0.5, 2, "smollm2-135m")
    assert parse_args("annotate", ["--scale_std", "false"]).scale_std is False


@pytest.mark.parametrize("argv, message", [
    (["--attempts", "-1"], "attempts must be >= 1"),
    (["--temperature", "-0.5"], "temperature must be > 0"),
    (["--backend", "tpu"], "backend must be one of auto, hf, vllm"),
    (["--attempts", "many"], "invalid int value"),
    (["--nonsense", "1"], "unrecognized arguments"),
])
def test_bad_values_give_one_clear_line(argv, message):
    done = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "rollout.py"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_validate_and_search_space():
    with pytest.raises(ConfigError, match="learning_rate"):
        Config(learning_rate=-1.0).validate()
    with pytest.raises(ConfigError, match="not searchable"):
        Config(search="model").validate()
    assert set(search_space()) == {"temperature", "attempts", "learning_rate"}
