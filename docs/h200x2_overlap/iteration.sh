# The 1B-shaped iteration on 2 x H200 (as docs/h200x2_scale/run.sh): one GPU, then a trainer group of 2 ranks on the
# baseline checkout (.baseline: gradients summed after the step's backward) and on this one (during it).
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MLFLOW_ALLOW_FILE_STORE=true GRPO_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
cp -r .carry0/tok /tmp/tok
[ -e .baseline/data ] || ln -s "$PWD/data" .baseline/data  # the bundled GSM8k (.baseline carries code only)
B="python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 128 --eval_limit 16"
X="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
t0=$(date +%s)
for spec in "200 ranks-1 -" "160 ranks-2-before .baseline --ranks 2" "160 ranks-2 - --ranks 2"; do
  set -- $spec; lim=$1; name=$2; code=$3; shift 3
  [ "$code" = - ] && code="" || code="--code $code"
  timeout $lim $B --name $name $code --extra "$X $*" > $OUT/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
  cp /tmp/bench/*.json $OUT/ 2>/dev/null
done
python3 - <<'PY'
import json, glob
for f in sorted(glob.glob('/tmp/bench/*.json')):
    d = json.load(open(f))
    print(f.split('/')[-1], 'wall', round(d['wall_seconds'], 1), 's/it', round(d['seconds_per_iteration'], 2),
          'train tok/s', round(d['train_tokens_per_s']), 'rollout tok/s', round(d['rollout_tokens_per_s']), d['per_iteration'])
PY
