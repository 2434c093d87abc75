#!/bin/sh
# Runs under tini. `exec` makes the command this process, so the SIGTERM tini forwards
# (docker stop, compose down) reaches python itself and a training run can save and exit.
set -e

# A bind mount owned by another UID is the usual reason a run dies at its first write. Only a
# writable mount is checked: the servers and the client run on a read-only root, where the image's
# own folders (not mounted there) cannot be written by anyone, and need not be.
writable_mount() {
    found=1
    while read -r _ _ _ _ point options _; do
        if [ "$point" = "$1" ]; then
            case "$options" in rw | rw,*) found=0 ;; *) found=1 ;; esac
        fi
    done </proc/self/mountinfo
    return $found
}
for dir in /workspace/outputs "${HF_HOME:-}"; do
    if [ -n "$dir" ] && [ -d "$dir" ] && [ ! -w "$dir" ] && writable_mount "$dir"; then
        echo "entrypoint: warning: $dir (owner UID $(stat -c %u "$dir")) is not writable by UID $(id -u):" \
             "chown the host folder to UID $(id -u), or rebuild with --build-arg USER_UID=<your host UID>" >&2
    fi
done

# Secrets arrive as files (compose secrets under /run/secrets), never in the container's
# environment, which `docker inspect` shows. huggingface_hub reads its token file itself
# (HF_TOKEN_PATH); W&B reads only WANDB_API_KEY, so it gets the key in this process's
# environment, which nothing outside the container sees.
if [ -n "${WANDB_API_KEY_FILE:-}" ] && [ -z "${WANDB_API_KEY:-}" ] && [ -s "$WANDB_API_KEY_FILE" ]; then
    WANDB_API_KEY=$(cat "$WANDB_API_KEY_FILE")
    export WANDB_API_KEY
fi

exec "$@"
