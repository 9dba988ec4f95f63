#!/usr/bin/env bash
# Convolution benchmark (docs/benchmarks.md, "Convolution and training step"): fpipe's CPU
# convolution against PyTorch CPU with the same thread count, per layer (iresnet /
# MobileFaceNet / VarGFaceNet shapes, batch 32) and, with --steps, whole training steps.
# Installs the PyTorch peer into .venv-peers/ when it is missing.
# Usage: scripts/bench-conv.sh [--threads N] [--reps R] [--steps] [--step-reps R]
# (defaults: 2 threads, 5 reps; --steps adds whole training steps, median of --step-reps
# after one warm-up step, default 2).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads=2
reps=5
steps=0
step_reps=2
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --reps) reps="$2"; shift 2 ;;
        --steps) steps=1; shift ;;
        --step-reps) step_reps="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
"$root/scripts/peer-venv.sh"
out="${CARGO_TARGET_DIR:-$root/target}/bench-conv"
mkdir -p "$out"
export RAYON_NUM_THREADS="$threads"
# Keep freed memory mapped and committed: candle allocates every intermediate afresh, and
# with mimalloc's defaults the pages of large blocks go back to the kernel and are faulted and
# zeroed again on the next op (measured: 277k page faults per MobileFaceNet run, 10k with these).
export MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ARENA_EAGER_COMMIT=1 MIMALLOC_RESERVE_OS_MEMORY=6GiB
cargo bench -p fpipe-kernels --bench conv -- --threads "$threads" --reps "$reps" --json "$out/fpipe.json"
echo
"$root/.venv-peers/bin/python" "$root/scripts/bench_conv_torch.py" "$out/fpipe.json" \
    --reps "$reps" --json "$out/torch.json"
if [ "$steps" = 1 ]; then
    echo
    # Runs the PyTorch peer (scripts/bench_step_torch.py) itself and adds its figures to the JSON.
    cargo bench -p fpipe-stages --bench train_step -- --threads "$threads" --reps "$step_reps" \
        --json "$out/step.json"
fi
