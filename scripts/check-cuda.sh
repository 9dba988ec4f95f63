#!/usr/bin/env bash
# Builds fpipe with the `cuda` feature on a machine without a GPU: the release bundle that
# scripts/gpu-check.sh runs on a GPU machine (scripts/gpu-bundle.sh), so a build, not only a
# type check.
# candle-kernels needs `nvcc` at build time: installs Debian's nvidia-cuda-toolkit (non-free,
# ~1.6 GB with --no-install-recommends) when nvcc is missing, then runs
# scripts/gpu-bundle.sh with CUDA_COMPUTE_CAP=80 (no nvidia-smi to ask; sm_80 PTX also runs
# on H100/H200 through the driver's JIT). CPU-heavy: kept out of ordinary CI runs. Uses its
# own target directory (target-cuda/).
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
time CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}" bash scripts/gpu-bundle.sh
echo "check-cuda: OK"
