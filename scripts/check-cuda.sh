#!/usr/bin/env bash
# Type-checks the workspace with the `cuda` feature on a machine without a GPU (outcome in
# docs/benchmarks.md, "Convolution and training step").
# candle-kernels needs `nvcc` at build time: installs Debian's nvidia-cuda-toolkit (non-free,
# ~1.6 GB with --no-install-recommends) when nvcc is missing, then runs
# `CUDA_COMPUTE_CAP=80 cargo check --features cuda` (no nvidia-smi to ask). CPU-heavy (~7 min
# on 2 cores): kept out of ordinary CI runs. Uses its own target directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v nvcc >/dev/null 2>&1; then
    src=/etc/apt/sources.list.d/debian-nonfree.sources
    if [ ! -f "$src" ]; then
        . /etc/os-release
        cat > "$src" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $VERSION_CODENAME $VERSION_CODENAME-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -1
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda-check}"
time CUDA_COMPUTE_CAP=80 cargo check --features cuda
echo "check-cuda: OK"
