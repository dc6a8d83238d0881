"""The rollout, annotate and evaluate stages as plain functions: rows in, rows and metrics out. No MLflow here.

Rollout rows carry what produced them (iteration, temperature, token limit, model, policy version), so later
stages read those from the data instead of being told again."""
from __future__ import annotations

from grpo.errors import DataError
from grpo.tasks import gsm8k as task


def recorded(rows: list[dict], key: str):
    """The value of `key` that every row shares (what rollout recorded); a mix or a missing key is refused."""
    values = {repr(r.get(key)) for r in rows}
    if len(values) != 1 or rows[0].get(key) is None:
        raise DataError(f"rows do not share one {key!r} (found {', '.join(sorted(values))[:100]}); pass the rows "
                        "of one rollout")
    return rows[0][key]


def rows_model(cfg, rows: list[dict]) -> str:
    """The model rollout used (recorded in the rows); an explicit, different `model` is refused."""
    from grpo.config import Policy

    model = recorded(rows, "model")
    if cfg.policy.model not in (model, Policy.model):
        raise DataError(f"these rows were sampled from model {model!r}, not {cfg.policy.model!r}; drop the model "
                        "parameter (it is read from the rows) or pass the matching rows")
    return model


def _rows(problems, prompt_ids, outputs, builder, **provenance) -> list[dict]:
    rows = []
    for group, (problem, prompt, completions) in enumerate(zip(problems, prompt_ids, outputs)):
        for attempt, c in enumerate(completions):
            text = builder.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            reward, outcome = task.score(text, problem.answer, c.truncated)
            rows.append(dict(problem_id=problem.id, group=group, attempt=attempt, question=problem.question,
                             gold=problem.answer, prompt=builder.text(problem), completion=text,
                             prompt_ids=prompt, completion_ids=c.token_ids, logprobs=c.logprobs,
                             truncated=c.truncated, reward=reward, outcome=outcome, **provenance))
    return rows


def outcome_metrics(rows: list[dict]) -> dict[str, float]:
    n = max(len(rows), 1)
    count = lambda outcome: sum(r["outcome"] == outcome for r in rows)  # noqa: E731
    return {"reward_mean": sum(r["reward"] for r in rows) / n,
            "correct_rate": count("correct") / n,
            "wrong_rate": count("wrong") / n,
            "unparseable_rate": count("unparseable") / n,
            "boxed_rate": (count("correct") + count("wrong")) / n,
            "truncated_rate": sum(r["truncated"] for r in rows) / n,
            "completion_tokens_mean": sum(len(r["completion_ids"]) for r in rows) / n}


def rollout(engine, builder, pool, sampling, max_new_tokens: int, iteration: int, seed: int, model: str):
    """Sample sampling.attempts completions for each of this iteration's problems at sampling.temperature."""
    problems = task.iteration_problems(pool, iteration, sampling.problems, seed)
    prompt_ids = [builder.ids(p) for p in problems]
    outputs = engine.generate(prompt_ids, sampling.attempts, sampling.temperature, max_new_tokens,
                              seed=seed * 1_000_003 + iteration)
    rows = _rows(problems, prompt_ids, outputs, builder, iteration=iteration, temperature=sampling.temperature,
                 max_new_tokens=max_new_tokens, model=model, policy_version=engine.version)
    metrics = outcome_metrics(rows)
    metrics.update(tokens_per_s=engine.stats.tokens_per_s, generated_tokens=engine.stats.tokens,
                   seconds=engine.stats.seconds)
    return rows, metrics


def evaluate(engine, builder, problems, max_new_tokens: int, prefix: str = "test"):
    """Greedy decoding over `problems`; metrics named `{prefix}_accuracy` etc."""
    return evaluate_splits(engine, builder, {prefix: problems}, max_new_tokens)[prefix]


def evaluate_splits(engine, builder, splits: dict[str, list], max_new_tokens: int) -> dict[str, tuple]:
    """Greedy decoding over several splits in one engine call (one batch fills the engine better than two);
    split -> (rows, metrics named `{split}_accuracy` etc.)."""
    for name, problems in splits.items():
        if not problems:
            raise DataError(f"no {name} problems to evaluate")
    everything = [p for problems in splits.values() for p in problems]
    prompt_ids = [builder.ids(p) for p in everything]
    outputs = engine.generate(prompt_ids, 1, 0.0, max_new_tokens)
    results, start = {}, 0
    for name, problems in splits.items():
        end = start + len(problems)
        rows = _rows(problems, prompt_ids[start:end], outputs[start:end], builder, policy_version=engine.version,
                     split=name)
        m = outcome_metrics(rows)
        results[name] = rows, {f"{name}_accuracy": m["correct_rate"], f"{name}_boxed_rate": m["boxed_rate"],
                               f"{name}_truncated_rate": m["truncated_rate"],
                               f"{name}_completion_tokens_mean": m["completion_tokens_mean"],
                               f"{name}_problems": len(rows), f"{name}_tokens_per_s": engine.stats.tokens_per_s,
                               f"{name}_seconds": engine.stats.seconds}
        start = end
    return results


def annotate(rows: list[dict], reference_model, scoring, progress=None):
    """Add group-normalised advantages, and per-token reference logprobs at the temperature rollout used, to
    rollout rows. With scoring.drop_flat_groups, groups whose rewards are all equal are marked and left
    unscored: they carry no policy-gradient signal and are not trained on."""
    import torch

    from grpo.loss import group_advantages
    from grpo.scoring import score_completions

    if not rows:
        raise DataError("no rollout rows to annotate")
    temperature = recorded(rows, "temperature")
    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault((row.get("iteration", 0), row["group"]), []).append(index)
    sizes = {len(members) for members in groups.values()}
    if len(sizes) != 1:
        raise DataError(f"groups have different sizes {sorted(sizes)}; the rollout file is incomplete")
    order = list(groups.values())
    rewards = torch.tensor([[rows[i]["reward"] for i in members] for members in order])
    advantages = group_advantages(rewards, scale_std=scoring.scale_std)
    flat = (rewards == rewards[:, :1]).all(dim=1)
    for members, adv, is_flat in zip(order, advantages.tolist(), flat.tolist()):
        for i, a in zip(members, adv):
            rows[i].update(advantage=a, flat_group=is_flat)
    scored = [r for r in rows if not (scoring.drop_flat_groups and r["flat_group"])]
    ref = score_completions(reference_model, [r["prompt_ids"] for r in scored], [r["completion_ids"] for r in scored],
                            temperature, progress=progress)
    for row in rows:
        row["ref_logprobs"] = None
    for row, logps in zip(scored, ref):
        row["ref_logprobs"] = logps
    gaps = [abs(a - b) for r in scored for a, b in zip(r["logprobs"], r["ref_logprobs"])]
    metrics = {"groups": len(order), "groups_without_signal": int(flat.sum()),
               "signal_fraction": 1 - flat.float().mean().item(), "advantage_abs_mean": advantages.abs().mean().item(),
               "sequences_scored": len(scored), "sampler_ref_logprob_gap": sum(gaps) / max(len(gaps), 1)}
    return rows, metrics
