#!/usr/bin/env bash
# Screenshots of the report pages of the seed pipelines for docs/results.md: runs nothing,
# writes each page from the cache with `fpipe report` and photographs it in headless Chromium
# into docs/img/report-NAME.png. Run the pipelines first (`fpipe run pipelines/NAME.yaml`).
#   scripts/report-screenshots.sh [FPIPE] [NAME...]    (default: target/debug/fpipe, all five)
set -euo pipefail
cd "$(dirname "$0")/.."
fpipe="${1:-target/debug/fpipe}"
shift || true
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(quickstart vargface training-features craft losses)
chromium="${FPIPE_CHROMIUM:-chromium}"
out=docs/img
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for name in "${names[@]}"; do
    page="$tmp/$name.html"
    "$fpipe" report "pipelines/$name.yaml" -o "$page"
    "$chromium" --headless --no-sandbox --disable-gpu --no-first-run --disable-extensions \
        --user-data-dir="$tmp/profile" --hide-scrollbars --window-size=1280,2400 \
        --virtual-time-budget=10000 --screenshot="$out/report-$name.png" "file://$page" \
        >/dev/null 2>&1
    echo "$out/report-$name.png ($(stat -c %s "$out/report-$name.png") bytes)"
done
