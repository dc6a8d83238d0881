# The 1B-shaped trainer alone on 2 x H200: one GPU, then a group of 2 ranks summing gradients after the step's
# backward (the baseline checkout, .baseline) and during its last backward (this checkout), same rows and caps.
# Carry .whl, .carry0 and .baseline (without it, one GPU and this checkout only); run from the project root.
source benchmarks/device_env.sh
setup
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
P="benchmarks/trainer_profile.py --out /tmp/m1b --tokenizer /tmp/tok --shapes 32:16384 --rows ${ROWS:-1024}"
T="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
show() { grep -E "^\| 32:|tokens/s, MFU|collectives|wall-clock" "$OUT/$1.log"; }
timed one-gpu 200 python3 $P --profile 0 --name one-gpu; show one-gpu
if [ -d /tmp/baseline ]; then  # without .baseline: this checkout only
  timed two-before 160 $T $P --code /tmp/baseline --profile 1 --steps 4 --name "2 ranks, sum after backward"
  show two-before
fi
timed two-after 160 $T $P --profile 1 --steps 4 --name "2 ranks, sum during backward"; show two-after
