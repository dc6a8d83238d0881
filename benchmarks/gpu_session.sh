#!/usr/bin/env bash
# GPU runs for the README, on a bare device machine (torch + transformers, no PyPI): see README "On a GPU".
# Three calls in a row on one warm machine, each carrying what it needs (64 MiB a call):
#   check   [.carry1]: GGUF part 1, TRL + datasets wheels, half the mlflow-skinny closure, the SmolLM2 tokenizer
#            files under tok/; installs them, checks versions, and (once pydantic from .carry2 is there) runs the TRL
#            peer for a few seconds on a tiny random Llama.
#   learn SECONDS ARGS... [.carry2]: GGUF part 2 and the rest of the mlflow closure; installs everything, joins and
#            dequantises the model, runs the main chain with ARGS (MLflow file store), exports its metrics.
#   peer ARGS... : TRL's GRPOTrainer with ARGS (benchmarks/trl_peer.py), then the side-by-side table. On a fresh
#            machine: a `copy` call carrying .carry1 first, then peer carrying .carry2 and .carry3.
#   copy [.carry1]: only copies the carried files, for a peer-only session.
#   rollout: benchmarks/rollout.py on the rollout benchmark's workload (after learn).
set -u
phase=$1; shift
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRPO_SMOLLM2_GGUF=/tmp/m/model.gguf GRPO_CACHE=/tmp/cache
export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file:///tmp/gpu_mlruns TOKENIZERS_PARALLELISM=false
quiet() { grep --line-buffered -vE "it/s\]|seq/s\]|step/s\]|s/it\]|^\{'loss'|Warning|warnings.warn"; }
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/m/*.whl 2>&1 | grep -v "WARNING: Target directory"; }
case $phase in
check)
  mkdir -p /tmp/m && cp -r .carry1/* /tmp/m/ && install
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 - <<'PY'
import torch, transformers, trl, datasets
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__,
      "datasets", datasets.__version__)
tok = AutoTokenizer.from_pretrained("/tmp/m/tok")
config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2)
LlamaForCausalLM(config).save_pretrained("/tmp/tiny")
tok.save_pretrained("/tmp/tiny")
PY
  # TRL's trainer imports pydantic, which only fits in .carry2: on a fresh machine the smoke test waits for learn
  python3 -c "import pydantic" 2>/dev/null && python3 benchmarks/trl_peer.py --model /tmp/tiny --seconds 10 --problems_per_step 4 --attempts 4 --micro_batch 16 \
    --max_new_tokens 64 --eval_limit 64 --out "$OUT/trl_check" 2>&1 | quiet | tail -20 ;;
learn)
  budget=$1; shift
  cp -r .carry*/* /tmp/m/ 2>/dev/null; install; cat /tmp/m/part_* > /tmp/m/model.gguf
  python3 -c "import mlflow; from grpo.model import resolve; print('mlflow', mlflow.__version__, resolve('smollm2-135m'))" \
    2>&1 | tail -1
  timeout "$budget" python3 entrypoints/main.py --backend hf "$@" 2>&1 | quiet
  python3 benchmarks/export_run.py "$OUT/ours" 2>&1 | tail -1
  cp -r "$OUT/ours" /tmp/ours ;;
copy)
  mkdir -p /tmp/m && cp -r .carry1/* /tmp/m/ ;;
peer)
  if [ ! -f /tmp/m/model.gguf ]; then
    cp -r .carry*/* /tmp/m/ 2>/dev/null; install; cat /tmp/m/part_* > /tmp/m/model.gguf
  fi
  python3 benchmarks/trl_peer.py --out "$OUT/trl" "$@" 2>&1 | quiet | grep -v "^ *\"" | tail -40
  cp "$OUT/trl/trl_summary.json" "$OUT/trl/trl_log.jsonl" /tmp/ 2>/dev/null
  rm -rf "$OUT/trl/final" "$OUT/trl/trainer"
  [ -d /tmp/ours ] && python3 benchmarks/peer_table.py /tmp/ours "$OUT/trl" | tee "$OUT/peer_table.md" ;;
rollout)
  python3 benchmarks/rollout.py --backends hf,generate --json "$OUT/rollout_gpu.json" 2>&1 | quiet ;;
esac
