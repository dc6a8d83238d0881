import json

import pytest

from grpo.errors import DataError
from grpo.tasks.gsm8k import (INSTRUCTION, MAX_SHOTS, VALIDATION_SIZE, PromptBuilder, exemplar_text, gold_answer,
                              iteration_problems, load_split, load_splits, score)


def test_bundled_gsm8k_loads_with_gold_answers():
    train, test = load_split("bundled", "train"), load_split("bundled", "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].answer == "72"
    assert all("," not in p.answer and p.answer for p in test)


def test_splits_are_fixed_disjoint_and_validation_is_never_sampled():
    splits = load_splits("bundled")
    assert (len(splits.pool), len(splits.validation), len(splits.exemplars)) == (7473 - 508, VALIDATION_SIZE, MAX_SHOTS)
    ids = lambda problems: {p.id for p in problems}  # noqa: E731
    assert not ids(splits.pool) & ids(splits.validation) and not ids(splits.validation) & ids(splits.exemplars)
    assert splits.validation[0].id == "train-6965" and splits.exemplars[-1].id == "train-7472"
    sampled = {p.id for i in range(60) for p in iteration_problems(splits.pool, i, 128, seed=3)}
    assert len(sampled) > 6900 and not sampled & (ids(splits.validation) | ids(splits.exemplars))
    assert load_splits("bundled").validation == splits.validation  # independent of any seed


def test_gold_answer_strips_commas():
    assert gold_answer("so\n#### 1,234") == "1234"
    with pytest.raises(DataError):
        gold_answer("no marker")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{not json\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        load_split(str(tmp_path), "train")
    (tmp_path / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: needs 'question' and 'answer'"):
        load_split(str(tmp_path), "test")
    with pytest.raises(DataError, match="not found"):
        load_split(str(tmp_path / "missing"), "train")


def test_empty_or_small_splits_are_refused_up_front(tmp_path, digits_dataset):
    row = json.dumps({"question": "q", "answer": "#### 1"})
    (tmp_path / "train.jsonl").write_text((row + "\n") * 600)
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="test has no problems"):
        load_splits(str(tmp_path))
    (tmp_path / "train.jsonl").write_text((row + "\n") * 10)
    with pytest.raises(DataError, match="train has 10 problems; it needs more than 508"):
        load_splits(str(tmp_path))
    assert len(load_splits(digits_dataset).pool) == 620 - 508


def test_exemplar_is_a_correct_boxed_answer():
    problem = load_split("bundled", "train")[0]
    text = exemplar_text(problem)
    assert "<<" not in text and score(text, problem.answer) == (1.0, "correct")


def test_prompt_through_the_real_chat_template(tokenizer):
    splits = load_splits("bundled")
    builder = PromptBuilder(tokenizer, "Be brief.", 1, splits.exemplars)
    text = builder.text(splits.pool[5])
    assert text.count(INSTRUCTION) == 2 and "Be brief." in text and text.endswith("<|im_start|>assistant\n")
    assert splits.exemplars[-1].question in text  # shots show the last exemplars
    assert PromptBuilder(tokenizer, "", 0, splits.exemplars).text(splits.pool[5]).count(INSTRUCTION) == 1


def test_iteration_problems_are_seeded():
    pool = load_splits("bundled").pool
    first = iteration_problems(pool, 0, 4, seed=1)
    assert first == iteration_problems(pool, 0, 4, seed=1)
    assert first != iteration_problems(pool, 1, 4, seed=1) and first != iteration_problems(pool, 0, 4, seed=2)


@pytest.mark.parametrize("clean_up", [False, True])
def test_decoding_many_completions_at_once_gives_each_ones_decode(tokenizer, clean_up, monkeypatch):
    """Rollout decodes every completion in one call to the fast tokenizer's backend: the same texts as `decode`
    one by one (special tokens skipped; one by one where the tokenizer cleans up spaces), on random ids."""
    import random

    from grpo.model import decode_all

    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", clean_up)
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    sequences = [[rng.choice(special) if rng.random() < 0.1 else rng.randrange(tokenizer.vocab_size)
                  for _ in range(rng.randrange(0, 40))] for _ in range(200)]
    sequences.append(tokenizer(" 3 , so . The answer is \\boxed{12 } .", add_special_tokens=False)["input_ids"])
    texts = decode_all(tokenizer, sequences)
    assert texts == [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
