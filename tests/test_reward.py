from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.tasks.gsm8k import last_boxed, parse_number, score


def test_hand_written_cases():
    cases = [
        ("so \\boxed{72}", "72", (1.0, "correct")),
        ("\\boxed{1,234}", "1234", (1.0, "correct")),
        ("\\boxed{\\$18}", "18", (1.0, "correct")),
        ("\\boxed{18 \\text{ dollars}}", "18", (1.0, "correct")),
        ("\\boxed{x = 5}", "5", (1.0, "correct")),
        ("\\boxed{5.0}", "5", (1.0, "correct")),
        ("\\boxed{\\frac{3}{4}}", "0.75", (1.0, "correct")),
        ("\\boxed{-3}", "-3", (1.0, "correct")),
        ("\\boxed{7}", "72", (0.0, "wrong")),
        ("\\boxed{7} then \\boxed{72}", "72", (1.0, "correct")),  # the last box counts
        ("\\boxed{72} then \\boxed{7}", "72", (0.0, "wrong")),
        ("The answer is 72", "72", (-1.0, "unparseable")),
        ("\\boxed{}", "72", (-1.0, "unparseable")),
        ("\\boxed{seventy-two}", "72", (-1.0, "unparseable")),
        ("\\boxed{72", "72", (-1.0, "unparseable")),  # never closed
        ("\\boxed{{72}}", "72", (1.0, "correct")),
    ]
    for text, gold, expected in cases:
        assert score(text, gold) == expected, text


def test_truncation_is_unparseable_even_when_correct():
    assert score("\\boxed{72}", "72", truncated=True) == (-1.0, "unparseable")


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("no box") is None


def test_unicode_digits_and_huge_numbers_are_not_numbers_we_accept():
    assert parse_number("٧٢") is None  # arabic-indic digits: not ASCII, not parsed
    assert parse_number("9" * 1000) is None
    assert score("\\boxed{" + "9" * 1000 + "}", "72")[1] == "unparseable"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.text(alphabet="0123456789-.,/{}\\boxedfrac $", max_size=60))
def test_fuzz_never_raises(noise, box):
    for text in (noise, f"{noise}\\boxed{{{box}}}", f"\\boxed{{{box}", f"{box}\\boxed{{{noise}}}"):
        reward, outcome = score(text, "72")
        assert (reward, outcome) in {(1.0, "correct"), (0.0, "wrong"), (-1.0, "unparseable")}


def test_ten_thousand_adversarial_strings():
    import random

    rng = random.Random(0)
    pieces = ["\\boxed{", "{", "}", "\\frac{", "1", "0", "-", ".", ",", "٣", "𝟕", "$", "\\text{", " ", "\n", "x=",
              "9" * 50, "\\boxed", "}}}}", "{{{{"]
    for _ in range(10_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 80)))
        if rng.random() < 0.01:
            text = text * 2000  # very long completions
        assert score(text, "10")[1] in {"correct", "wrong", "unparseable"}
