#!/usr/bin/env bash
# GPU runs for the README, on a bare device machine (torch + transformers there, nothing from PyPI). Calls in a
# row on one warm machine, each carrying what it needs (64 MiB a call); see README "On a GPU" for the numbers.
# Prepare here (once per checkout): `bash benchmarks/prepare_device.sh [BASELINE_COMMIT]` builds the wheels the
# machine lacks in .whl/ (and TRL's in .whl_trl/), the SmolLM2 tokenizer in .carry0/tok, the checkout to compare
# against in .baseline/ (its grpo/ and entrypoints/), and the bundled GGUF in parts in .carry1/ and .carry2/.
#   checks     [.whl .carry0 .baseline .carry1]: installs the wheels, runs benchmarks/gpu_checks.py and a small chain
#   sampler ARGS [.carry0 .baseline] after prep: the 1B-shaped chain (2 iterations) on .baseline's code, then this
#              checkout's, same flags (rollout tokens/s before and after a sampler change)
#   bench ARGS [.whl .carry0 .baseline .carry1]: installs, then the 1B-shaped iteration benchmark, the old checkout
#              then this one (benchmarks/iteration.py)
#   scale RANKS... [.whl .carry0]: installs, a small trainer-group smoke run (SMOKE=0: none), then the 1B-shaped
#              iteration benchmark (ITERATIONS, default 3; PROBLEMS x 8 rows, default 64: 750 is the reference
#              recipe's batch, where each rank's share is large enough to scale; MICRO tokens per micro-batch,
#              default 8192, as the README table) with each number of ranks (1 = one trainer process beside
#              main's engine on GPU 0)
#   engines E:T... [.whl .carry0]: installs, then the 1B-shaped iteration benchmark (ITERATIONS, PROBLEMS, MICRO as
#              scale) with E engine ranks beside T trainer ranks at lag 1, for each E:T given (E + T GPUs each)
#   sweeps ARGS [.whl .carry0]: installs, then trials per hour of the sweep with 1 and N workers
#              (benchmarks/sweep_scale.py ARGS)
#   prep [.whl .carry0 (.whl_trl: trl, datasets, dill, multiprocess for the `trl` setting)], then [.carry1], then
#              [.carry2]: installs / copies what the call carries; with both GGUF
#              parts there, joins the model (three calls in a row: wheels and model together pass 64 MiB)
#   study ARGS [nothing]: starts benchmarks/study.py ARGS --out /tmp/study in its own session from a copy of the
#              code, so that it outlives the call (a machine stays while calls follow each other)
#   wait SECONDS: waits for the study (at most SECONDS), prints its log's end and the GPUs' use, and brings back
#              what it has so far as collect does (a machine can go back between calls: then the last copy remains)
#   collect: the study's results as $OUT/study.tgz (stores, exports, figures; no checkpoints)
#   split ARGS [.carry0 when alone]: three 1B-shaped chains at once on a 4-GPU machine, so that they are side by side:
#              GPU 0 shared at lag 0, GPU 3 shared at lag 1, GPUs 1+2 with the trainer on its own card at lag 1
#              (ITERATIONS, default 5)
#   profile ARGS [.whl .carry0 (.baseline)]: the trainer alone on the 1B shape, micro-batch shapes side by side and
#              its GPU time by kernel kind (benchmarks/trainer_profile.py ARGS); .baseline's trainer first if carried
#   decoder ARGS [.whl .carry0 (.baseline)]: the torch sampler alone on the 1B shape, a 64 x 8 call's tokens/s and
#              its GPU time by kernel and by op (benchmarks/sampler_profile.py ARGS); .baseline's first if carried
#   learn SECONDS ARGS [.carry2]: joins and dequantises SmolLM2 (GGUF split 45 MB + 53 MB so that each call fits),
#              runs main with ARGS for at most SECONDS, exports the run (one call per seed, --seed N; then
#              benchmarks/seeds.py here puts the seeds of each setting side by side)
set -u
phase=$1; shift
source benchmarks/device_env.sh  # the environment, install, setup
collect() {
  cp /tmp/study/log /tmp/study/study.log
  tar czf "$OUT/study.tgz" -C /tmp --exclude=grpo_runs --exclude=mlartifacts --exclude='*.safetensors' --exclude='*.pt' study
}
case $phase in
checks)
  setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 benchmarks/gpu_checks.py /tmp/tok 2>&1 | grep -v Warning
  python3 benchmarks/iteration.py --out /tmp/bench-smoke --tokenizer /tmp/tok --problems 8 --max_new_tokens 64 \
    --iterations 2 --name smoke --extra "--max_tokens_per_micro_batch 16384 --checkpoint_every 1 --val_limit 8" ;;
