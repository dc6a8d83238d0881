"""GSM8k loading and prompt building."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "gsm8k"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class DataError(ValueError):
    """Missing or malformed data; the message names the file, line and fix."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    solution: str  # the worked solution, with the "#### N" line
    answer: str  # gold number: the text after "####", commas removed


def gold_answer(solution: str) -> str:
    if "####" not in solution:
        raise DataError("solution has no '#### <answer>' line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _read_jsonl(path: Path) -> list[dict]:
    """GSM8k rows of a local JSONL file; a bad line fails with its file and line number."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
                raise DataError(f"{path}:{number}: needs 'question' and 'answer' keys")
            if "####" not in str(row["answer"]):
                raise DataError(f"{path}:{number}: answer has no '#### <number>' line")
            rows.append(row)
    return rows


def load_split(dataset: str, split: str) -> list[Problem]:
    """Load 'train' or 'test' from 'bundled', a folder of {split}.jsonl files, or a hub dataset id.

    Local files are read directly (no `datasets` needed, e.g. on a bare GPU box); hub ids go through
    `datasets`."""
    local = dataset == "bundled" or Path(dataset).exists() or dataset.startswith(("/", ".", "~"))
    if local:
        path = (BUNDLED if dataset == "bundled" else Path(dataset).expanduser()) / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} not found; pass dataset=bundled, openai/gsm8k, or a folder with {split}.jsonl")
        rows = _read_jsonl(path)
    else:
        import datasets

        datasets.disable_progress_bars()
        try:
            rows = datasets.load_dataset(dataset, "main", split=split)
        except Exception as e:  # offline, unknown id, ...
            raise DataError(f"cannot load dataset {dataset!r} ({type(e).__name__}); "
                            "offline? use dataset=bundled") from None
    return [Problem(f"{split}-{i}", r["question"], r["answer"], gold_answer(r["answer"])) for i, r in enumerate(rows)]


def exemplar_text(problem: Problem) -> str:
    """A worked solution in the format we reward: GSM8k's <<calc>> marks removed, ends with \\boxed{N}."""
    import re

    steps = re.sub(r"<<[^>]*>>", "", problem.solution.rsplit("####", 1)[0]).strip()
    return f"{steps}\nThe answer is \\boxed{{{problem.answer}}}."


def build_messages(question: str, system_prompt: str, exemplars: list[Problem]) -> list[dict]:
    """Chat messages: optional system prompt, few-shot turns, then the reference recipe's user prompt."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for ex in exemplars:
        messages += [{"role": "user", "content": f"{ex.question}\n{INSTRUCTION}"},
                     {"role": "assistant", "content": exemplar_text(ex)}]
    return messages + [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]


class PromptBuilder:
    """Turns problems into prompt token ids through the tokenizer's chat template."""

    def __init__(self, tokenizer, system_prompt: str, shots: int, train: list[Problem]):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.exemplars = train[-shots:] if shots else []  # fixed exemplars from the end of train

    def text(self, problem: Problem) -> str:
        messages = build_messages(problem.question, self.system_prompt, self.exemplars)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, problem: Problem) -> list[int]:
        return self.tokenizer(self.text(problem), add_special_tokens=False)["input_ids"]


def iteration_problems(train: list[Problem], iteration: int, count: int, seed: int, shots: int) -> list[Problem]:
    """The problems of one iteration: a seeded permutation of train (minus the exemplars), walked in order."""
    import random

    pool = train[:-shots] if shots else train
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    start = iteration * count
    return [pool[order[(start + k) % len(pool)]] for k in range(count)]
