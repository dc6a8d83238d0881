"""Annotate's reference scoring alone on the 1B shape: `score_completions` over one iteration's rows, tokens/s and
MFU (forward only: 2 x parameters x tokens/s over the bf16 peak), this checkout and, with --code, another one,
each in a process of its own one after the other (same rows, same card).

    python benchmarks/reference_scoring.py --out DIR [--tokenizer TOK] [--code OTHER_CHECKOUT] [--rows 2048]
    python benchmarks/reference_scoring.py --out /tmp/rs --model smollm2-135m --rows 16 --code .baseline  (CPU)"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from iteration import PEAK_BF16, ROOT, policy_and_parameters  # this folder is on sys.path when the script runs
from trainer_profile import synthetic_rows


def time_scoring(code: Path, out: Path, model: str, tokenizer: str, rows: int) -> dict:
    """In this process: the reference model of `code`'s grpo (compiled, as annotate loads it), a warm-up pass and a
    timed pass over the same rows."""
    sys.path.insert(0, str(code))
    import torch

    from grpo.scoring import load_reference, score_completions

    model, params = policy_and_parameters(model, tokenizer, out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = load_reference(model, device)
    data = synthetic_rows(rows, reference.config.vocab_size)
    prompts, completions = [r["prompt_ids"] for r in data], [r["completion_ids"] for r in data]
    score_completions(reference, prompts, completions, 1.0)
    started = time.perf_counter()
    values = score_completions(reference, prompts, completions, 1.0)
    seconds = time.perf_counter() - started
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "mfu": 2 * params * tokens / seconds / PEAK_BF16,
            "first_values": values[0][:3]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the 1B-shaped model")
    p.add_argument("--tokenizer", default="", help="tokenizer folder ('' = the bundled SmolLM2)")
    p.add_argument("--code", default="", help="another checkout whose grpo/ to time too (before / after)")
    p.add_argument("--rows", type=int, default=2048, help="rows scored (one iteration of 256 x 8)")
    p.add_argument("--model", default="", help="a model folder or id instead of the 1B shape (a smoke run on a CPU)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: time this checkout, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(time_scoring(Path(args.one), Path(args.out).resolve(), args.model, args.tokenizer,
                                      args.rows)))
        return
    results = {}
    for name, code in [("before", args.code), ("after", str(ROOT))] if args.code else [("this checkout", str(ROOT))]:
        done = subprocess.run([sys.executable, __file__, "--out", args.out, "--tokenizer", args.tokenizer,
                               "--model", args.model, "--rows", str(args.rows), "--one", str(Path(code).resolve())],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n| {args.rows} rows | seconds | tokens/s | MFU (forward) | first logprobs |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
              f"{', '.join(f'{v:.4f}' for v in r['first_values'])} |")


if __name__ == "__main__":
    main()
