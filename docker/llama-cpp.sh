#!/usr/bin/env bash
# llama-cpp-python for GGUF export (make export) and the llama.cpp server (SERVE_BACKEND=llamacpp).
#
# PyPI has only its source distribution, and installing that compiles llama.cpp (about 640
# CPU-seconds). This script builds a portable CPU wheel from it once and caches it, and takes
# llama.cpp's own GGUF converter (convert_hf_to_gguf.py, its conversion/ package and the gguf-py
# it needs) out of the same sdist, which the wheel does not contain.
#
#   docker/llama-cpp.sh wheel       build the wheel unless cached; prints the folder to --find-links
#   docker/llama-cpp.sh converter   extract the converter unless cached; prints its folder
#
# Environment:
#   PYTHON                whose pip downloads and builds (default python3)
#   LLAMA_CPP_CACHE       the cache (default ${XDG_CACHE_HOME:-~/.cache}/qlora-stack/llama-cpp-python);
#                         training/merge/llama_cpp.py looks for the converter there too
#   LLAMA_CPP_CMAKE_ARGS  extra CMake flags, e.g. "-DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF" for
#                         CPUs older than Haswell; each set of flags gets its own cached wheel
#
# Portable means GGML_NATIVE=OFF, the flag of llama-cpp-python's own release builds: ggml then
# compiles for SSE4.2/AVX/AVX2/FMA/F16C/BMI2 instead of the build machine's CPU, so the wheel runs
# on any x86-64 CPU since Haswell (2013) and is as fast as a native build on CPUs without AVX-512.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
cache=${LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-stack/llama-cpp-python}
# The one pin lives in pyproject.toml (the export extra).
version=$(sed -n 's/.*"llama-cpp-python\[server\]==\([0-9.]*\)".*/\1/p' "$repo/pyproject.toml" | head -n 1)
[ -n "$version" ] || { echo "llama-cpp.sh: no llama-cpp-python[server]==X pin in $repo/pyproject.toml" >&2; exit 2; }
flags="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
flags+=" -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF${LLAMA_CPP_CMAKE_ARGS:+ $LLAMA_CPP_CMAKE_ARGS}"
sdist_name=llama_cpp_python-$version.tar.gz

say() { printf '[llama-cpp] %s\n' "$*" >&2; }

mkdir -p "$cache"
# One builder at a time (two make calls, or CI jobs on one machine, share the cache).
exec 9>"$cache/.lock"
flock 9

fetch_sdist() {
  if [ ! -f "$cache/sdist/$sdist_name" ]; then
    say "downloading the llama-cpp-python $version sdist (76 MB) into $cache/sdist"
    local tmp
    tmp=$(mktemp -d "$cache/.sdist.XXXXXX")
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" >&2
    mkdir -p "$cache/sdist"
    mv "$tmp/$sdist_name" "$cache/sdist/$sdist_name"
    rm -rf "$tmp"
  fi
  echo "$cache/sdist/$sdist_name"
}

build_wheel() {
  local key dir tmp sdist started
  # The wheel links against this machine's C and C++ runtime libraries, so an image or machine with
  # another glibc or compiler (a shared BuildKit cache, a copied cache) gets a wheel of its own.
  key=$(printf '%s %s %s %s' "$version" "$flags" "$(getconf GNU_LIBC_VERSION)" "$(c++ -dumpfullversion 2>/dev/null)" \
    | sha256sum | cut -c1-12)
  dir=$cache/wheels/$key
  if compgen -G "$dir/llama_cpp_python-$version-*.whl" >/dev/null; then
    say "cached wheel: $(basename "$dir"/llama_cpp_python-"$version"-*.whl) (flags: $flags)"
  else
    sdist=$(fetch_sdist)
    say "building llama-cpp-python $version from $sdist_name (about 640 CPU-seconds; flags: $flags)"
    tmp=$(mktemp -d "$cache/.wheel.XXXXXX")
    chmod 755 "$tmp"  # mktemp makes it private; the cache may serve other users (CI, containers)
    started=$(date +%s)
    CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$PYTHON" -m pip wheel --quiet --no-deps --no-cache-dir "$sdist" -w "$tmp" >&2
    printf '%s\n' "$flags" >"$tmp/cmake-args.txt"
    mkdir -p "$cache/wheels"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    say "built in $(($(date +%s) - started)) s: $dir"
  fi
  echo "$dir"
}

extract_converter() {
  local dir=$cache/converter-$version tmp sdist top
  if [ ! -f "$dir/convert_hf_to_gguf.py" ]; then
    sdist=$(fetch_sdist)
    tmp=$(mktemp -d "$cache/.converter.XXXXXX")
    chmod 755 "$tmp"
    top=llama_cpp_python-$version/vendor/llama.cpp
    tar -xzf "$sdist" -C "$tmp" --strip-components=3 \
      "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    say "llama.cpp's converter extracted to $dir"
  fi
  echo "$dir"
}

case "${1:-}" in
  wheel) build_wheel ;;
  converter) extract_converter ;;
  *) echo "usage: $0 wheel|converter" >&2; exit 2 ;;
esac
