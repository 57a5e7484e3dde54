#!/usr/bin/env bash
# The GPU machine's half of `cargo xtask gpu`: run from the repository root, with the folder
# this script sits in (target/gpu-stage, made by `cargo xtask gpu build`) carried along.
#
#   target/gpu-stage/run.sh [all|ops|goldens|attn|gemm|dit|profile]...   (parts run in the order
#                  given; SKIP_CLI=1: no CLI run; CHECK_LIMIT=s: the check's time limit)
#
# Needs the NVIDIA driver and CUDA 13 runtime libraries (cuBLAS, cuRAND, cudart, NVRTC); they are
# taken from the system or from the pip packages of the machine's python3 (PyTorch's). Logs go
# to $OUT (or target/gpu-stage/out).
set -uo pipefail
export RUST_BACKTRACE=0
stage=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$stage/out}
mkdir -p "$out"
bin=$(mktemp -d)

# The binaries travel xz-compressed.
for f in "$stage"/*.xz; do
  [ -e "$f" ] || continue
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "$bin/$(basename "$f" .xz)" || exit 1
  chmod +x "$bin/$(basename "$f" .xz)"
done

# CUDA 13 libraries from pip packages, when the system lacks them.
libdirs=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13"]
dirs = []
for w in want:
    for r in roots:
        hits = glob.glob(os.path.join(r, "nvidia", "**", w), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in dirs:
                dirs.append(d)
            break
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$bin/flux-gpu-check" | grep -E "cuda|cublas|curand|nvrtc|not found"
} 2>&1 | tee "$out/machine.log"

status=0
# The default attention kernel alone first, under a time limit: if it hangs or faults, the rest
# runs with the mma.sync kernel (FLUX_CUDA_ATTENTION=mma.sync) instead of losing the whole run.
echo "== flux-gpu-check smoke (60 s limit)"
PYTHONUNBUFFERED=1 timeout 60 "$bin/flux-gpu-check" smoke 2>&1 | tee "$out/smoke.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "smoke failed: the rest runs with FLUX_CUDA_ATTENTION=mma.sync" | tee -a "$out/smoke.log"
  export FLUX_CUDA_ATTENTION=mma.sync
  status=1
fi

if [ -z "${SKIP_CLI:-}" ]; then
  # First-image latency of a fresh process (tiny model, 256², wall clock): the driver's JIT
  # cache empty without and with the background compile, then filled.
  # (a lent machine returns at most 8 files from $OUT: the three runs share one log and keep
  # one image)
  cache=$(mktemp -d) pngs=$(mktemp -d)
  for run in "cold-no-warm-up" "cold-warm-up" "cached"; do
    case $run in
      cold-no-warm-up) export CUDA_CACHE_PATH=$(mktemp -d) FLUX_CUDA_WARM_UP=0 ;;
      cold-warm-up) export CUDA_CACHE_PATH=$cache FLUX_CUDA_WARM_UP=1 ;;
      cached) export CUDA_CACHE_PATH=$cache FLUX_CUDA_WARM_UP=1 ;;
    esac
    echo "== flux generate --device cuda (tiny model, CLI end to end; JIT cache: $run)"
    t0=$(date +%s.%N)
    "$bin/flux" generate --model flux-pipeline/tests/golden/tiny-dev --device cuda --dtype bf16 \
      --prompt "a red fox in the snow" --width 256 --height 256 --seed 42 \
      --output "$pngs/tiny-cuda-$run-{seed}.png" 2>&1 | tee -a "$out/flux-cli.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status=1
    secs=$(python3 -c "print(round($(date +%s.%N) - $t0, 2))")
    echo "first image, fresh process, JIT cache $run: ${secs} s$([ "$rc" -eq 0 ] || echo " (FAILED, rc $rc)")" \
      | tee -a "$out/first-image.log"
  done
  cp "$pngs/tiny-cuda-cached-42.png" "$out/" 2>/dev/null
  rm -rf "$pngs" "$cache"
  unset CUDA_CACHE_PATH FLUX_CUDA_WARM_UP
fi

echo "== flux-gpu-check ${*:-all}"
PYTHONUNBUFFERED=1 timeout "${CHECK_LIMIT:-720}" "$bin/flux-gpu-check" "$@" 2>&1 | tee "$out/gpu-check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
rm -rf "$bin"
exit $status
