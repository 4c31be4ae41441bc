#!/usr/bin/env bash
# Builds the CUDA test binary (tests/cuda.rs) here, on a machine with no GPU, and packs it for a
# GPU host that has the NVIDIA driver and CUDA 13 libraries but no Rust toolchain:
#
#   scripts/gpu-bundle.sh          # -> .gpu/cuda_test.xz and .gpu/run.sh (ignored by git)
#   # on the GPU host, from the repo root:
#   bash .gpu/run.sh               # prints a short table; logs go to $OUT (or .gpu/out)
#
# Linking needs the CUDA libraries (nvrtc, cublas, curand, ~0.9 GB from PyPI) and a libcuda stub,
# which scripts/cuda-toolchain.sh fetches with CANDLE_BNB_CUDA_LINK=1; the real driver is used at
# run time. A cold build takes ~15 minutes on 2 cores (mostly candle-kernels' own nvcc work).
set -euo pipefail
cd "$(dirname "$0")/.."

export CANDLE_BNB_CUDA_LINK=1
eval "$(scripts/cuda-toolchain.sh)"
target="${CANDLE_BNB_CACHE:-$HOME/.cache/candle-bnb}/target-cuda"
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude

bin=$(CARGO_TARGET_DIR="$target" cargo test --release --features cuda --test cuda --no-run \
  --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])' | tail -n 1)
[[ -n "$bin" ]] || { echo "the cuda test binary was not built" >&2; exit 1; }
strip -o .gpu/cuda_test "$bin"
xz -T2 -9 -f .gpu/cuda_test
git rev-parse --short HEAD >.gpu/revision

cat >.gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs the bundled CUDA tests on a GPU host; see scripts/gpu-bundle.sh.
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-$PWD/out}"
mkdir -p "$out"
xz -dkf cuda_test.xz && chmod +x cuda_test
lib=$(dirname "$(find / -name 'libcublas.so.13' -print -quit 2>/dev/null)")
export LD_LIBRARY_PATH="$lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
ldd ./cuda_test | grep 'not found' && echo "missing libraries" >&2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
./cuda_test --test-threads=1 --nocapture >"$out/cuda_test.log" 2>&1
rc=$?
echo "revision $(cat revision), cuda_test exit $rc"
grep -E '^test |identical|skipped|panicked' "$out/cuda_test.log" | tail -n 20
exit $rc
RUN
chmod +x .gpu/run.sh
ls -la .gpu
