#!/usr/bin/env bash
# Issue 5 benchmark: fpipe's CPU convolution against PyTorch CPU with the same thread count,
# per layer (iresnet / MobileFaceNet / VarGFaceNet shapes, batch 32) and, with --steps,
# whole training steps. Installs the PyTorch peer into .venv-peers/ when it is missing.
# Usage: scripts/bench-conv.sh [--threads N] [--reps R]  (defaults: 2 threads, 5 reps)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads=2
reps=5
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --reps) reps="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
"$root/scripts/peer-venv.sh"
out="${CARGO_TARGET_DIR:-$root/target}/bench-conv"
mkdir -p "$out"
export RAYON_NUM_THREADS="$threads"
cargo bench -p fpipe-stages --bench conv -- --threads "$threads" --reps "$reps" --json "$out/fpipe.json"
echo
"$root/.venv-peers/bin/python" "$root/scripts/bench_conv_torch.py" "$out/fpipe.json" \
    --reps "$reps" --json "$out/torch.json"
