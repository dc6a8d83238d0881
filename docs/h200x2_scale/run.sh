# 1B shape on 2 x H200: one GPU, a trainer group of 2 ranks, and one engine rank beside one trainer rank at lag 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MLFLOW_ALLOW_FILE_STORE=true GRPO_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
cp -r .carry0/tok /tmp/tok
B="python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 128 --eval_limit 16"
X="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
(while sleep 5; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' '; echo; done) > $OUT/util.txt &
t0=$(date +%s)
for spec in "230 ranks-1" "170 ranks-2 --ranks 2" "170 engines-1-1 --engine_ranks 1 --ranks 1 --max_lag 1"; do
  set -- $spec; lim=$1; name=$2; shift 2
  echo "$name start $(( $(date +%s) - t0 ))" >> $OUT/util.txt
  timeout $lim $B --name $name --extra "$X $*" > $OUT/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
  cp /tmp/bench/*.json $OUT/ 2>/dev/null
done
kill %1
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob('/tmp/bench/*.json')):
    d = json.load(open(f))
    print(f.split('/')[-1], 'wall', round(d['wall_seconds'], 1), 's/it', round(d['seconds_per_iteration'], 1),
          'train tok/s', round(d['train_tokens_per_s']), 'rollout tok/s', round(d['rollout_tokens_per_s']), d['per_iteration'])
PY
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
