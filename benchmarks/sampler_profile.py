"""The torch sampler alone on the 1B shape: rollout tokens/s of one 64 x 8 call (as the iteration benchmark's
rollout), then where its GPU time goes: kernels of one call as it runs (CUDA graphs), and torch ops with their
input shapes from a shorter call without graphs (a replayed graph hides its ops). Random prompts of 80-160 tokens;
random weights rarely stop early, so nearly every row runs to max_new_tokens.

    python benchmarks/sampler_profile.py --out DIR [--tokenizer TOK] [--problems 64] [--attempts 8] [--code OLD]"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from iteration import ROOT, policy_and_parameters  # this folder is on sys.path when the script runs
from trainer_profile import print_kinds, report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the 1B-shaped model")
    p.add_argument("--tokenizer", default="", help="tokenizer folder ('' = the bundled SmolLM2)")
    p.add_argument("--name", default="", help="label of this code in the output")
    p.add_argument("--problems", type=int, default=64, help="prompts per call")
    p.add_argument("--attempts", type=int, default=8, help="completions per prompt")
    p.add_argument("--max_new_tokens", type=int, default=512, help="token limit per completion")
    p.add_argument("--profile_tokens", type=int, default=128, help="token limit of the call profiled without graphs")
    p.add_argument("--profile", type=int, default=1, help="1 = also profile (GPU only)")
    p.add_argument("--code", default="", help="another checkout whose grpo/ to time instead (before / after)")
    p.add_argument("--model", default="", help="a model folder instead of the 1B shape (a smoke run on the CPU)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(args.code).resolve() if args.code else ROOT))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from grpo.engines.torch_engine import TorchEngine
    from grpo.model import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    model_dir, params = policy_and_parameters(args.model, args.tokenizer, Path(args.out).resolve())
    engine = TorchEngine(load_model(model_dir, "cuda" if cuda else "cpu"), load_tokenizer(model_dir),
                         args.problems * args.attempts, progress=False)
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(80, 160))] for _ in range(args.problems)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    call = lambda tokens, seed: engine.generate(prompts, args.attempts, 1.0, tokens, seed=seed)  # noqa: E731
    call(args.max_new_tokens, 0)  # warm-up: graphs captured, KV buffer reserved
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    call(args.max_new_tokens, 1)
    sync()
    seconds = time.perf_counter() - started
    tokens = engine.stats.tokens
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    card = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n{args.name or 'this checkout'}: {card}, {params / 1e9:.2f}B parameters, {args.problems} x "
          f"{args.attempts}, {args.max_new_tokens} new tokens\n")
    print("| sequences | tokens | seconds | tokens/s | decode steps/s | peak GiB |\n|---|---|---|---|---|---|")
    print(f"| {args.problems * args.attempts} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} | "
          f"{args.max_new_tokens / seconds:,.0f} | {peak:.1f} |")
    if not (cuda and args.profile):
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(args.max_new_tokens, 2)
        sync()
    print_kinds(report(prof, "one call (CUDA graphs)", ops=False), "one call (CUDA graphs)")
    if engine.static is not None:
        engine.static.graphs_on = False  # eager decode steps: every op and its shapes are seen
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        call(args.profile_tokens, 3)
        sync()
    what = f"one call of {args.profile_tokens} tokens without graphs"
    print_kinds(report(prof, what), what)


if __name__ == "__main__":
    main()
