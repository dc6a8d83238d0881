"""A learning study on one machine with several GPUs: the project's own `sweep` (one worker per GPU, objective
val_accuracy, a wall-clock budget per trial), then seeds of named settings side by side, one main run per GPU.

    python benchmarks/study.py sweep --out DIR --trials 12 --seconds 90 --search learning_rate,... -- FLAGS
    python benchmarks/study.py seeds --out DIR --run_seconds 900 --run best:1 --run reference:1 ... -- FLAGS

FLAGS are main's flags shared by every run (model, prompt, sizes). Settings: `reference` adds nothing (FLAGS are
the reference recipe's), `best` adds the sweep's best parameters (DIR/best.json or --best), `tuned` the README's
tuned pair, and `trl` runs TRL's GRPOTrainer instead (benchmarks/trl_peer.py with --trl_flags: the reference
setting as TRL names it; needs trl and datasets installed), writing trl_log.jsonl and trl_summary.json.
Writes DIR/sweep/ (the MLflow file store, optuna.db, trials.csv, the sweep's figures) and DIR/NAME-sSEED/ (what
export_run.py writes: metrics.csv, run_info.json, learning_curve.png), for benchmarks/seeds.py to compare."""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"reference": [], "lag1": ["--max_lag", "1"], "tuned": ["--attempts", "16", "--learning_rate", "3e-5"]}


def store_env(folder: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": (folder / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
            "PYTHONUNBUFFERED": "1"}


def say(line: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {line}", flush=True)


def sweep(out: Path, args, flags: list[str]) -> None:
    folder = out / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "entrypoints" / "sweep.py"), *flags, *shlex.split(args.sweep_flags),
               "--n_trials", str(args.trials), "--workers", "0", "--max_seconds", str(args.seconds), "--search",
               args.search, "--study_name", "study", "--pruner", args.pruner, "--log_models", "none", "--seed", "1"]
    say(f"sweep: {args.trials} trials of {args.seconds:.0f} s, searching {args.search}")
    subprocess.run(command, cwd=folder, env=store_env(folder), check=True)
    summarise_sweep(folder, out)


def summarise_sweep(folder: Path, out: Path) -> None:
    """best.json, trials.csv (one row per trial: state, parameters, best validation and last test accuracy) and
    the sweep run's figures, out of the file store."""
    os.environ.update(store_env(folder))
    import mlflow

    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    sweep_run = next(r for r in runs if r.data.tags.get("grpo.stage") == "sweep")
    client.download_artifacts(sweep_run.info.run_id, "best.json", str(out))
    for name in ("sweep_curves.png", "optuna"):
        try:
            client.download_artifacts(sweep_run.info.run_id, name, str(folder))
        except Exception as e:  # a figure Optuna could not draw
            say(f"no {name}: {e}")
    trials = sorted((r for r in runs if r.data.tags.get("grpo.stage") == "trial"),
                    key=lambda r: int(r.data.tags["optuna.trial"]))
    searched = json.loads((out / "best.json").read_text())["best_params"].keys()
    with (folder / "trials.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", *searched, "best_val_accuracy", "last_test_accuracy",
                         "last_test_boxed_rate", "iterations"])
        for run in trials:
            metrics = run.data.metrics
            writer.writerow([run.data.tags["optuna.trial"], run.data.tags.get("optuna.state", "?"),
                             *(run.data.params.get(k) for k in searched), metrics.get("best_val_accuracy"),
                             metrics.get("test_accuracy"), metrics.get("test_boxed_rate"),
                             len(client.get_metric_history(run.info.run_id, "train_reward_mean"))])
    say(f"sweep done: {(out / 'best.json').read_text()}")


def setting_flags(name: str, best: Path) -> list[str]:
    if name == "best":
        params = json.loads(best.read_text())["best_params"]
        return [f"--{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in params.items()]
    if name not in SETTINGS:
        sys.exit(f"unknown setting {name!r}: pick best, {', '.join(SETTINGS)}")
    return SETTINGS[name]


def seeds(out: Path, args, flags: list[str]) -> None:
    """One main run per (setting, seed), all at once, each on its own GPU (round robin)."""
    import torch

    gpus = max(1, torch.cuda.device_count())
    running = []
    best = args.best or out / "best.json"
    for k, spec in enumerate(args.run):
        name, seed = spec.split(":")
        folder = out / f"{name}-s{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        if name == "trl":
            command = [sys.executable, str(ROOT / "benchmarks" / "trl_peer.py"), *shlex.split(args.trl_flags),
                       "--seed", seed, "--seconds", str(args.seconds), "--out", str(folder)]
        else:
            command = [sys.executable, str(ROOT / "entrypoints" / "main.py"), *flags, *setting_flags(name, best),
                       "--seed", seed, "--max_seconds", str(args.seconds), "--log_models", "none"]
        env = store_env(folder) | {"CUDA_VISIBLE_DEVICES": str(k % gpus)}
        say(f"{folder.name} on GPU {k % gpus}: {' '.join(command[2:])}")
        log = (folder / "main.log").open("w")
        running.append((folder, subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)))
    for folder, process in running:
        code = process.wait()
        say(f"{folder.name} exited {code}")
        if folder.name.startswith("trl-"):
            continue  # trl_peer.py wrote its own log and summary
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "export_run.py"), str(folder)],
                       env=store_env(folder), check=False)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("sweep", "seeds", "all"), help="sweep, seeds, or the sweep then the seeds")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--trials", type=int, default=12, help="sweep trials (shared by one worker per GPU)")
    p.add_argument("--seconds", type=float, default=90, help="sweep: training budget per trial")
    p.add_argument("--search", default="learning_rate,temperature,attempts", help="sweep: fields searched")
    p.add_argument("--pruner", default="median", help="sweep: Optuna pruner")
    p.add_argument("--sweep_flags", default="", help="sweep: main flags for the trials only, e.g. cheaper evaluations")
    p.add_argument("--run_seconds", type=float, default=900, help="seeds: training budget per run")
    p.add_argument("--run", action="append", default=[], help="seeds: SETTING:SEED, once per run")
    p.add_argument("--best", type=Path, help="seeds: the sweep's best.json for the `best` setting (default "
                   "DIR/best.json, as the sweep phase writes it; docs/h100x4_study/best.json adds seeds to that study)")
    p.add_argument("--trl_flags", default="--shots 0 --system_prompt '' --problems_per_step 64 --attempts 8 "
                   "--learning_rate 1e-5 --temperature 1.0 --max_new_tokens 384 --micro_batch 64 "
                   "--generation_batch_size 1024", help="seeds: trl_peer.py flags of the `trl` setting")
    args = p.parse_args(ours)
    if args.best and not args.best.is_file():
        p.error(f"--best {args.best}: no such file; pass a sweep's best.json (docs/h100x4_study/best.json)")
    out = Path(args.out).resolve()
    if args.phase in ("sweep", "all"):
        sweep(out, args, flags)
    if args.phase in ("seeds", "all"):
        args.seconds = args.run_seconds
        seeds(out, args, flags)
    say("study done")


if __name__ == "__main__":
    main()
