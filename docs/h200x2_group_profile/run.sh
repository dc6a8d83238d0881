# Where a trainer group's stages spend their time outside the GPU's kernels: py-spy samples main, torchrun and both
# ranks (every thread, idle ones too) through a 1B-shaped ranks-2 run of the 4-GPU benchmark's 256 x 8 workload.
# Carry .whl, .carry0 and .pyspy (the py-spy wheel); run from the project root on nvidia-h200-x2.
source benchmarks/device_env.sh
setup
install .pyspy
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
BENCH="--out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 256 --eval_limit 64"
EXTRA="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
timed ranks-2 ${LIMIT:-240} /tmp/site/bin/py-spy record --subprocesses --idle --threads --nonblocking --rate 40 \
  --format raw -o $OUT/ranks-2.stacks -- \
  python3 benchmarks/iteration.py $BENCH --name ranks-2 --extra "$EXTRA --ranks 2"
cp /tmp/bench/*.json "$OUT/" 2>/dev/null
gzip -f $OUT/ranks-2.stacks
summary
