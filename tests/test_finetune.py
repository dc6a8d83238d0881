"""One optimiser step must move probability towards positive-advantage completions and away from negative."""
import torch

from grpo.config import Config
from grpo.finetune import finetune, load_trainer_state
from grpo.model import load_model
from grpo.scoring import score_completions


def _rows(tokenizer, model):
    prompt = tokenizer("Q: 2+2?\nA:", add_special_tokens=False)["input_ids"]
    good = tokenizer(" \\boxed{4}", add_special_tokens=False)["input_ids"]
    bad = tokenizer(" 5 5 5", add_special_tokens=False)["input_ids"]
    logps = score_completions(model, [prompt, prompt], [good, bad], tokenizer.pad_token_id, 1.0)
    return [dict(prompt_ids=prompt, completion_ids=c, logprobs=lp, ref_logprobs=lp, advantage=a)
            for c, lp, a in ((good, logps[0], 1.0), (bad, logps[1], -1.0))], prompt, good, bad


def test_one_step_raises_positive_and_lowers_negative(tiny_model_dir, tokenizer, tmp_path):
    before = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    rows, prompt, good, bad = _rows(tokenizer, before)
    cfg = Config(model=tiny_model_dir, learning_rate=1e-2, warmup_steps=0, train_batch_size=2,
                 gradient_accumulation_passes=1, temperature=1.0, kl_coef=0.0).validate()
    seen = []
    summary = finetune(cfg, rows, "", tmp_path / "ckpt", "cpu", on_step=lambda m, s: seen.append((s, m)),
                       show_progress=False)
    assert summary["optimizer_steps"] == 1 and [s for s, _ in seen] == [1]
    assert abs(seen[0][1]["ratio_mean"] - 1) < 1e-4  # first step: policy = sampler
    after = load_model(tiny_model_dir, "cpu", dtype=torch.float32, checkpoint=str(tmp_path / "ckpt"))
    new = score_completions(after, [prompt, prompt], [good, bad], tokenizer.pad_token_id, 1.0)
    assert sum(new[0]) > sum(rows[0]["logprobs"])
    assert sum(new[1]) < sum(rows[1]["logprobs"])
    assert load_trainer_state(str(tmp_path / "ckpt"))["global_step"] == 1


def test_resumed_training_continues_global_step_and_optimizer(tiny_model_dir, tokenizer, tmp_path):
    model = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    rows, *_ = _rows(tokenizer, model)
    cfg = Config(model=tiny_model_dir, train_batch_size=1, gradient_accumulation_passes=1,
                 save_checkpoint_steps=1, temperature=1.0).validate()
    finetune(cfg, rows, "", tmp_path / "a", "cpu", show_progress=False)
    summary = finetune(cfg.replace(iteration=1), rows, str(tmp_path / "a"), tmp_path / "b", "cpu",
                       show_progress=False)
    assert summary["global_step"] == 4
    assert (tmp_path / "b" / "optimizer.pt").is_file()
