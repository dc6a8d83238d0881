"""Seconds per GRPO iteration of the real `main` chain, stage by stage, on a Llama-3.2-1B-shaped model with
random weights and the SmolLM2 tokenizer (nothing to download), or any model.

    python benchmarks/iteration.py --out DIR                        # this checkout, 64 x 8, 512 tokens, 1B shape
    python benchmarks/iteration.py --out DIR --code OLD_CHECKOUT    # the same workload on another checkout

Random weights never box, so every group is flat: the chain runs with drop_flat_groups=false and trains on every
row (the same forward/backward work as rows with signal). Prints a table per run and writes DIR/<name>.json:
per-iteration stage times, rollout tokens/s, trainer tokens/s and model FLOPs utilisation (6 x parameters x
trained tokens / optimisation seconds / bf16 peak), weight hand-off, peak GPU memory per process, and the
projection to the reference recipe's iteration (750 problems x 8)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16 = 790e12  # bf16 dense matmul rate measured on this workplace's H100/H200 (8192^3 products)
REFERENCE_SAMPLES = 750 * 8


def build_model(folder: Path, tokenizer: str) -> int:
    """A Llama-3.2-1B-shaped model (16 layers, 2048 wide, 32/8 heads, 8192 MLP) with random bf16 weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                         dtype=torch.bfloat16)
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def policy_and_parameters(model: str, tokenizer: str, out: Path) -> tuple[str, int]:
    """(model folder or id, parameter count): `model` as given, or '' = the 1B shape built under `out`."""
    from grpo.model import resolve

    if not model:
        folder = out / "llama-1b-shape"
        return str(folder), build_model(folder, tokenizer or resolve("smollm2-135m"))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        config = AutoConfig.from_pretrained(resolve(model))  # the bundled id is a folder in the cache
        return model, sum(x.numel() for x in AutoModelForCausalLM.from_config(config).parameters())


