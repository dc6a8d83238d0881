# 1B shape on 4 x H200: one GPU, trainer groups of 2 and 4 ranks, and two engine ranks beside two trainer ranks at lag 1
# (carry .whl and .carry0; run from the project root). RUNS picks some, in its order, each with its time limit in
# seconds: e.g. RUNS="engines-2-2:200 ranks-1:250", the two that the 3.4x goal compares, back to back.
source benchmarks/device_env.sh
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
BENCH="--out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 256 --eval_limit 64"
EXTRA="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
watch_gpus
for run in ${RUNS:-ranks-1:210 ranks-2:150 ranks-4:120 engines-2-2:110}; do
  case ${run%%:*} in
    ranks-1) chain ranks-1 "${run#*:}" ;;
    ranks-2) chain ranks-2 "${run#*:}" -- --ranks 2 ;;
    ranks-4) chain ranks-4 "${run#*:}" -- --ranks 4 ;;
    engines-2-2) chain engines-2-2 "${run#*:}" -- --engine_ranks 2 --ranks 2 --max_lag 1 ;;
  esac
done
kill %1
summary
