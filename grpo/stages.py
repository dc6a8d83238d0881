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
    from grpo.model import decode_all

    rows = []
    texts = iter(decode_all(builder.tokenizer, [c.token_ids for completions in outputs for c in completions]))
    for group, (problem, prompt, completions) in enumerate(zip(problems, prompt_ids, outputs)):
        for attempt, c in enumerate(completions):
            text = next(texts)
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
    """Sample sampling.attempts completions for each of this iteration's problems at sampling.temperature.

    With sampling.max_draws > 1 (dynamic sampling), further problems are drawn until `problems` groups have
    rewards that differ; the batch is those groups, topped up with flat ones when the draws run out, in the
    order they were drawn. Outcome metrics describe every sampled completion, kept or not."""
    wanted, groups, seen = sampling.problems, [], set()
    tokens = seconds = draws = found = 0
    while draws < sampling.max_draws and found < wanted:
        problems = [p for p in _draw_problems(pool, iteration, wanted, seed, draws) if p.id not in seen]
        if not problems:  # a pool this small has nothing left to draw
            break
        seen.update(p.id for p in problems)
        prompt_ids = [builder.ids(p) for p in problems]
        outputs = engine.generate(prompt_ids, sampling.attempts, sampling.temperature, max_new_tokens,
                                  seed=seed * 1_000_003 + iteration + draws * 100_003)
        tokens, seconds, draws = tokens + engine.stats.tokens, seconds + engine.stats.seconds, draws + 1
        drawn = _groups(_rows(problems, prompt_ids, outputs, builder, iteration=iteration,
                              temperature=sampling.temperature, max_new_tokens=max_new_tokens, model=model,
                              policy_version=engine.version))
        groups += drawn
        found += sum(map(_has_signal, drawn))
    signal = [g for g in groups if _has_signal(g)][:wanted]
    flat = [g for g in groups if not _has_signal(g)][:wanted - len(signal)]
    keep = {id(g) for g in signal + flat}
    rows = [dict(r, group=n) for n, g in enumerate(g for g in groups if id(g) in keep) for r in g]
    metrics = outcome_metrics([r for g in groups for r in g])
    metrics.update(tokens_per_s=tokens / seconds if seconds else 0.0, generated_tokens=tokens, seconds=seconds)
    if sampling.max_draws > 1:
        metrics.update(draws=draws, groups_sampled=len(groups), signal_groups_kept=len(signal),
                       signal_groups_found=found)
    return rows, metrics


def _draw_problems(pool, iteration: int, count: int, seed: int, draw: int):
    """Draw 0 is the iteration's share of the seeded walk through the pool; further draws (dynamic sampling)
    walk other seeded orders."""
    return task.iteration_problems(pool, iteration, count, seed if draw == 0 else seed * 7_919 + draw)


def _groups(rows: list[dict]) -> list[list[dict]]:
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return list(groups.values())


def _has_signal(group: list[dict]) -> bool:
    """Attempts that scored differently: the group's advantages are not all 0."""
    return len({r["reward"] for r in group}) > 1


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
    unscored: they carry no policy-gradient signal and are not trained on (`train` false). reference_model None
    (main with kl_coef 0: the loss has no KL term) scores nothing: the rows carry no reference logprobs."""
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
    trained = training_rewards(rows, scoring.overlong_buffer)
    rewards = torch.tensor([[trained[i] for i in members] for members in order])
    advantages = group_advantages(rewards, scale_std=scoring.scale_std)
    flat = (rewards == rewards[:, :1]).all(dim=1)
    for members, adv, is_flat in zip(order, advantages.tolist(), flat.tolist()):
        for i, a in zip(members, adv):
            rows[i].update(advantage=a, flat_group=is_flat, train_reward=trained[i],
                           train=not (scoring.drop_flat_groups and is_flat))
    chosen = [r for r in rows if r["train"]]
    for row in rows:
        row["ref_logprobs"] = None
    metrics = {"groups": len(order), "groups_without_signal": int(flat.sum()),
               "signal_fraction": 1 - flat.float().mean().item(), "advantage_abs_mean": advantages.abs().mean().item()}
    if reference_model is not None:
        score = getattr(reference_model, "score_completions", None)  # a trainer group's ranks score for it
        score = score or (lambda *args, **kwargs: score_completions(reference_model, *args, **kwargs))
        ref = score([r["prompt_ids"] for r in chosen], [r["completion_ids"] for r in chosen], temperature,
                    progress=progress)
        for row, logps in zip(chosen, ref):
            row["ref_logprobs"] = logps
        gaps = [abs(a - b) for r in chosen for a, b in zip(r["logprobs"], r["ref_logprobs"])]
        metrics |= {"sequences_scored": len(chosen), "sampler_ref_logprob_gap": sum(gaps) / max(len(gaps), 1)}
    if scoring.overlong_buffer:
        metrics["shaped_reward_mean"] = sum(trained) / len(trained)
    return rows, metrics


def training_rewards(rows: list[dict], overlong_buffer: float) -> list[float]:
    """The rewards advantages are computed from: rollout's, or with overlong_buffer > 0 DAPO's soft overlong
    penalty: each completion scored as if it had not been cut, minus its length penalty."""
    import torch

    from grpo.loss import overlong_penalty

    if not overlong_buffer:
        return [r["reward"] for r in rows]
    lengths = torch.tensor([len(r["completion_ids"]) for r in rows], dtype=torch.float32)
    penalty = overlong_penalty(lengths, recorded(rows, "max_new_tokens"), overlong_buffer).tolist()
    return [task.score(r["completion"], r["gold"])[0] - p for r, p in zip(rows, penalty)]
