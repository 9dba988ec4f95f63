#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine (which has no Rust toolchain):
# `fpipe` and the `gpu_check` example with `--features cuda`, release, stripped, into
# target/gpu-bundle/ (carried to the machine as an ignored path; about 40 MB, under the
# 64 MiB a device run carries). Needs nvcc (scripts/check-cuda.sh installs it).
#   bash scripts/gpu-bundle.sh   (CUDA_COMPUTE_CAP: default 80, whose PTX the driver also runs
#   on H100/H200; 90 targets those only)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
# No debug info: the bundle must stay small.
export CARGO_PROFILE_RELEASE_DEBUG=false
cargo build --release --locked --features cuda --bin fpipe
cargo build --release --locked -p fpipe-stages --features cuda --example gpu_check
out="$root/target/gpu-bundle"
mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/fpipe" "$CARGO_TARGET_DIR/release/examples/gpu_check" "$out/"
strip "$out/fpipe" "$out/gpu_check"
echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP $(git rev-parse --short HEAD)" > "$out/BUILT"
du -sh "$out"/*
