#!/usr/bin/env bash
# Build llama-cpp-python from its source distribution with CPU settings that decode quantized files
# correctly, and copy llama.cpp's own GGUF converter (same version) into the virtual environment.
#
#   bash src/afina/scripts/install_llama_cpp.sh .venv/bin/python   (or: afina setup llama-cpp)
#
# Why these settings: a native build (-march=native) on a CPU with AMX picks ggml's AMX int8 kernels,
# and decode of every quantized file segfaulted there (f16 worked). The build below targets AVX2/FMA/F16C
# (every x86-64 CPU of the last decade) with the AMX and AVX-512 kernels off, so the same wheel works on
# the developers' machines and in CI. Set LLAMA_CPP_CMAKE_ARGS to build differently (e.g. a GPU backend).
set -euo pipefail
PYTHON=${1:?usage: install_llama_cpp.sh PYTHON}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CMAKE_ARGS_DEFAULT="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_ARGS="${LLAMA_CPP_CMAKE_ARGS:-$CMAKE_ARGS_DEFAULT}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
sdist=$(ls "$work"/llama_cpp_python-*.tar.gz)
# pip does not cache a wheel built from a local sdist, so the build (~4 minutes on 2 cores) is kept here, keyed by
# version, Python and build settings: a second install on the same machine takes seconds.
key=$(printf '%s|%s' "$CMAKE_ARGS" "$("$PYTHON" -c 'import sys; print(sys.version)')" | sha256sum | cut -c1-16)
wheels="${AFINA_CACHE:-$HOME/.cache/afina}/wheels/llama-cpp-python-$VERSION-$key"
wheel=$(ls "$wheels"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  "$PYTHON" -m pip wheel --quiet --no-deps "$sdist" -w "$work/wheel"
  mkdir -p "$wheels"
  cp "$work"/wheel/llama_cpp_python-*.whl "$wheels"/
  wheel=$(ls "$wheels"/llama_cpp_python-*.whl | head -n 1)
fi
"$PYTHON" -m pip install --quiet "$wheel"

# The converter, its conversion/ package and the gguf-py it was written with (not on PyPI as one package).
share=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["data"])')/share/afina/llama.cpp
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)
rm -rf "$share" && mkdir -p "$share"
cp "$src"/convert_hf_to_gguf.py "$src"/convert_lora_to_gguf.py "$share"/
cp -r "$src"/conversion "$src"/gguf-py "$share"/
[ -f "$src"/LICENSE ] && cp "$src"/LICENSE "$share"/LICENSE
echo "llama-cpp-python $VERSION installed; llama.cpp's converter in $share"
