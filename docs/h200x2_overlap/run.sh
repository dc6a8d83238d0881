# The 1B-shaped trainer alone on 2 x H200: one GPU, then a group of 2 ranks summing gradients after the step's
# backward (the baseline checkout, .baseline) and during its last backward (this checkout), same rows and caps.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false GRPO_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpus.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
cp -r .carry0/tok /tmp/tok
P="benchmarks/trainer_profile.py --out /tmp/m --tokenizer /tmp/tok --shapes 32:16384 --rows ${ROWS:-1024}"
T="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
t0=$(date +%s)
run() {  # name limit command...
  local name=$1 lim=$2; shift 2
  timeout $lim "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
  grep -E "^\| 32:|tokens/s, MFU|collectives|wall-clock" $OUT/$name.log
}
run one-gpu 200 python3 $P --profile 0 --name one-gpu
run two-before 160 $T $P --code .baseline --profile 1 --steps 4 --name "2 ranks, sum after backward"
run two-after 160 $T $P --profile 1 --steps 4 --name "2 ranks, sum during backward"
