# The 1B-shaped iteration on 2 x H200 (as docs/h200x2_scale/run.sh): one GPU, then a trainer group of 2 ranks on the
# baseline checkout (.baseline: gradients summed after the step's backward) and on this one (during it).
# Carry .whl, .carry0 and .baseline; run from the project root.
source benchmarks/device_env.sh
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
BENCH="--out /tmp/bench --tokenizer /tmp/tok --iterations 3 --problems 128 --eval_limit 16"
EXTRA="--max_tokens_per_micro_batch 16384 --checkpoint_every 2"
chain ranks-1 200
chain ranks-2-before 160 --code /tmp/baseline -- --ranks 2
chain ranks-2 160 -- --ranks 2
summary
