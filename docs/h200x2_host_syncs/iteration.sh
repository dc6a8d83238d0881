# The 4-GPU benchmark's workload (1B shape, 256 x 8, 512 tokens) on 2 x H200 with this checkout: one GPU, a trainer
# group of 2 (both sides of the 4-GPU engines-2-2 layout) and one engine rank beside one trainer rank at lag 1.
# Carry .whl and .carry0; run from the project root. RUNS picks some, in its order, each with its time limit.
source benchmarks/device_env.sh
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
BENCH="--out /tmp/bench --tokenizer /tmp/tok --iterations ${ITERATIONS:-3} --problems 256 --eval_limit 64"
EXTRA="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
for run in ${RUNS:-ranks-2:200 ranks-1:260 engines-1-1:200}; do
  case ${run%%:*} in
    ranks-1) chain ranks-1 "${run#*:}" ;;
    ranks-2) chain ranks-2 "${run#*:}" -- --ranks 2 ;;
    engines-1-1) chain engines-1-1 "${run#*:}" -- --engine_ranks 1 --ranks 1 --max_lag 1 ;;
  esac
done
summary
for s in /tmp/bench/store-*; do  # every main-run metric per iteration, from the runs' MLflow stores
  MLFLOW_TRACKING_URI=file://$s/mlruns python3 benchmarks/export_run.py "$OUT/${s##*/store-}" > /dev/null 2>&1
done
