# 1B shape on 4 x H200: one GPU against two engine ranks beside a two-rank trainer group at lag 1, back to back
# (the code since docs/h200x4_scale: pinned checkpoint copies, the group's gradient sum during the last backward).
# Carry .whl and .carry0; run from the project root. Each chain's results JSON comes back as it ends.
source benchmarks/device_env.sh
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
BENCH="--out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 256 --eval_limit 64"
EXTRA="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
watch_gpus
chain engines-2-2 200 -- --engine_ranks 2 --ranks 2 --max_lag 1
chain ranks-1 250
kill %1
summary