def run_chain(code: Path, model: str, store: Path, args, extra: list[str]) -> float:
    """The main entry point of a checkout as a subprocess; returns its wall-clock seconds."""
    flags = ["--model", model, "--backend", "hf", "--shots", "0", "--system_prompt", "", "--problems",
             str(args.problems), "--attempts", str(args.attempts), "--temperature", "1.0", "--max_new_tokens",
             str(args.max_new_tokens), "--generation_batch_size", str(args.problems * args.attempts),
             "--drop_flat_groups", "false", "--train_batch_size", str(args.train_batch_size),
             "--gradient_accumulation_passes", str(32 // args.train_batch_size),
             "--eval_limit", str(args.eval_limit), "--test_every_n_iterations", "0", "--trace_samples", "0",
             "--max_iterations", str(args.iterations), "--learning_rate", "1e-6", *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
           "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(code / "entrypoints" / "main.py"), *flags], env=env, cwd=store.parent,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{code}: main failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def read_run(store: Path) -> tuple[dict, dict]:
    """(main-run metrics: name -> step -> (value, timestamp ms), finetune stage metrics by iteration)."""
    import mlflow

    client = mlflow.MlflowClient(store.as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000,
                              order_by=["attributes.start_time DESC"])
    main = next(r for r in runs if r.data.tags.get("grpo.stage") == "main")  # the newest
    series = {key: {m.step: (m.value, m.timestamp) for m in client.get_metric_history(main.info.run_id, key)}
              for key in main.data.metrics}
    finetunes = {int(r.info.run_name.rsplit("-", 1)[1]): r.data.metrics for r in runs
                 if r.data.tags.get("mlflow.parentRunId") == main.info.run_id
                 and r.info.run_name.startswith("finetune")}
    return series, finetunes


def summarise(name: str, series: dict, finetunes: dict, params: int, wall: float, args) -> dict:
    """Medians over the iterations after the first (which pays process starts, graph captures, warm-up). With
    max_lag 1 the finetune of iteration i is collected after the rollout and annotate of i+1 (its time is the wait
    left after them), and the last one drains alone: that drain is left out, so a cycle is rollout + annotate +
    the wait, as in a long run."""
    steps = sorted(series["time_finetune"])
    extra = args.extra.split()
    lagged = "--max_lag" in extra and extra[extra.index("--max_lag") + 1] != "0"
    steady = steps[:-1] if lagged and len(steps) > 2 else steps
    measured = steady[1:] or steady
    med = lambda key: statistics.median(series[key][i][0] for i in measured if i in series.get(key, {}))  # noqa
    ends = [series["time_finetune"][i][1] for i in steady]
    per_iteration = statistics.median(b - a for a, b in zip(ends, ends[1:])) / 1000 if len(ends) > 1 else float("nan")
    stages = {s: med(f"time_{s}") for s in ("rollout", "annotate", "finetune")}
    train_tps = statistics.median(finetunes[i]["train_tokens_per_s"] for i in measured)
    gpus = int(extra[extra.index("--ranks") + 1]) if "--ranks" in extra else 1
    summary = {
        "name": name, "seconds_per_iteration": per_iteration, **{f"{s}_seconds": v for s, v in stages.items()},
        "rollout_tokens_per_s": med("rollout_tokens_per_s"), "train_tokens_per_s": train_tps,
        "mfu": 6 * params * train_tps / PEAK_BF16 / gpus, "gpus": gpus,
        "rollout_engine_seconds": statistics.median(
            series["rollout_tokens"][i][0] / series["rollout_tokens_per_s"][i][0] for i in measured),
        "per_iteration": {s: [round(series[f"time_{s}"][i][0], 2) for i in steps]
                          for s in ("rollout", "annotate", "finetune")},
        "optimisation_seconds": statistics.median(finetunes[i].get("seconds", float("nan")) for i in measured),
        "handoff_seconds": statistics.median(finetunes[i].get("handoff_seconds", float("nan")) for i in measured),
        "broadcast_seconds": statistics.median(finetunes[i].get("broadcast_seconds", float("nan")) for i in measured),
        "rollout_peak_gpu_gib": max(v for v, _ in series.get("rollout_peak_gpu_gib", {0: (float("nan"), 0)}).values()),
        "trainer_peak_gpu_gib": max(v for v, _ in series.get("trainer_peak_gpu_gib", {0: (float("nan"), 0)}).values()),
        "outside_stages_fraction": 1 - sum(stages.values()) / per_iteration,
        "wall_seconds": wall, "iterations": len(steps), "lag_drain_left_out": lagged}
    scale = REFERENCE_SAMPLES / (args.problems * args.attempts)
    summary["projected_reference_iteration_seconds"] = scale * sum(stages.values())
    return summary


def table(rows: list[dict]) -> str:
    keys = [("seconds_per_iteration", "s / iteration", "{:.1f}"), ("rollout_seconds", "rollout s", "{:.1f}"),
            ("annotate_seconds", "annotate s", "{:.1f}"), ("finetune_seconds", "finetune s", "{:.1f}"),
            ("rollout_tokens_per_s", "rollout tok/s", "{:,.0f}"), ("train_tokens_per_s", "trainer tok/s", "{:,.0f}"),
            ("rollout_engine_seconds", "of which generating s", "{:.1f}"),
            ("mfu", "trainer MFU per GPU", "{:.1%}"), ("handoff_seconds", "weights hand-off s", "{:.2f}"),
            ("broadcast_seconds", "of which broadcast s (engine ranks)", "{:.2f}"),
            ("rollout_peak_gpu_gib", "engine peak GiB", "{:.1f}"), ("trainer_peak_gpu_gib", "trainer peak GiB",
                                                                       "{:.1f}"),
            ("outside_stages_fraction", "outside stages", "{:.1%}"),
            ("projected_reference_iteration_seconds", "projected 750x8 s", "{:.0f}")]
    first = rows[0]["seconds_per_iteration"]
    lines = ["| | " + " | ".join(r["name"] for r in rows) + " |", "|---" * (len(rows) + 1) + "|",
             "| speed-up (s / iteration) | " + " | ".join(f"{first / r['seconds_per_iteration']:.2f}x" for r in rows)
             + " |"]
    for key, label, fmt in keys:
        cells = [fmt.format(r[key]) if isinstance(r.get(key), (int, float)) and r[key] == r[key] else "-"
                 for r in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the model, the stores and the JSON results")
    p.add_argument("--model", default="", help="a model folder or id ('' = build the random 1B-shaped model)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder for the 1B shape ('' = the bundled SmolLM2)")
    p.add_argument("--code", default="", help="another checkout to run the same workload on (its entrypoints/main.py)")
    p.add_argument("--name", default="", help="label of this run in the table")
    p.add_argument("--problems", type=int, default=64, help="problems per iteration")
    p.add_argument("--attempts", type=int, default=8, help="attempts per problem")
    p.add_argument("--max_new_tokens", type=int, default=512, help="token limit per completion")
    p.add_argument("--iterations", type=int, default=3, help="iterations (the first is warm-up)")
    p.add_argument("--train_batch_size", type=int, default=16, help="sequences per micro-batch (32 per step)")
    p.add_argument("--eval_limit", type=int, default=64, help="test problems at the start and end evaluations")
    p.add_argument("--extra", default="", help="more flags for main, e.g. '--max_tokens_per_micro_batch 16384'")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the stores are file stores, read back here
    model, params = policy_and_parameters(args.model, args.tokenizer, out)
    code = Path(args.code).resolve() if args.code else ROOT
    name = args.name or code.name
    store = out / f"store-{name}" / "mlruns"
    store.parent.mkdir(parents=True, exist_ok=True)
    wall = run_chain(code, model, store, args, args.extra.split())
    summary = summarise(name, *read_run(store), params, wall, args)
    summary.update(parameters=params, workload=f"{args.problems}x{args.attempts}, {args.max_new_tokens} tokens")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    print(table(rows))


if __name__ == "__main__":
    main()
