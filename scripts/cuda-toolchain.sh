#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler (nvcc, nvvm, crt and runtime headers, cccl) from NVIDIA's PyPI
# wheels into a cache folder, for machines with no CUDA install (CI, this project's dev boxes).
# No root, no GPU needed. Prints the environment to use, e.g.
#
#   eval "$(scripts/cuda-toolchain.sh)"   # sets CUDA_HOME, PATH, CUDA_COMPUTE_CAP
#   cargo check --features cuda
#
# Options (environment):
#   CANDLE_BNB_CUDA_CACHE  cache folder (default ~/.cache/candle-bnb/cuda-13.0); reused when complete
#   CANDLE_BNB_CUDA_LINK=1 also fetch the libraries needed to link (nvrtc, curand, cublas, ~0.9 GB)
#                          and build a libcuda.so stub (the real driver is used at run time)
#   CUDA_COMPUTE_CAP       target compute capability (default 90: H100/H200)
# A machine with a normal CUDA install does not need this: set CUDA_HOME (or have nvcc on PATH).
set -euo pipefail

cache="${CANDLE_BNB_CUDA_CACHE:-$HOME/.cache/candle-bnb/cuda-13.0}"
link="${CANDLE_BNB_CUDA_LINK:-0}"
home="$cache/nvidia/cu13"
stamp="$cache/.complete-link$link"

log() { printf '%s\n' "$*" >&2; }

if [[ ! -f "$stamp" ]]; then
  command -v python3 >/dev/null || { log "python3 with pip is needed to fetch the wheels"; exit 1; }
  wheels=(nvidia-cuda-nvcc==13.0.* nvidia-nvvm==13.0.* nvidia-cuda-crt==13.0.*
          nvidia-cuda-runtime==13.0.* nvidia-cuda-cccl==13.0.*)
  if [[ "$link" == 1 ]]; then
    wheels+=(nvidia-cuda-nvrtc==13.0.* nvidia-curand nvidia-cublas==13.*)
  fi
  mkdir -p "$cache/wheels"
  log "fetching ${#wheels[@]} CUDA wheels into $cache (one time)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$cache/wheels" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --python-version 3.11 "${wheels[@]}" >&2
  # Python's zipfile rather than unzip, which not every machine has; run bits are set below.
  python3 - "$cache" "$cache"/wheels/*.whl <<'PY'
import sys, zipfile
dest = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest, [n for n in z.namelist() if n.startswith("nvidia/")])
PY
  chmod +x "$home"/bin/* "$home"/nvvm/bin/*
  if [[ "$link" == 1 ]]; then
    lib="$home/lib"
    for name in cublas cublasLt cudart nvrtc; do
      ln -sf "$(basename "$(ls "$lib"/lib$name.so.13* | head -n1)")" "$lib/lib$name.so"
    done
    ln -sf "$(basename "$(ls "$lib"/libcurand.so.10* | head -n1)")" "$lib/libcurand.so"
    # libcuda.so (the driver) ships in no wheel: a stub with every cu* entry point lets binaries
    # link; at run time the real driver's libcuda.so.1 is loaded instead.
    stub="$cache/cuda_stub.c"
    echo '#include <cuda.h>' | cpp -I "$home/include" - \
      | grep -oE 'CUresult +(CUDAAPI +)?cu[A-Za-z0-9_]+ *\(' \
      | grep -oE 'cu[A-Za-z0-9_]+' | sort -u \
      | sed 's/.*/int &(void){return 999;}/' >"$stub"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$stub"
  fi
  "$home/bin/nvcc" --version >/dev/null
  touch "$stamp"
fi

echo "export CUDA_HOME='$home'"
echo "export PATH='$home/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP='${CUDA_COMPUTE_CAP:-90}'"
if [[ "$link" == 1 ]]; then
  echo "export LIBRARY_PATH='$home/lib':\"\${LIBRARY_PATH:-}\""
fi
