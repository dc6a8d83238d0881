# Sourced on a device machine by benchmarks/gpu_session.sh and the docs/*/run.sh scripts: the environment, the
# carried wheels and files put in place (`setup`), and helpers that keep each run's log and results in $OUT as
# they come (a call that runs out of time still brings back what finished).
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRPO_SMOLLM2_GGUF=/tmp/m/model.gguf GRPO_CACHE=/tmp/cache
export MLFLOW_ALLOW_FILE_STORE=true TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/m "$OUT"
T0=$(date +%s)
install() {  # the wheel folders given that the call carries, into /tmp/site
  for w in "$@"; do
    [ -d "$w" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$w"/*.whl 2>&1 | grep -v "WARNING: Target directory"
    [ "$w" = .whl ] && touch /tmp/site/.installed
  done
}
setup() {  # what the call carries; wheels once per machine (reinstalling under running processes breaks them)
  [ -f /tmp/site/.installed ] || install .whl
  [ -d .carry0 ] && { rm -rf /tmp/tok; cp -r .carry0/tok /tmp/tok; }
  [ -d .baseline ] && { rm -rf /tmp/baseline; cp -r .baseline /tmp/baseline; ln -sfn "$PWD/data" /tmp/baseline/data; }
  cp .carry1/* /tmp/m/ 2>/dev/null
  return 0
}
timed() {  # NAME LIMIT COMMAND...: COMMAND under `timeout LIMIT`, its output in $OUT/NAME.log; prints its exit code
  local name=$1 lim=$2; shift 2
  [ -f "$OUT/util.txt" ] && echo "$name start $(( $(date +%s) - T0 ))" >> "$OUT/util.txt"
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - T0 )) s"
}
watch_gpus() {  # each GPU's use and memory every 5 s into $OUT/util.txt, in the background (kill %1 to stop)
  (while sleep 5; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' '
     echo; done) > "$OUT/util.txt" &
}
chain() {  # NAME LIMIT [ITERATION.PY FLAGS] [-- MAIN FLAGS]: one benchmarks/iteration.py run with $BENCH (its common
           # flags) and --extra "$EXTRA MAIN FLAGS"; the results JSON of every run so far into $OUT
  local name=$1 lim=$2 own=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != -- ]; do own+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  timed "$name" "$lim" python3 benchmarks/iteration.py $BENCH --name "$name" "${own[@]}" --extra "$EXTRA $*"
  cp /tmp/bench/*.json "$OUT/" 2>/dev/null
  return 0
}
summary() {  # a line per iteration.py result in /tmp/bench
  python3 - <<'PY'
import glob, json
for f in sorted(glob.glob('/tmp/bench/*.json')):
    d = json.load(open(f))
    print(f.split('/')[-1], 'wall', round(d['wall_seconds'], 1), 's/it', round(d['seconds_per_iteration'], 2),
          'train tok/s', round(d['train_tokens_per_s']), 'rollout tok/s', round(d['rollout_tokens_per_s']),
          'broadcast s', d.get('broadcast_seconds'), d['per_iteration'])
PY
}
