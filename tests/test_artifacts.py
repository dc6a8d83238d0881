"""Rows on disk: orjson (installed with the project) and the standard library write and read the same values, each
reads what the other wrote, and a damaged file is still one clear error."""
import json
import math

import pytest
import torch

from grpo import artifacts
from grpo.errors import DataError

SERIALISERS = {"orjson": artifacts.orjson, "json": None}


def sample_rows() -> list[dict]:
    logprobs = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), -1)
    return [
        {"group": 0, "prompt_ids": [1, 2, 49151], "completion_ids": list(range(50)),
         "logprobs": logprobs[0].tolist(), "ref_logprobs": None, "reward": -1.0, "advantage": -0.7071067811865475,
         "completion": 'So \\boxed{18} "quoted" \u00e9\u4e2d\U0001f600\n\ttabs', "flat_group": False},
        {"group": 1, "prompt_ids": [], "completion_ids": [7], "logprobs": logprobs[1, :1].tolist(),
         "ref_logprobs": logprobs[2, :1].tolist(), "reward": 1.0, "advantage": 1e-300, "extra": {"3": [0.1, 2.5e-8]},
         "completion": "a lone surrogate \ud800 from a broken decode"},  # orjson refuses it: the fallback writes it
    ]


def test_orjson_is_installed_so_the_fast_path_is_the_one_tested():
    assert artifacts.orjson is not None


@pytest.mark.parametrize("writer", SERIALISERS)
@pytest.mark.parametrize("reader", SERIALISERS)
def test_rows_round_trip_exactly_whichever_serialiser_wrote_or_reads_them(tmp_path, monkeypatch, writer, reader):
    rows = sample_rows()
    monkeypatch.setattr(artifacts, "orjson", SERIALISERS[writer])
    artifacts.write_jsonl(rows, tmp_path / "rows.jsonl")
    monkeypatch.setattr(artifacts, "orjson", SERIALISERS[reader])
    assert artifacts.read_jsonl(tmp_path / "rows.jsonl") == rows  # floats bit for bit, None, text, nesting
    assert [json.loads(line) for line in open(tmp_path / "rows.jsonl")] == rows  # plain JSON for any reader


def test_messages_with_integer_keys_read_back_as_the_standard_library_writes_them():
    message = {"op": "steps", "by_rank": {0: 1.5, 1: 2}}
    assert artifacts.loads(artifacts.dumps(message)) == json.loads(json.dumps(message)) == \
        {"op": "steps", "by_rank": {"0": 1.5, "1": 2}}


def test_nan_in_a_file_the_standard_library_wrote_still_reads(tmp_path):
    (tmp_path / "old.jsonl").write_text(json.dumps({"logprobs": [float("nan"), -1.0]}) + "\n")
    (value, rest), = [row["logprobs"] for row in artifacts.read_jsonl(tmp_path / "old.jsonl")]
    assert math.isnan(value) and rest == -1.0


def test_a_damaged_rows_file_is_one_clear_error(tmp_path):
    (tmp_path / "cut.jsonl").write_text('{"group": 0, "prompt_ids": [1, 2\n')
    with pytest.raises(DataError, match="not a JSONL file of rows"):
        artifacts.read_jsonl(tmp_path / "cut.jsonl")


def test_messages_keep_non_finite_floats_exactly():
    message = {"op": "steps", "metrics": {"loss": float("nan"), "ratio_max": float("inf")}, "error": None}
    back = artifacts.loads(artifacts.dumps(message))
    assert math.isnan(back["metrics"]["loss"]) and back["metrics"]["ratio_max"] == math.inf and back["error"] is None
