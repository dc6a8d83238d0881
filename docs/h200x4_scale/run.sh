export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MLFLOW_ALLOW_FILE_STORE=true GRPO_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
cp -r .carry0/tok /tmp/tok
B="python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 256 --eval_limit 64"
X="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
(while sleep 5; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' '; echo; done) > $OUT/util.txt &
t0=$(date +%s)
for spec in "210 ranks-1" "150 ranks-2 --ranks 2" "120 ranks-4 --ranks 4" "110 engines-2-2 --engine_ranks 2 --ranks 2 --max_lag 1"; do
  set -- $spec; lim=$1; name=$2; shift 2
  echo "$name start $(( $(date +%s) - t0 ))" >> $OUT/util.txt
  timeout $lim $B --name $name --extra "$X $*" > $OUT/$name.log 2>&1; echo "$name rc=$?"
  cp /tmp/bench/*.json $OUT/ 2>/dev/null
done
kill %1
python3 -c "
import json,glob
for f in sorted(glob.glob('/tmp/bench/*.json')):
    d=json.load(open(f)); print(f.split('/')[-1], 'wall', round(d['wall_seconds'],1), 's/it', round(d['seconds_per_iteration'],1), 'train tok/s', round(d['train_tokens_per_s']), 'bcast', d.get('broadcast_seconds'), d['per_iteration'])"
