#!/bin/sh
# Runs under tini. `exec` makes the command this process, so the SIGTERM tini forwards
# (docker stop, compose down) reaches python itself and a training run can save and exit.
set -e

# A bind mount owned by another UID is the usual reason a run dies at its first write.
for dir in /workspace/outputs "${HF_HOME:-}"; do
    if [ -n "$dir" ] && [ -d "$dir" ] && [ ! -w "$dir" ]; then
        echo "entrypoint: warning: $dir (owner UID $(stat -c %u "$dir")) is not writable by UID $(id -u):" \
             "chown the host folder to UID $(id -u), or rebuild with --build-arg USER_UID=<your host UID>" >&2
    fi
done

exec "$@"
