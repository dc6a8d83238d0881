# The 1B-shaped trainer group of 2 ranks alone on 2 x H200 with NCCL's default channel count and capped ones
# (NCCL_MAX_NCHANNELS): the gradient sum runs beside backward's kernels, and each channel takes an SM from them.
# Carry .whl and .carry0; run from the project root.
source benchmarks/device_env.sh
setup
P="benchmarks/trainer_profile.py --out /tmp/m1b --tokenizer /tmp/tok --shapes 32:16384 --rows ${ROWS:-1024} --profile 0"
T="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
for c in ${CHANNELS:-default 8 4}; do
  if [ "$c" = default ]; then timed "channels-$c" 150 $T $P --name "2 ranks, NCCL channels $c"
  else NCCL_MAX_NCHANNELS=$c timed "channels-$c" 150 $T $P --name "2 ranks, NCCL channels $c"; fi
  grep -E "^\| 32:|tokens/s, MFU" "$OUT/channels-$c.log"
done
