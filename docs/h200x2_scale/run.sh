# 1B shape on 2 x H200: one GPU, a trainer group of 2 ranks, and one engine rank beside one trainer rank at lag 1
source benchmarks/device_env.sh  # (carry .whl and .carry0; run from the project root)
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
BENCH="--out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 128 --eval_limit 16"
EXTRA="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
watch_gpus
chain ranks-1 230
chain ranks-2 170 -- --ranks 2
chain engines-1-1 170 -- --engine_ranks 1 --ranks 1 --max_lag 1
kill %1
summary
# when a run is cut short, its per-iteration stage times are still in its MLflow store
python3 - <<'PY' > $OUT/metrics.txt 2>&1
import glob, mlflow
for store in sorted(glob.glob('/tmp/bench/store-*')):
    client = mlflow.MlflowClient(f"file://{store}/mlruns")
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            keys = [k for k in run.data.metrics if k.startswith("time_")]
            for k in keys:
                print(store.split('/')[-1], run.info.run_name, k, [(m.step, round(m.value, 2)) for m in client.get_metric_history(run.info.run_id, k)])
PY
tail -5 $OUT/metrics.txt
