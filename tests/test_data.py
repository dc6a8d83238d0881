import pytest

from grpo.data import INSTRUCTION, DataError, PromptBuilder, exemplar_text, gold_answer, iteration_problems, load_split
from grpo.reward import score


def test_bundled_gsm8k_loads_with_gold_answers():
    train, test = load_split("bundled", "train"), load_split("bundled", "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0].answer == "72"
    assert all("," not in p.answer and p.answer for p in test)


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


def test_exemplar_is_a_correct_boxed_answer():
    problem = load_split("bundled", "train")[0]
    text = exemplar_text(problem)
    assert "<<" not in text and score(text, problem.answer) == (1.0, "correct")


def test_prompt_through_the_real_chat_template(tokenizer):
    train = load_split("bundled", "train")
    builder = PromptBuilder(tokenizer, "Be brief.", 1, train)
    text = builder.text(train[5])
    assert text.count(INSTRUCTION) == 2 and "Be brief." in text and text.endswith("<|im_start|>assistant\n")
    reference = PromptBuilder(tokenizer, "", 0, train).text(train[5])
    assert reference.count(INSTRUCTION) == 1


def test_iteration_problems_are_seeded_and_exclude_exemplars():
    train = load_split("bundled", "train")
    first = iteration_problems(train, 0, 4, seed=1, shots=1)
    assert first == iteration_problems(train, 0, 4, seed=1, shots=1)
    assert first != iteration_problems(train, 1, 4, seed=1, shots=1)
    assert train[-1] not in iteration_problems(train, 0, 7472, seed=1, shots=1)
