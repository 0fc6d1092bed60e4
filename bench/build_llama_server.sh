#!/bin/sh
# Build llama.cpp's llama-server from the source vendored in the pinned llama-cpp-python sdist,
# so bench/serve.py compares edgepack with the same llama.cpp it runs on. Cached: reruns exit
# at once when the binary exists. Usage: sh bench/build_llama_server.sh [VERSION]
set -eu
VERSION="${1:-0.3.36}"
CACHE="${HOME}/.cache/edgepack-bench"
OUT="${CACHE}/llama-server"
if [ -x "${OUT}" ]; then echo "${OUT} (cached)"; exit 0; fi
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT
"${PY}" -m pip download --quiet --no-deps --no-binary=:all: "llama-cpp-python==${VERSION}" -d "${WORK}"
tar -xzf "${WORK}"/llama_cpp_python-"${VERSION}".tar.gz -C "${WORK}"
SRC="${WORK}/llama_cpp_python-${VERSION}/vendor/llama.cpp"
cmake -S "${SRC}" -B "${WORK}/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_WEBUI=OFF >/dev/null
cmake --build "${WORK}/build" --target llama-server -j "$(nproc)"
mkdir -p "${CACHE}"
cp "${WORK}/build/bin/llama-server" "${OUT}.tmp" && mv "${OUT}.tmp" "${OUT}"
echo "${OUT}"
