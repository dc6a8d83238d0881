"""Trials per hour of the real `sweep` entry point with one worker and with several (one per GPU), side by side.

    python benchmarks/sweep_scale.py --out DIR --workers 1 4 --trials 4

Each trial is a short main run (a few iterations of a small workload) on a SmolLM2-135M-shaped model with random
weights (nothing to download), or on --model. Prints a table: workers, trials, wall-clock seconds, trials per
hour and the speed-up over the first row; writes DIR/sweep_scale.json."""
from __future__ import annotations

import argparse
import json
import os
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


def run_sweep(model: str, out: Path, workers: int, args) -> float:
    folder = out / f"workers-{workers}"
    folder.mkdir(parents=True, exist_ok=True)
    flags = ["--model", model, "--backend", "hf", "--shots", "0", "--system_prompt", "", "--problems",
             str(args.problems), "--attempts", "4", "--max_new_tokens", str(args.max_new_tokens), "--eval_limit",
             "16", "--val_limit", "16", "--max_iterations", str(args.iterations), "--trace_samples", "0",
             "--system_metrics", "false", "--n_trials", str(args.trials), "--workers", str(workers),
             "--study_name", f"scale-{workers}", "--pruner", "none", "--drop_flat_groups", "false"]
    uri = (folder / "mlruns").as_uri() if args.file_store else f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONUNBUFFERED": "1",
           # compiled kernels cached per sweep: a later sweep would otherwise start warm from an earlier one's
           "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "sweep.py"), *flags], cwd=folder, env=env)
    if done.returncode:
        sys.exit(f"sweep with {workers} workers failed ({done.returncode}; its output is above)")
    return time.perf_counter() - started


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
    p.add_argument("--file_store", action="store_true", help="MLflow file stores (where only mlflow-skinny is)")
    p.add_argument("--json", default="", help="where the rows go, after each sweep (default DIR/sweep_scale.json)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from grpo.model import resolve

    model = args.model or build_model(out / "smollm2-shape", args.tokenizer or resolve("smollm2-135m"))
    rows = []
    for workers in args.workers:
        seconds = run_sweep(model, out, workers, args)
        rows.append({"workers": workers, "trials": args.trials, "seconds": seconds,
                     "trials_per_hour": 3600 * args.trials / seconds})
        Path(args.json or out / "sweep_scale.json").write_text(json.dumps(rows, indent=1))
        print(f"| {workers} worker(s): {args.trials} trials in {seconds:.0f} s", flush=True)
    print("| workers | trials | seconds | trials / hour | vs first |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['trials']} | {row['seconds']:.0f} | {row['trials_per_hour']:.0f} | "
              f"{row['trials_per_hour'] / rows[0]['trials_per_hour']:.2f}x |")


if __name__ == "__main__":
    main()
