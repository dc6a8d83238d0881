# One engine rank beside one trainer rank at lag 1 (the 256 x 8 1B workload, 4 iterations) under py-spy: whether
# the trainer now reads its rows ahead (trainer_rows_read_seconds), and why the engine rank generates slower than
# main's engine on one GPU. Carry .whl, .carry0 and .pyspy; run from the project root on nvidia-h200-x2.
source benchmarks/device_env.sh
setup
install .pyspy
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
BENCH="--out /tmp/bench --tokenizer /tmp/tok --iterations 4 --problems 256 --eval_limit 64"
EXTRA="--max_tokens_per_micro_batch 16384 --checkpoint_every 2 --engine_ranks 1 --ranks 1 --max_lag 1"
timed engines-1-1 ${LIMIT:-300} /tmp/site/bin/py-spy record --subprocesses --idle --threads --nonblocking --rate 40 \
  --format raw -o $OUT/engines-1-1.stacks -- python3 benchmarks/iteration.py $BENCH --name engines-1-1 --extra "$EXTRA"
gzip -f $OUT/engines-1-1.stacks
cp /tmp/bench/engines-1-1.json $OUT/
MLFLOW_TRACKING_URI=file:///tmp/bench/store-engines-1-1/mlruns python3 benchmarks/export_run.py /tmp/export \
  > /dev/null 2>&1 && cp /tmp/export/metrics.csv $OUT/engines-1-1-metrics.csv
summary
