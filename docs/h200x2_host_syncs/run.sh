# The 1B-shaped trainer alone on 2 x H200, before (.baseline: host copies that wait for the GPU, clip_grad_norm_
# then AdamW) and after (micro-batches sent one ahead through pinned memory, the clip inside fused AdamW): one GPU
# and a group of 2 ranks, same rows and caps, back to back. Carry .whl, .carry0 and .baseline; run from the root.
source benchmarks/device_env.sh
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
P="benchmarks/trainer_profile.py --out /tmp/m1b --tokenizer /tmp/tok --shapes 32:16384 --rows ${ROWS:-1024}"
T="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
show() { grep -E "^\| 32:|tokens/s, MFU|wall-clock" "$OUT/$1.log"; }
timed one-before 200 python3 $P --code /tmp/baseline --profile 0 --name "one GPU, before"; show one-before
timed one-after 150 python3 $P --profile 0 --name "one GPU, after"; show one-after
timed two-before 150 $T $P --code /tmp/baseline --profile 1 --steps 4 --name "2 ranks, before"; show two-before
timed two-after 150 $T $P --profile 1 --steps 4 --name "2 ranks, after"; show two-after
