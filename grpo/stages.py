"""The rollout, evaluate and annotate stages as plain functions: rows in, rows and metrics out."""
from __future__ import annotations

import json
from pathlib import Path

from grpo.data import PromptBuilder, Problem, iteration_problems
from grpo.reward import score


def _rows(problems: list[Problem], prompt_ids, outputs, tokenizer, builder, **extra) -> list[dict]:
    rows = []
    for group, (problem, prompt, completions) in enumerate(zip(problems, prompt_ids, outputs)):
        for attempt, c in enumerate(completions):
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            reward, outcome = score(text, problem.answer, c.truncated)
            rows.append(dict(problem_id=problem.id, group=group, attempt=attempt, question=problem.question,
                             gold=problem.answer, prompt=builder.text(problem), completion=text,
                             prompt_ids=prompt, completion_ids=c.token_ids, logprobs=c.logprobs,
                             truncated=c.truncated, reward=reward, outcome=outcome, **extra))
    return rows


def outcome_metrics(rows: list[dict], prefix: str = "") -> dict[str, float]:
    n = max(len(rows), 1)
    count = lambda outcome: sum(r["outcome"] == outcome for r in rows)  # noqa: E731
    return {f"{prefix}reward_mean": sum(r["reward"] for r in rows) / n,
            f"{prefix}correct_rate": count("correct") / n,
            f"{prefix}wrong_rate": count("wrong") / n,
            f"{prefix}unparseable_rate": count("unparseable") / n,
            f"{prefix}boxed_rate": (count("correct") + count("wrong")) / n,
            f"{prefix}truncated_rate": sum(r["truncated"] for r in rows) / n,
            f"{prefix}completion_tokens_mean": sum(len(r["completion_ids"]) for r in rows) / n}


def rollout(cfg, sampler, builder: PromptBuilder, train: list[Problem], iteration: int):
    """Sample cfg.attempts completions for each of this iteration's problems at cfg.temperature."""
    problems = iteration_problems(train, iteration, cfg.problems, cfg.seed, cfg.shots)
    prompt_ids = [builder.ids(p) for p in problems]
    outputs = sampler.generate(prompt_ids, cfg.attempts, cfg.temperature, cfg.max_new_tokens,
                               seed=cfg.seed * 100003 + iteration)
    rows = _rows(problems, prompt_ids, outputs, builder.tokenizer, builder, iteration=iteration)
    metrics = outcome_metrics(rows)
    metrics.update(tokens_per_s=sampler.stats.tokens_per_s, generated_tokens=sampler.stats.tokens,
                   seconds=sampler.stats.seconds)
    return rows, metrics


def evaluate(sampler, builder: PromptBuilder, test: list[Problem], limit: int, max_new_tokens: int):
    """Greedy decoding over the first `limit` test problems (0 = all)."""
    problems = test[:limit] if limit else test
    prompt_ids = [builder.ids(p) for p in problems]
    outputs = sampler.generate(prompt_ids, 1, 0.0, max_new_tokens)
    rows = _rows(problems, prompt_ids, outputs, builder.tokenizer, builder)
    m = outcome_metrics(rows)
    metrics = {"test_accuracy": m["correct_rate"], "test_boxed_rate": m["boxed_rate"],
               "test_truncated_rate": m["truncated_rate"], "test_completion_tokens_mean": m["completion_tokens_mean"],
               "test_problems": len(rows), "tokens_per_s": sampler.stats.tokens_per_s,
               "seconds": sampler.stats.seconds}
    return rows, metrics


def annotate(cfg, rows: list[dict], reference_model, pad_id: int, show_progress: bool = True):
    """Add per-token reference logprobs and group-normalised advantages to rollout rows."""
    import torch

    from grpo.loss import group_advantages
    from grpo.scoring import score_completions

    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault((row.get("iteration", 0), row["group"]), []).append(index)
    sizes = {len(members) for members in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"groups have different sizes {sorted(sizes)}; the rollout file is incomplete")
    order = list(groups.values())
    rewards = torch.tensor([[rows[i]["reward"] for i in members] for members in order])
    advantages = group_advantages(rewards, scale_std=cfg.scale_std)
    for members, adv in zip(order, advantages.tolist()):
        for i, a in zip(members, adv):
            rows[i]["advantage"] = a
    # rows of flat groups (advantage 0) are not trained on when drop_flat_groups: don't score them either
    scored = [r for r in rows if not cfg.drop_flat_groups or r["advantage"] != 0.0]
    ref = score_completions(reference_model, [r["prompt_ids"] for r in scored],
                            [r["completion_ids"] for r in scored], pad_id, cfg.temperature, show_progress=show_progress,
                            fast=True)
    for row in rows:
        row["ref_logprobs"] = None
    for row, logps in zip(scored, ref):
        row["ref_logprobs"] = logps
    flat = (rewards == rewards[:, :1]).all(dim=1)
    sampler_gap = [abs(a - b) for r in scored for a, b in zip(r["logprobs"], r["ref_logprobs"])]
    metrics = {"groups": len(order), "groups_without_signal": int(flat.sum()),
               "signal_fraction": 1 - flat.float().mean().item(), "advantage_abs_mean": advantages.abs().mean().item(),
               "sampler_ref_logprob_gap": sum(sampler_gap) / max(len(sampler_gap), 1)}
    return rows, metrics


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write atomically (temp file + rename), so a killed run never leaves a half file behind."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
