"""Reward: +1 if the last \\boxed{} holds the gold number, 0 if another answer, -1 if none or truncated.

Pure string work in linear time: no eval, no backtracking regexes over model text."""
from __future__ import annotations

import re
from fractions import Fraction

CORRECT, WRONG, UNPARSEABLE = 1.0, 0.0, -1.0
MAX_BOX_CHARS = 200  # longer "answers" are prose, not a number
MAX_DIGITS = 40
_BOX = "\\boxed"
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_FRAC = re.compile(r"\\[dt]?frac\{(-?[0-9]+)\}\{(-?[0-9]+)\}")
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3})")


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
