"""Trials per hour of the real `sweep` entry point with one worker and with several (one per GPU), side by side.

    python benchmarks/sweep_scale.py --out DIR --workers 1 4 --trials 4

Each trial is a short main run (a few iterations of a small workload) on a SmolLM2-135M-shaped model with random
weights (nothing to download), or on --model. Prints a table: workers, trials, wall-clock seconds, trials per
hour and the speed-up over the first row; writes DIR/sweep_scale.json.

With --warm, a one-trial sweep first fills a compile cache that each timed sweep then starts from (a copy of its
own), so the table shows trials per hour once kernels are compiled, as in a long sweep; without it each sweep
compiles from nothing, as a user's first sweep on a fresh machine does (each worker compiles at its first trial).
--search temperature,learning_rate keeps every trial the same size (attempts fixed), so the speed-up measures the
workers rather than which worker drew the long trials."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(folder: Path, tokenizer: str) -> str:
    """SmolLM2-135M's shape (30 layers, 576 wide, 9/3 heads) with random bf16 weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tokenizer)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def run_sweep(model: str, out: Path, workers: int, args, trials: int, name: str = "", cache: Path | None = None
              ) -> tuple[float, Path]:
    """One sweep in a folder of its own under `out`: (wall-clock seconds, the folder)."""
    folder = out / (name or f"workers-{workers}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if cache is not None:  # a copy of the warm-up's compiled kernels
        shutil.copytree(cache, folder / "compiled")
    flags = ["--model", model, "--backend", "hf", "--shots", "0", "--system_prompt", "", "--problems",
             str(args.problems), "--attempts", "4", "--max_new_tokens", str(args.max_new_tokens), "--eval_limit",
             "16", "--val_limit", "16", "--max_iterations", str(args.iterations), "--trace_samples", "0",
             "--system_metrics", "false", "--n_trials", str(trials), "--workers", str(workers),
             "--study_name", f"scale-{workers}", "--pruner", "none", "--drop_flat_groups", "false",
             *(["--search", args.search] if args.search else [])]
    uri = (folder / "mlruns").as_uri() if args.file_store else f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONUNBUFFERED": "1",
           # compiled kernels cached per sweep: a later sweep would otherwise start warm from an earlier one's
           "TORCHINDUCTOR_CACHE_DIR": str(folder / "compiled" / "inductor"),
           "TRITON_CACHE_DIR": str(folder / "compiled" / "triton")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "sweep.py"), *flags], cwd=folder, env=env)
    if done.returncode:
        sys.exit(f"sweep with {workers} workers failed ({done.returncode}; its output is above)")
    return time.perf_counter() - started, folder


def trial_times(folder: Path, workers: int) -> dict:
    """From the sweep's Optuna storage: the median trial's seconds, and the span from the first trial's start to
    the last one's end (the sweep's wall-clock less its process start and its summary at the end)."""
    import optuna

    study = optuna.load_study(study_name=f"scale-{workers}", storage=f"sqlite:///{folder / 'optuna.db'}")
    done = [t for t in study.trials if t.datetime_complete is not None]
    seconds = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"median_trial_seconds": seconds[len(seconds) // 2], "trials_span_seconds": span}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the model, the stores and the JSON result")
    p.add_argument("--model", default="", help="a model folder ('' = build the random SmolLM2-shaped model)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder ('' = the bundled SmolLM2's)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="worker counts to run, in turn")
    p.add_argument("--trials", type=int, default=4, help="trials per sweep")
    p.add_argument("--problems", type=int, default=16, help="problems per iteration of a trial")
    p.add_argument("--max_new_tokens", type=int, default=128, help="token limit per completion")
    p.add_argument("--iterations", type=int, default=2, help="iterations per trial")
    p.add_argument("--search", default="", help="searched fields ('' = the sweep's default: temperature, attempts, "
                   "learning_rate); temperature,learning_rate makes the trials the same size")
    p.add_argument("--warm", action="store_true", help="time sweeps that start from a compile cache filled by a "
                   "one-trial sweep first (steady state), not from nothing")
    p.add_argument("--file_store", action="store_true", help="MLflow file stores (where only mlflow-skinny is)")
    p.add_argument("--json", default="", help="where the rows go, after each sweep (default DIR/sweep_scale.json)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from grpo.model import resolve

    model = args.model or build_model(out / "smollm2-shape", args.tokenizer or resolve("smollm2-135m"))
    cache = None
    if args.warm:
        seconds, folder = run_sweep(model, out, 1, args, 1, name="warm-up")
        cache = folder / "compiled"
        print(f"| warm-up: 1 trial in {seconds:.0f} s (its compiled kernels start each sweep below)", flush=True)
    rows = []
    for workers in args.workers:
        seconds, folder = run_sweep(model, out, workers, args, args.trials, cache=cache)
        times = trial_times(folder, workers)
        rows.append({"workers": workers, "trials": args.trials, "seconds": seconds,
                     "trials_per_hour": 3600 * args.trials / seconds, **times,
                     "trials_per_hour_in_span": 3600 * args.trials / times["trials_span_seconds"]})
        Path(args.json or out / "sweep_scale.json").write_text(json.dumps(rows, indent=1))
        print(f"| {workers} worker(s): {args.trials} trials in {seconds:.0f} s", flush=True)
    print("| workers | trials | sweep seconds | trials / hour | vs first | first trial start to last end, s | "
          "trials / hour in it | vs first | median trial s |\n|---|---|---|---|---|---|---|---|---|")
    first = rows[0]
    for row in rows:
        print(f"| {row['workers']} | {row['trials']} | {row['seconds']:.0f} | {row['trials_per_hour']:.0f} | "
              f"{row['trials_per_hour'] / first['trials_per_hour']:.2f}x | {row['trials_span_seconds']:.0f} | "
              f"{row['trials_per_hour_in_span']:.0f} | "
              f"{row['trials_per_hour_in_span'] / first['trials_per_hour_in_span']:.2f}x | "
              f"{row['median_trial_seconds']:.0f} |")


if __name__ == "__main__":
    main()
