#!/usr/bin/env bash
# Pin the GPU servers' images by digest: resolve TGI_IMAGE and VLLM_IMAGE (from .env, else the
# defaults in .env.example) to tag@sha256:<digest> and write them into .env, which compose.yaml
# reads. A tag can be moved to other bytes by whoever controls it; a digest cannot.
#
#   make pin-images                 # or: docker/pin-images.sh [ENV_FILE]   (default .env)
#
# Run it after changing a tag, and again whenever you want the newest build of the same tag
# (then review what changed before restarting the servers). It needs registry access and one of:
# `docker buildx imagetools` (Docker with buildx) or `skopeo`. An image already pinned is
# resolved again from its tag, so the digest is always the tag's current one.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=${1:-$repo/.env}
example=$repo/.env.example
VARIABLES=(TGI_IMAGE VLLM_IMAGE)

die() { printf 'pin-images: %s\n' "$*" >&2; exit 1; }

# The value of KEY=value in a file (last one wins, as in compose), or nothing.
value_in() { [ -f "$2" ] && sed -n "s/^[[:space:]]*$1=\(.*\)$/\1/p" "$2" | tail -n 1 || true; }

# The digest of the manifest (or multi-platform index) that REF names: what `image@digest` pins.
digest_of() {
  local ref=$1 out
  if docker buildx imagetools inspect --help >/dev/null 2>&1; then
    out=$(docker buildx imagetools inspect "$ref" --format '{{json .Manifest}}') || return 1
    printf '%s' "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["digest"])'
  elif command -v skopeo >/dev/null; then
    # The raw top-level manifest's sha256 is, by definition, the digest a pull by digest checks.
    out=$(skopeo inspect --raw "docker://$ref") || return 1
    printf 'sha256:%s\n' "$(printf '%s' "$out" | sha256sum | cut -d' ' -f1)"
  else
    die "neither 'docker buildx imagetools' nor 'skopeo' is installed: install one of them"
  fi
}

[ -f "$env_file" ] || { cp "$example" "$env_file" && chmod 600 "$env_file" && echo "wrote $env_file from .env.example"; }

for variable in "${VARIABLES[@]}"; do
  current=$(value_in "$variable" "$env_file")
  current=${current:-$(value_in "$variable" "$example")}
  [ -n "$current" ] || die "$variable is set neither in $env_file nor in $example"
  tag=${current%%@*}   # re-resolve from the tag, dropping an old digest
  digest=$(digest_of "$tag") || die "could not resolve $tag (registry reachable? logged in?)"
  [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || die "unexpected digest for $tag: '$digest'"
  pinned="$tag@$digest"
  tmp=$(mktemp "$env_file.XXXXXX")
  if grep -q "^[[:space:]]*$variable=" "$env_file"; then
    awk -v k="$variable" -v v="$pinned" '$0 ~ "^[[:space:]]*" k "=" { print k "=" v; next } { print }' \
      "$env_file" >"$tmp"
  else
    { cat "$env_file"; printf '%s=%s\n' "$variable" "$pinned"; } >"$tmp"
  fi
  chmod --reference="$env_file" "$tmp" && mv "$tmp" "$env_file"
  if [ "$current" = "$pinned" ]; then echo "$variable=$pinned (unchanged)"; else echo "$variable=$pinned"; fi
done