sampler)  # the rollout before/after a sampler change: the same 1B-shaped chain on .baseline's code, then this one
  setup
  for name in before after; do
    code=""; [ $name = before ] && code=/tmp/baseline
    python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --code "$code" --name $name \
      --iterations 2 --extra "--max_tokens_per_micro_batch 8192" "$@"
  done
  cp /tmp/bench/*.json "$OUT/" ;;
bench)
  setup
  python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --code /tmp/baseline --name before \
    --iterations 2 --train_batch_size 8 "$@"
  python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --name after \
    --extra "--max_tokens_per_micro_batch 8192 --checkpoint_every 2" "$@"
  cp /tmp/bench/*.json "$OUT/" ;;
scale)
  setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ "${SMOKE:-1}" = 1 ]; then
    python3 benchmarks/iteration.py --out /tmp/smoke --tokenizer /tmp/tok --problems 8 --max_new_tokens 64 \
      --iterations 2 --eval_limit 8 --name smoke --extra "--ranks 2 --checkpoint_every 1" || exit 1
    mkdir -p /tmp/bench && ln -sfn /tmp/smoke/llama-1b-shape /tmp/bench/llama-1b-shape
  fi
  for ranks in "$@"; do
    python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --name "ranks-$ranks" \
      --iterations "${ITERATIONS:-3}" --problems "${PROBLEMS:-64}" \
      --extra "--max_tokens_per_micro_batch ${MICRO:-8192} --checkpoint_every 2 --ranks $ranks"
    cp /tmp/bench/*.json "$OUT/"
  done ;;
engines)
  setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  for split in "$@"; do
    python3 benchmarks/iteration.py --out /tmp/bench --tokenizer /tmp/tok --name "engines-${split/:/-}" \
      --iterations "${ITERATIONS:-3}" --problems "${PROBLEMS:-64}" --extra "--max_tokens_per_micro_batch \
      ${MICRO:-8192} --checkpoint_every 2 --engine_ranks ${split%:*} --ranks ${split#*:} --max_lag 1"
    cp /tmp/bench/*.json "$OUT/"
  done ;;
sweeps)
  setup
  # the log as it goes and each sweep's row as it ends come back even if the call runs out of time
  python3 benchmarks/sweep_scale.py --out /tmp/sweeps --tokenizer /tmp/tok --file_store --json "$OUT/sweep_scale.json" \
    "$@" 2>&1 | tee "$OUT/sweeps.log" | grep -E "^\||grpo sweep: (worker|trial)" ;;
prep)
  install .whl .whl_trl
  setup
  cp .carry2/* /tmp/m/ 2>/dev/null
  if [ -f /tmp/m/part_aa ] && [ -f /tmp/m/part_ac ]; then cat /tmp/m/part_* > /tmp/m/model.gguf; md5sum /tmp/m/model.gguf; fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; ls /tmp/m /tmp/site | head -3 ;;
study)
  rm -rf /tmp/code /tmp/study && mkdir -p /tmp/study && cp -r "$PWD" /tmp/code
  cd /tmp/code && setsid nohup python3 benchmarks/study.py --out /tmp/study "$@" >/tmp/study/log 2>&1 </dev/null &
  sleep 20; cat /tmp/study/log ;;
wait)
  end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ] && pgrep -f benchmarks/study.py >/dev/null; do sleep 10; done
  grep -v -E "Downloading artifacts|Warning" /tmp/study/log | tail -40
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  collect ;;  # what the study has so far comes back with every call: a machine lost between calls loses less
collect)
  collect; ls -la "$OUT" ;;
split)
  setup
  flags="--max_tokens_per_micro_batch 8192"; args=("$@")
  run() {  # name, visible GPUs, extra flags of main
    CUDA_VISIBLE_DEVICES=$2 python3 benchmarks/iteration.py --out "/tmp/split-$1" --tokenizer /tmp/tok --name "$1" \
      --iterations "${ITERATIONS:-5}" --extra "$flags $3" "${args[@]}" > "/tmp/split-$1.log" 2>&1
  }
  run shared-lag0 0 "--max_lag 0" & run shared-lag1 3 "--max_lag 1" & run split-lag1 1,2 "--trainer_gpu 1 --max_lag 1" &
  wait
  tail -n 25 /tmp/split-*.log; cp /tmp/split-*/*.json /tmp/split-*.log "$OUT/" ;;
profile)
  setup
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  cd benchmarks
  [ -d ../.baseline ] && python3 trainer_profile.py --out /tmp/prof --tokenizer /tmp/tok --code /tmp/baseline \
    --name before --profile 0 "$@" 2>&1 | grep -v Warning | tee "$OUT/profile-before.txt"
  python3 trainer_profile.py --out /tmp/prof --tokenizer /tmp/tok --name after "$@" 2>&1 | grep -v Warning \
    | tee "$OUT/profile.txt" ;;
decoder)
  setup
  cd benchmarks
  [ -d ../.baseline ] && python3 sampler_profile.py --out /tmp/prof --tokenizer /tmp/tok --code /tmp/baseline \
    --name before --profile 0 "$@" 2>&1 | grep -v Warning | tee "$OUT/decoder-before.txt"
  python3 sampler_profile.py --out /tmp/prof --tokenizer /tmp/tok --name after "$@" 2>&1 | grep -v Warning \
    | tee "$OUT/decoder.txt" ;;
learn)
  budget=$1; shift
  cp .carry2/* /tmp/m/ && cat /tmp/m/part_* > /tmp/m/model.gguf
  rm -rf /tmp/learn && mkdir -p /tmp/learn && cd /tmp/learn
  export MLFLOW_TRACKING_URI=file:///tmp/learn/mlruns
  timeout "$budget" python3 "$OLDPWD/entrypoints/main.py" --backend hf "$@" 2>&1 | grep -v Warning
  cd "$OLDPWD" && MLFLOW_TRACKING_URI=file:///tmp/learn/mlruns python3 benchmarks/export_run.py "$OUT/run" ;;
esac
