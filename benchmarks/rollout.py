"""Rollout throughput: plain HF `generate` against our torch sampler and vLLM (where installed), same prompts.

    python benchmarks/rollout.py                      # the issue's workload: 128 problems x 8, T=0.7, 512 tokens
    python benchmarks/rollout.py --problems 8 --max_new_tokens 128   # a CPU-sized run

Prints a markdown table: generated tokens/s, seconds, boxed rate, speed-up over plain `generate`, peak GPU memory.
Every backend sees the same prompts in the same process, so the ratios are side by side."""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_generate(model, tokenizer, prompts, attempts, temperature, max_new_tokens, batch_prompts):
    """The baseline: transformers' `generate`, left-padded batches, sampling from softmax(logits / T)."""
    import torch

    texts, tokens = [], 0
    tokenizer.padding_side = "left"
    for k in range(0, len(prompts), batch_prompts):
        chunk = prompts[k:k + batch_prompts]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = (torch.arange(width, device=model.device)[None] >= torch.tensor(
            [width - len(p) for p in chunk], device=model.device)[:, None]).long()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=attempts,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, width:]
        for row in new.tolist():
            row = row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
            tokens += len(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, tokens


def _logprob_gap(model_name, device, prompts, out, temperature, sample=64):
    """Mean |sampler logprob - trainer logprob| over the tokens of `sample` completions (float32 trainer)."""
    import torch

    from grpo.model import load_model
    from grpo.scoring import score_completions

    model = load_model(model_name, device, dtype=torch.float32)
    flat = [(p, c) for p, group in zip(prompts, out) for c in group][:sample]
    rescored = score_completions(model, [p for p, _ in flat], [c.token_ids for _, c in flat], temperature)
    gaps = [abs(a - b) for (_, c), r in zip(flat, rescored) for a, b in zip(c.logprobs, r)]
    return sum(gaps) / max(len(gaps), 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model id or folder")
    parser.add_argument("--problems", type=int, default=128, help="train problems")
    parser.add_argument("--attempts", type=int, default=8, help="completions per problem")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="token limit per completion")
    parser.add_argument("--batch_size", type=int, default=1024, help="sequences per batch (ours and generate)")
    parser.add_argument("--backends", default="generate,hf,vllm", help="comma-separated: generate, hf, vllm")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from grpo.config import Config
    from grpo.engines.torch_engine import TorchEngine
    from grpo.model import load_model, load_tokenizer, pick_device
    from grpo.tasks.gsm8k import PromptBuilder, load_splits, score

    device = pick_device("auto")
    cfg = Config().replace(model=args.model, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                           generation_batch_size=args.batch_size, backend="vllm")
    tokenizer = load_tokenizer(cfg.policy.model)
    splits = load_splits("bundled")
    builder = PromptBuilder(tokenizer, cfg.data.system_prompt, cfg.data.shots, splits.exemplars)
    problems = splits.pool[:args.problems]
    prompts = [builder.ids(p) for p in problems]
    golds = [p.answer for p in problems for _ in range(args.attempts)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []

    def record(name, texts, tokens, seconds):
        boxed = sum(score(t, g)[1] != "unparseable" for t, g in zip(texts, golds)) / len(texts)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append(dict(backend=name, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                         boxed_rate=boxed, peak_gpu_gib=peak))
        print(f"{name}: {tokens / seconds:,.0f} tokens/s", file=sys.stderr)

    for backend in args.backends.split(","):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if backend == "vllm":
            from grpo.engines import vllm_available

            if not vllm_available():
                print("vllm: not installed, skipped", file=sys.stderr)
                continue
            from grpo.engines.vllm_engine import VLLMEngine

            sampler = VLLMEngine(cfg.engine, cfg.policy.model, device)
        elif backend in ("hf", "generate"):
            model = load_model(cfg.policy.model, device, dtype=dtype)
            sampler = TorchEngine(model, tokenizer, args.batch_size)
            sampler.generate(prompts[:2], 2, args.temperature, 8)  # warm-up, not timed
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if backend == "generate":
            texts, tokens = plain_generate(model, tokenizer, prompts, args.attempts, args.temperature,
                                           args.max_new_tokens, max(1, args.batch_size // args.attempts))
        else:
            out = sampler.generate(prompts, args.attempts, args.temperature, args.max_new_tokens, seed=0)
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for g in out for c in g]
            tokens = sum(len(c.token_ids) for g in out for c in g)
        if device == "cuda":
            torch.cuda.synchronize()
        record(backend, texts, tokens, time.perf_counter() - started)
        if backend != "generate":  # do the sampler's logprobs describe what the trainer will score?
            rows[-1]["logprob_gap"] = _logprob_gap(cfg.policy.model, device, prompts, out, args.temperature)
        del sampler
        gc.collect()

    base = next((r["tokens_per_s"] for r in rows if r["backend"] == "generate"), None)
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.problems} problems x {args.attempts} attempts, T={args.temperature}, max {args.max_new_tokens} "
          f"new tokens, {cfg.policy.model}, {card}\n")
    print("| backend | tokens/s | seconds | generated tokens | boxed rate | vs generate | peak GPU GiB | logprob gap |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.1f}x" if base else "-"
        print(f"| {r['backend']} | {r['tokens_per_s']:,.0f} | {r['seconds']:.1f} | {r['tokens']:,} | "
              f"{r['boxed_rate']:.1%} | {ratio} | {r['peak_gpu_gib']:.1f} | {r.get('logprob_gap', float('nan')):.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), card=card, rows=rows), indent=1))


if __name__ == "__main__":
    main()
