#!/usr/bin/env bash
# Builds the CUDA test binary (tests/cuda.rs) and the GPU bench (benches/gpu_step.rs) here, on a
# machine with no GPU, and packs them with bitsandbytes' wheel and benches/bnb_adamw8bit.py for a
# GPU host that has the NVIDIA driver, CUDA 13 libraries and PyTorch but no Rust toolchain:
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

# The artifact named `name` among cargo's JSON messages on stdin.
artifact() {
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -n 1
}
bin=$(CARGO_TARGET_DIR="$target" cargo test --release --features cuda --test cuda --no-run \
  --message-format=json 2>/dev/null | artifact cuda)
[[ -n "$bin" ]] || { echo "the cuda test binary was not built" >&2; exit 1; }
bench=$(CARGO_TARGET_DIR="$target" cargo bench --features cuda --bench gpu_step --no-run \
  --message-format=json 2>/dev/null | artifact gpu_step)
[[ -n "$bench" ]] || { echo "the gpu_step bench was not built" >&2; exit 1; }
strip -o .gpu/cuda_test "$bin"
strip -o .gpu/gpu_step "$bench"
xz -T2 -9 -f .gpu/cuda_test .gpu/gpu_step
cp benches/bnb_adamw8bit.py .gpu/
# bitsandbytes 0.50.2 for the peer figure, without the libraries of other CUDA versions (~5 MB).
if [[ ! -f .gpu/bitsandbytes.whl ]]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" bitsandbytes==0.50.2
  python3 - "$tmp"/bitsandbytes-*.whl .gpu/bitsandbytes.whl <<'PY'
import re, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        name = item.filename
        if re.search(r"libbitsandbytes_.*\.so$", name) and not re.search(r"_(cpu|cuda130)\.so$", name):
            continue
        zout.writestr(item, zin.read(name))
PY
  rm -rf "$tmp"
fi
git rev-parse --short HEAD >.gpu/revision

cat >.gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs the bundled CUDA tests and the GPU bench on a GPU host; see scripts/gpu-bundle.sh.
# GPU_STEP_ARGS passes arguments to the bench (e.g. "--dtype bf16 --layers 8"); SKIP_TESTS=1,
# SKIP_BENCH=1 and SKIP_BNB=1 leave parts out.
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-$PWD/out}"
mkdir -p "$out"
xz -dkf cuda_test.xz && xz -dkf gpu_step.xz && chmod +x cuda_test gpu_step
lib=$(dirname "$(find / -name 'libcublas.so.13' -print -quit 2>/dev/null)")
export LD_LIBRARY_PATH="$lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
ldd ./cuda_test | grep 'not found' && echo "missing libraries" >&2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
rc=0
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  ./cuda_test --test-threads=1 --nocapture >"$out/cuda_test.log" 2>&1
  rc=$?
fi
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  # shellcheck disable=SC2086
  ./gpu_step ${GPU_STEP_ARGS:-} --out "$out" >"$out/gpu_step.log" 2>&1 || rc=$((rc | 2))
fi
if [[ "${SKIP_BNB:-0}" != 1 ]]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --target "$site" bitsandbytes.whl >"$out/bnb_install.log" 2>&1
  # shellcheck disable=SC2086
  PYTHONPATH="$site" python3 bnb_adamw8bit.py $(echo "${GPU_STEP_ARGS:-}" | grep -oE -- '--(dtype|layers|steps) [^ ]+' | tr '\n' ' ') \
    >"$out/bnb.log" 2>&1 || rc=$((rc | 4))
fi
echo "revision $(cat revision), exit $rc (1: tests, 2: bench, 4: bitsandbytes)"
[[ -f "$out/cuda_test.log" ]] && grep -E '^test |identical|skipped|panicked|rel diff' "$out/cuda_test.log" | tail -n 30
[[ -f "$out/bnb.log" ]] && tail -n 4 "$out/bnb.log"
[[ -f "$out/gpu_step.log" ]] && tail -n 12 "$out/gpu_step.log"
exit $rc
RUN
chmod +x .gpu/run.sh
ls -la .gpu
