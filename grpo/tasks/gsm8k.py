"""GSM8k: loading, the fixed splits, the prompt, and the reward.

Splits of the 7473 train problems (fixed, whatever the run's seed):
- the last `MAX_SHOTS` (8) are reserved for few-shot exemplars (`shots=k` shows the last k of them);
- the 500 before those are the validation split, which rollouts never sample: sweeps tune on it;
- the remaining 6965 are the pool that rollouts walk through in a seeded order.
The 1319 test problems are only ever evaluated, never sampled or tuned on.

Reward: +1 if the last \\boxed{} holds the gold number, 0 if another number, -1 if none or truncated.
Pure string work in linear time: no eval, no backtracking regexes over model text."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from grpo.errors import DataError

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "gsm8k"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MAX_SHOTS = 8
VALIDATION_SIZE = 500

CORRECT, WRONG, UNPARSEABLE = 1.0, 0.0, -1.0
MAX_BOX_CHARS = 200  # longer "answers" are prose, not a number
MAX_DIGITS = 40
_BOX = "\\boxed"
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_FRAC = re.compile(r"\\[dt]?frac\{(-?[0-9]+)\}\{(-?[0-9]+)\}")
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3})")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    solution: str  # the worked solution, with the "#### N" line
    answer: str  # gold number: the text after "####", commas removed


@dataclass(frozen=True)
class Splits:
    pool: list[Problem]  # what rollouts sample
    validation: list[Problem]
    test: list[Problem]
    exemplars: list[Problem]  # few-shot candidates, the last of them shown first
    source: str  # where the data came from (a folder or a hub id), for lineage

    def split(self, name: str) -> list[Problem]:
        return {"test": self.test, "validation": self.validation}[name]


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


def is_local(dataset: str) -> bool:
    return dataset == "bundled" or Path(dataset).expanduser().exists() or dataset.startswith(("/", ".", "~"))


def load_split(dataset: str, split: str) -> list[Problem]:
    """'train' or 'test' from 'bundled', a folder of {split}.jsonl files, or a hub dataset id (via `datasets`)."""
    if is_local(dataset):
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


def load_splits(dataset: str) -> Splits:
    train, test = load_split(dataset, "train"), load_split(dataset, "test")
    reserved = MAX_SHOTS + VALIDATION_SIZE
    if len(train) <= reserved:
        raise DataError(f"{dataset}: train has {len(train)} problems; it needs more than {reserved} (the "
                        f"{MAX_SHOTS} exemplars and {VALIDATION_SIZE} validation problems are held out)")
    if not test:
        raise DataError(f"{dataset}: test has no problems; every evaluation needs some")
    source = str(BUNDLED if dataset == "bundled" else Path(dataset).expanduser().resolve()) \
        if is_local(dataset) else dataset
    return Splits(pool=train[:-reserved], validation=train[-reserved:-MAX_SHOTS], test=test,
                  exemplars=train[-MAX_SHOTS:], source=source)


def iteration_problems(pool: list[Problem], iteration: int, count: int, seed: int) -> list[Problem]:
    """The problems of one iteration: a seeded permutation of the pool, walked in order."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    start = iteration * count
    return [pool[order[(start + k) % len(pool)]] for k in range(count)]


def exemplar_text(problem: Problem) -> str:
    """A worked solution in the format we reward: GSM8k's <<calc>> marks removed, ends with \\boxed{N}."""
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

    def __init__(self, tokenizer, system_prompt: str, shots: int, exemplars: list[Problem]):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.exemplars = exemplars[-shots:] if shots else []

    def text(self, problem: Problem) -> str:
        messages = build_messages(problem.question, self.system_prompt, self.exemplars)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, problem: Problem) -> list[int]:
        return self.tokenizer(self.text(problem), add_special_tokens=False)["input_ids"]


# --- reward ---

def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (braces balanced), or None if there is none or it never closes."""
    start = text.rfind(_BOX + "{")
    if start < 0:
        return None
    depth, begin = 0, start + len(_BOX)
    for pos in range(begin, min(len(text), begin + 4 * MAX_BOX_CHARS)):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin + 1:pos]
    return None


def parse_number(boxed: str) -> Fraction | None:
    """The number an answer box states: '1,234', '$18', '18 \\text{ dollars}', '\\frac{3}{4}', 'x = 5'."""
    if len(boxed) > MAX_BOX_CHARS:
        return None
    text = _THOUSANDS.sub("", boxed.replace("\\!", "").replace("{,}", ""))
    text = _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    fraction = re.fullmatch(r"\s*(-?[0-9]+)\s*/\s*(-?[0-9]+)\s*", text)
    if fraction and int(fraction.group(2)) != 0:
        return Fraction(int(fraction.group(1)), int(fraction.group(2)))
    numbers = _NUMBER.findall(text)
    if not numbers or len(numbers[-1]) > MAX_DIGITS:
        return None
    return Fraction(numbers[-1])


def score(completion: str, gold: str, truncated: bool = False) -> tuple[float, str]:
    """(reward, outcome) where outcome is 'correct', 'wrong' or 'unparseable'."""
    if truncated:
        return UNPARSEABLE, "unparseable"
    boxed = last_boxed(completion)
    value = None if boxed is None else parse_number(boxed)
    if value is None:
        return UNPARSEABLE, "unparseable"
    return (CORRECT, "correct") if value == parse_number(gold) else (WRONG, "wrong")
