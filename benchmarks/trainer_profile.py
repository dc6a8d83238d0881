"""The trainer alone on the 1B shape: optimisation tokens/s and MFU for a few micro-batch shapes, side by side in
one process, and where one optimiser step's GPU time goes (torch.profiler, kernels grouped by kind), so that MFU
work aims at what costs. Synthetic rows stand in for a rollout (random ids; lengths like a 512-token rollout).

    python benchmarks/trainer_profile.py --out DIR [--tokenizer TOK] [--shapes 16:8192 32:16384] [--rows 512]

A shape is ROWS:TOKENS, the micro-batch caps (train_batch_size : max_tokens_per_micro_batch); every shape trains
32 sequences per optimiser step, as the iteration benchmark does. MFU = 6 x parameters x tokens/s / bf16 peak.

Under torchrun the trainer is a group's rank (each trains on its share of every step, gradients summed over the
ranks); the sharded one (FSDP2, the group's shard=true) also times a checkpoint's gather:

    torchrun --standalone --nproc-per-node N benchmarks/trainer_profile.py [--shard 1] --profile 0 --out DIR"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from iteration import PEAK_BF16, ROOT, policy_and_parameters  # this folder is on sys.path when the script runs

KINDS = [("matmul", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "ampere", "wgmma")),
         ("attention", ("flash", "fmha", "attention")), ("optimizer", ("adam", "multi_tensor")),
         ("softmax / logprobs", ("softmax", "logsumexp", "log_softmax", "gather")),
         ("norm", ("rms", "norm")), ("copy / cast", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
         ("collectives", ("nccl",))]


def synthetic_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Rows as annotate writes them: prompt ~80-160 tokens, completion 60-512, logprobs of a sampler, advantages."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, completion = rng.randint(80, 160), rng.randint(60, 512)
        rows.append({"prompt_ids": [rng.randrange(vocab) for _ in range(prompt)],
                     "completion_ids": [rng.randrange(vocab) for _ in range(completion)],
                     "logprobs": [-rng.uniform(0.1, 3.0) for _ in range(completion)],
                     "ref_logprobs": [-rng.uniform(0.1, 3.0) for _ in range(completion)],
                     "advantage": rng.gauss(0.0, 1.0), "temperature": 1.0, "max_new_tokens": 512})
    return rows


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile_step(trainer, rows: list[dict], top: int = 20, steps: int = 1) -> dict[str, float]:
    """GPU milliseconds by kernel kind over `steps` optimiser steps (32 rows each), with `report`'s tables; also
    the wall-clock milliseconds (in a group, kernels of collectives overlap others or wait for the ranks)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from grpo.trainer import drain

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        started = time.perf_counter()
        drain(trainer.train(rows[:32 * steps], iteration=99, seed=0, total_steps=10**6))
        torch.cuda.synchronize()
        print(f"\nprofiled {steps} step(s): {(time.perf_counter() - started) * 1000:.0f} ms wall-clock (with the "
              "profiler's own cost)")
    return report(prof, f"{steps} step(s)", top)


