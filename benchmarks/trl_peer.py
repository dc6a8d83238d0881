"""The peer: TRL's GRPOTrainer on the same model, data, prompt, reward, attempts, temperature, learning rate and
completion length as our main run, for a wall-clock budget; then the same greedy evaluation as ours.

    python benchmarks/trl_peer.py --seconds 395 --out DIR [--shots 0 --system_prompt ''] ...

Writes DIR/trl_log.jsonl (one line per optimiser step: seconds since train start, train reward, boxed rate,
completion tokens) and DIR/trl_summary.json (test accuracy / boxed rate of the final policy). Needs `pip install
trl` (not a dependency of the project)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="as our `model` parameter")
    p.add_argument("--system_prompt", default="", help="as ours ('' = the reference recipe's prompt)")
    p.add_argument("--shots", type=int, default=0, help="as ours (0 = the reference recipe's prompt)")
    p.add_argument("--problems_per_step", type=int, default=16, help="problems per optimiser step")
    p.add_argument("--attempts", type=int, default=8, help="completions per problem (num_generations)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--learning_rate", type=float, default=1e-5, help="AdamW learning rate (constant)")
    p.add_argument("--max_new_tokens", type=int, default=384, help="completion token limit")
    p.add_argument("--micro_batch", type=int, default=128, help="completions per forward/backward pass")
    p.add_argument("--seconds", type=float, default=395, help="wall-clock training budget")
    p.add_argument("--max_steps", type=int, default=10_000, help="optimiser step cap")
    p.add_argument("--eval_limit", type=int, default=0, help="test problems for the final greedy eval (0 = all)")
    p.add_argument("--generation_batch_size", type=int, default=2048, help="our sampler's batch for the eval")
    p.add_argument("--seed", type=int, default=0, help="TRL's seed (sampling, data order)")
    p.add_argument("--out", default="trl_out", help="output folder")
    p.add_argument("--detect_anomaly", action="store_true",
                   help="torch autograd anomaly mode: the first backward op that makes a NaN raises (slow; diagnosis)")
    return p.parse_args()


def main() -> None:
    args = parse()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.config import Engine
    from grpo.model import load_tokenizer, pick_device, resolve
    from grpo.tasks.gsm8k import PromptBuilder, load_splits, score

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device("auto")
    tokenizer = load_tokenizer(args.model)
    splits = load_splits("bundled")
    builder = PromptBuilder(tokenizer, args.system_prompt, args.shots, splits.exemplars)
    pool = splits.pool  # the problems our rollouts sample (validation and exemplars held out)
    # the exact prompt text ours feeds the sampler (chat template applied), so TRL adds no template of its own
    dataset = Dataset.from_list([{"prompt": builder.text(p), "answer": p.answer} for p in pool])
    outcomes: list[list[str]] = []

    def gsm8k_reward(completions, answer, completion_ids, **_) -> list[float]:
        rewards, kinds = [], []
        for text, gold, ids in zip(completions, answer, completion_ids):
            truncated = len(ids) >= args.max_new_tokens and ids[-1] != tokenizer.eos_token_id
            reward, kind = score(text, gold, truncated)
            rewards.append(reward)
            kinds.append(kind)
        outcomes.append(kinds)
        return rewards

    class Budget(TrainerCallback):
        """Log each optimiser step with its wall-clock and stop at the budget."""

        diverged_at = None

        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()
            self.log = (out / "trl_log.jsonl").open("w")

        def on_log(self, _args, state, control, logs=None, **__):
            if "reward" not in (logs or {}):  # the end-of-training summary
                return
            kinds = [k for batch in outcomes for k in batch]
            outcomes.clear()
            row = {"step": state.global_step, "seconds": time.perf_counter() - self.start,
                   "reward_mean": logs.get("reward"), "completion_tokens_mean": logs.get("completions/mean_length"),
                   "boxed_rate": sum(k != "unparseable" for k in kinds) / max(len(kinds), 1),
                   "correct_rate": sum(k == "correct" for k in kinds) / max(len(kinds), 1), "samples": len(kinds),
                   # a non-finite gradient norm would say the weights, not the sampler, went bad
                   "grad_norm": logs.get("grad_norm")}
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
            print(f"step {row['step']:4d} {row['seconds']:6.1f}s reward {row['reward_mean']:+.3f} "
                  f"boxed {row['boxed_rate']:.1%} correct {row['correct_rate']:.1%}", flush=True)
            if row["seconds"] >= args.seconds:
                control.should_training_stop = True
            if row["grad_norm"] is not None and not math.isfinite(float(row["grad_norm"])):
                # the optimiser step just written NaN into the weights: every later step is wasted GPU time
                self.diverged_at = state.global_step
                print(f"non-finite gradient norm at step {state.global_step}: stopping", flush=True)
                control.should_training_stop = True

    per_step = args.problems_per_step * args.attempts
    config = GRPOConfig(
        output_dir=str(out / "trainer"), learning_rate=args.learning_rate, lr_scheduler_type="constant",
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step // args.micro_batch,
        num_generations=args.attempts, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        beta=0.0, loss_type="grpo", bf16=device == "cuda", use_cpu=device == "cpu", gradient_checkpointing=False,
        logging_steps=1, max_steps=args.max_steps, save_strategy="no", report_to="none", seed=args.seed,
        model_init_kwargs={"dtype": torch.float32},
        # Without this, all three 900 s seeds on 4 x H200 (2026-11-28) died after 2, 18 and 31 steps in HF generate's
        # multinomial ("probability tensor contains either inf, nan or element < 0"); it replaces such logits
        # (the documented transformers option) so a rare bad row costs one sample, not the run
        generation_kwargs={"remove_invalid_values": True})
    trainer = GRPOTrainer(model=resolve(args.model), reward_funcs=gsm8k_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[budget := Budget()])
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    # cuDNN's attention backward returned NaN on TRL's left-padded batches (seed 2, step 1, H200, anomaly mode:
    # ScaledDotProductCudnnAttentionBackward0): PyTorch's flash / memory-efficient kernels instead
    torch.backends.cuda.enable_cudnn_sdp(False)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()

    from grpo.engines import make_engine
    from grpo.stages import evaluate

    engine = make_engine(Engine(backend="hf", generation_batch_size=args.generation_batch_size), args.model, device,
                         checkpoint=str(out / "final"))
    test = splits.test[:args.eval_limit] if args.eval_limit else splits.test
    _, metrics = evaluate(engine, builder, test, args.max_new_tokens)
    summary = {"train_seconds": train_seconds, "peak_gpu_gib": peak, "diverged_at_step": budget.diverged_at,
               "test": metrics,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args)}
    (out / "trl_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
