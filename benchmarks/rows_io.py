"""What main spends on rows files per iteration, with orjson and with the standard library, side by side: the
rollout file written, read back by annotate, the annotated file written, and read by the trainer. Synthetic rows
shaped like a 64 x 8 rollout of 512 tokens (token ids, float32 logprobs as Python floats, text).

    python benchmarks/rows_io.py [--problems 64] [--attempts 8] [--tokens 512] [--repeats 3]"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo import artifacts  # noqa: E402


def synthetic_rows(problems: int, attempts: int, tokens: int) -> list[dict]:
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    rows = []
    for group in range(problems):
        prompt = [rng.randrange(49152) for _ in range(150)]
        for _ in range(attempts):
            logprobs = torch.log_softmax(torch.randn(tokens, 64, generator=gen), -1)[:, 0]
            rows.append({"group": group, "iteration": 0, "policy_version": 0, "prompt_ids": prompt,
                         "completion_ids": [rng.randrange(49152) for _ in range(tokens)],
                         "logprobs": logprobs.tolist(), "completion": "Step 1: 48 / 2 = 24.\n" * 60,
                         "prompt": "Natalia sold clips to 48 of her friends in April... " * 6, "gold": "72",
                         "reward": 0.0, "truncated": False, "temperature": 1.0, "max_new_tokens": tokens})
    return rows


def timed(job, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        job()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=64, help="groups per iteration")
    p.add_argument("--attempts", type=int, default=8, help="completions per group")
    p.add_argument("--tokens", type=int, default=512, help="tokens per completion")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs of each step")
    args = p.parse_args()
    rollout = synthetic_rows(args.problems, args.attempts, args.tokens)
    annotated = [r | {"advantage": 0.5, "ref_logprobs": [x - 0.01 for x in r["logprobs"]], "flat_group": False}
                 for r in rollout]
    folder, fast = Path(tempfile.mkdtemp()), artifacts.orjson
    if fast is None:
        sys.exit("orjson is not installed: pip install orjson")
    results = {}
    for name, serialiser in (("json", None), ("orjson", fast)):
        artifacts.orjson = serialiser
        results[name] = {
            "write rollouts": timed(lambda: artifacts.write_jsonl(rollout, folder / "r.jsonl"), args.repeats),
            "read rollouts (annotate)": timed(lambda: artifacts.read_jsonl(folder / "r.jsonl"), args.repeats),
            "write annotated": timed(lambda: artifacts.write_jsonl(annotated, folder / "a.jsonl"), args.repeats),
            "read annotated (trainer)": timed(lambda: artifacts.read_jsonl(folder / "a.jsonl"), args.repeats)}
        assert artifacts.read_jsonl(folder / "a.jsonl") == annotated
    artifacts.orjson = fast
    size = (folder / "a.jsonl").stat().st_size / 1e6
    print(f"{len(rollout)} rows of {args.tokens} tokens (annotated file {size:.1f} MB), best of {args.repeats}\n")
    print("| step | json s | orjson s | json / orjson |\n|---|---|---|---|")
    for step in [*results["json"], "per iteration"]:
        slow = sum(results["json"].values()) if step == "per iteration" else results["json"][step]
        quick = sum(results["orjson"].values()) if step == "per iteration" else results["orjson"][step]
        print(f"| {step} | {slow:.3f} | {quick:.3f} | {slow / quick:.1f}x |")


if __name__ == "__main__":
    main()
