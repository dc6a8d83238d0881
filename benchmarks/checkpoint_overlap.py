"""Generation on the GPU of a trainer that is writing a checkpoint, as on a trainer group's rank 0 (it generates
its share of the next rollout while its writer thread saves the last iteration's state). Times the same
generation alone, during the first save (which allocates the pinned host buffers that later saves reuse) and
during the next, for each way of getting pinned host memory, each in its own process (side by side, one run):

    python benchmarks/checkpoint_overlap.py --out DIR [--tokenizer TOK]

- `cudaHostAlloc`: torch's pinned allocator as it comes (PYTORCH_CUDA_ALLOC_CONF without pinned settings);
- `cudaHostRegister x8`: the PYTORCH_CUDA_ALLOC_CONF the trainer's processes start with
  (grpo.checkpointing.host_allocator_conf: pinned_use_cuda_host_register, 8 registering threads);
- `pageable`: no pinned buffers (the writer copies into ordinary host memory).

1B shape (random weights, SmolLM2 tokenizer) unless --model; the trainer takes one optimiser step first, so that
the checkpoint holds AdamW's state (float32 weights + two moments: ~15 GB for 1.24B parameters)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from iteration import ROOT, policy_and_parameters  # this folder is on sys.path when the script runs
from trainer_profile import synthetic_rows

sys.path.insert(0, str(ROOT))
from grpo.checkpointing import host_allocator_conf  # noqa: E402

MODES = ("cudaHostAlloc", "cudaHostRegister x8", "pageable")


def child(args) -> dict:
    """One mode's timings (in a process of its own: pinned blocks are cached per process)."""
    import random

    import torch

    from grpo.config import Config
    from grpo.engines.torch_engine import TorchEngine
    from grpo.model import load_model
    from grpo.trainer import Trainer, drain

    model, _ = policy_and_parameters(args.model, args.tokenizer, Path(args.out).resolve())
    optim = Config().replace(train_batch_size=16, gradient_accumulation_passes=2, max_tokens_per_micro_batch=16384,
                             learning_rate=1e-6).optim
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run of the script
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    trainer = Trainer(model, optim, device)
    if args.mode == "pageable":  # the writer's CPU path: synchronous copies into ordinary host memory
        trainer.checkpoints.device = "cpu"
    drain(trainer.train(synthetic_rows(32, trainer.model.config.vocab_size), iteration=0, seed=0, total_steps=10**6))
    engine = TorchEngine(load_model(model, device), trainer.tokenizer, args.prompts * args.attempts, progress=False)
    engine.update_weights(trainer.named_weights(), 1)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 30000) for _ in range(rng.randint(80, 160))] for _ in range(args.prompts)]

    def generate() -> tuple[float, int]:
        sync()
        started, tokens = time.perf_counter(), 0
        for k in range(args.calls):
            out = engine.generate(prompts, args.attempts, 1.0, args.max_new_tokens, seed=k)
            tokens += sum(len(c.token_ids) for group in out for c in group)
        sync()
        return time.perf_counter() - started, tokens

    generate()  # warm-up: graph captures, the allocator
    folder = Path(args.out).resolve() / f"checkpoints-{os.getpid()}" / "checkpoints"
    result = {}
    result["alone_s"], result["tokens"] = generate()
    for label in ("first", "next"):
        started = time.perf_counter()
        trainer.iteration += 1
        trainer.save(folder / f"iter-{trainer.iteration:04d}")
        result[f"{label}_call_s"] = time.perf_counter() - started
        result[f"{label}_generate_s"], _ = generate()
        trainer.wait_saved()
        result[f"{label}_save_s"] = time.perf_counter() - started
    started = time.perf_counter()  # a save with nothing beside it: what the write takes
    trainer.iteration += 1
    trainer.save(folder / f"iter-{trainer.iteration:04d}")
    trainer.wait_saved()
    result["quiet_save_s"] = time.perf_counter() - started
    result["host_alloc"] = {k: v for k, v in torch.cuda.memory.host_memory_stats().items()
                            if k in ("allocated_bytes.all.peak", "host_alloc_time.total")} \
        if device == "cuda" else {}
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the 1B-shaped model and the checkpoints")
    p.add_argument("--tokenizer", default="", help="tokenizer folder ('' = the bundled SmolLM2)")
    p.add_argument("--model", default="", help="a model folder instead of the 1B shape")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="which modes to run (default: all)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per generation call")
    p.add_argument("--attempts", type=int, default=8, help="completions per prompt")
    p.add_argument("--max_new_tokens", type=int, default=512, help="tokens per completion (random weights: all)")
    p.add_argument("--calls", type=int, default=2, help="generation calls per timing")
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in args.modes:
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": host_allocator_conf(conf) if mode == "cudaHostRegister x8"
               else conf}
        cmd = [sys.executable, __file__, "--mode", mode, "--out", args.out, "--tokenizer", args.tokenizer,
               "--model", args.model, "--prompts", str(args.prompts), "--attempts",
               str(args.attempts), "--max_new_tokens", str(args.max_new_tokens), "--calls", str(args.calls)]
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            print(f"{mode}: failed ({done.returncode})")
            continue
        rows.append((mode, json.loads(done.stdout.strip().splitlines()[-1])))
        print(mode, rows[-1][1], flush=True)
    print("\n| host buffers | generation alone s | during first save s | during next save s | first save s | "
          "next save s | save alone s |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows:
        print(f"| {mode} | {r['alone_s']:.2f} | {r['first_generate_s']:.2f} | {r['next_generate_s']:.2f} | "
              f"{r['first_save_s']:.2f} | {r['next_save_s']:.2f} | {r['quiet_save_s']:.2f} |")


if __name__ == "__main__":
    main()
