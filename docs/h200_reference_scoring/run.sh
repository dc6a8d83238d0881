# Annotate's reference scoring alone, 1B shape, 2,048 rows (one 256 x 8 iteration), before (.baseline: each micro-
# batch's logprobs read back before the next is packed) and after (values kept on the GPU to the end), one GPU.
# Carry .whl, .carry0 and .baseline; run from the project root.
source benchmarks/device_env.sh
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
timed scoring 300 python3 benchmarks/reference_scoring.py --out /tmp/m1b --tokenizer /tmp/tok --code /tmp/baseline
tail -5 $OUT/scoring.log