def report(prof, what: str, top: int = 20, ops: bool = True) -> dict[str, float]:
    """GPU milliseconds by kernel kind of a finished torch.profiler `prof`; prints the top kernels and (ops) the
    top torch ops by the GPU time of their own kernels with their input shapes (which op makes which copy)."""
    import torch

    gpu = lambda e, own=False: (getattr(e, "self_device_time_total" if own else "device_time_total", 0) or 0)  # noqa
    # kernels only: a range that torch annotates on the GPU (Optimizer.step#AdamW.step) would count its kernels twice
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and "#" not in e.key and not e.key.startswith("ProfilerStep")]
    by_kind: dict[str, float] = defaultdict(float)
    for event in kernels:
        by_kind[kind_of(event.key)] += gpu(event) / 1000
    print(f"\ntop kernels of {what} (GPU ms, calls):")
    for event in sorted(kernels, key=lambda e: -gpu(e))[:top]:
        print(f"  {gpu(event) / 1000:8.1f} {event.count:6d}  {event.key[:100]}")
    if ops:
        ops = [e for e in prof.key_averages(group_by_input_shape=True)
               if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::") and gpu(e, own=True)]
        print(f"\ntop torch ops of {what} by the GPU time of their own kernels (ms, calls, input shapes):")
        for event in sorted(ops, key=lambda e: -gpu(e, own=True))[:top]:
            print(f"  {gpu(event, own=True) / 1000:8.1f} {event.count:6d}  {event.key} {str(event.input_shapes)[:90]}")
    return dict(by_kind)


def print_kinds(by_kind: dict[str, float], what: str) -> None:
    total = sum(by_kind.values())
    print(f"\n{what}, GPU time by kernel kind ({total:.0f} ms in all):\n")
    print("| kind | ms | share |")
    print("|---|---|---|")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.1f} | {ms / total:.0%} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the 1B-shaped model")
    p.add_argument("--tokenizer", default="", help="tokenizer folder ('' = the bundled SmolLM2)")
    p.add_argument("--name", default="", help="label of this code in the output")
    p.add_argument("--profile", type=int, default=1, help="1 = also profile one step by kernel kind")
    p.add_argument("--shapes", nargs="+", default=["16:8192", "32:16384"], help="micro-batch caps ROWS:TOKENS")
    p.add_argument("--rows", type=int, default=512, help="rows per timed finetune (one iteration's rollout)")
    p.add_argument("--code", default="", help="another checkout whose grpo/ to time instead (before / after)")
    p.add_argument("--model", default="", help="a model folder instead of the 1B shape (a smoke run on the CPU)")
    p.add_argument("--shard", type=int, default=0, help="1 = the FSDP2 trainer (shard=true); start under torchrun")
    p.add_argument("--steps", type=int, default=1, help="optimiser steps the profile covers")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(args.code).resolve() if args.code else ROOT))
    import torch

    from grpo.config import Config
    from grpo.trainer import Trainer, drain

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = 0, 1  # MFU is per GPU: the group's tokens/s over its GPUs' peak
    if args.shard or "LOCAL_RANK" in os.environ:  # under torchrun
        import torch.distributed as dist

        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if rank:  # every rank trains and profiles (collectives), rank 0 alone reports
        sys.stdout = open(os.devnull, "w")
    if world > 1:  # rank 0 builds the model folder first; the others would read it half written
        if rank == 0:
            policy_and_parameters(args.model, args.tokenizer, Path(args.out).resolve())
        dist.barrier()
    model, params = policy_and_parameters(args.model, args.tokenizer, Path(args.out).resolve())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    trainer = None
    results = []
    for shape in args.shapes:
        cap_rows, cap_tokens = (int(x) for x in shape.split(":"))
        optim = Config().replace(train_batch_size=cap_rows, gradient_accumulation_passes=max(1, 32 // cap_rows),
                                 max_tokens_per_micro_batch=cap_tokens, learning_rate=1e-6).optim
        if trainer is None:
            trainer = Trainer(model, optim, device, shard=bool(args.shard))
            rows = synthetic_rows(args.rows, trainer.model.config.vocab_size)
        trainer.optim = optim
        # warm-up on the same rows: kernels, the allocator, and every shape the compiled layers will see
        warm = drain(trainer.train(rows, iteration=0, seed=0, total_steps=10**6))
        sync()
        started = time.perf_counter()
        summary = drain(trainer.train(rows, iteration=1, seed=0, total_steps=10**6))
        sync()
        seconds = time.perf_counter() - started
        tps = summary["trained_tokens"] / seconds
        results.append({"shape": shape, "seconds": seconds, "steps": summary["optimizer_steps"], "tokens_per_s": tps,
                        "mfu": 6 * params * tps / PEAK_BF16 / world, "peak_gib": summary["peak_gpu_gib"]})
        print(f"{shape}: {seconds:.2f} s, {tps:,.0f} tokens/s, MFU {results[-1]['mfu']:.1%} (warm-up's last step: "
            f"loss {warm['last_loss']:.6f}, gradient norm {warm['last_grad_norm']:.5f})", flush=True)
    gather = ""
    if args.shard:  # the ranks gather the whole state to rank 0 (the part of a checkpoint that blocks training)
        seconds = []
        for k in range(2):  # the first save also pins the host buffers the next ones reuse
            started = time.perf_counter()
            trainer.save(Path(args.out).resolve() / "checkpoints" / f"iter-{k:04d}")
            seconds.append(time.perf_counter() - started)
            trainer.wait_saved()
        gather = f", checkpoint gather {seconds[0]:.1f} s (first), {seconds[1]:.1f} s (next)"
    by_kind = profile_step(trainer, rows, steps=args.steps) if device == "cuda" and args.profile else {}
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    ranks = f", {'sharded over ' if args.shard else ''}{world} rank(s)" if world > 1 or args.shard else ""
    print(f"\n{args.name or 'this checkout'}: {card}, {params / 1e9:.2f}B parameters, {args.rows} rows, 32 per step"
        f"{ranks}{gather}\n")
    print("| micro-batch caps (rows:tokens) | seconds | optimiser steps | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} | {r['seconds']:.2f} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
            f"{r['peak_gib']:.1f} |")
    if by_kind:
        print_kinds(by_kind, f"{args.steps} step(s) at {args.shapes[-1]}")


if __name__ == "__main__":
    main()
