#!/usr/bin/env bash
# fpipe's remote cache against `dvc push`/`dvc pull`, same bytes, same local S3 server (moto),
# side by side in one run: an artifact of many small files, one large file, and (with
# CACHE_ALL=DIR) every artifact of a cache, e.g. one that ran pipelines/vargface.yaml.
#   [CACHE_ALL=DIR] benches/remote-vs-dvc.sh [SMALL_FILES [LARGE_MB]]
#   (default 10000 files of 1 KiB, 512 MB)
# Installs DVC (with its S3 plugin) into .venv-engine-peers/ on first use, as
# benches/engine-peers.sh does, and moto into the system python3 when missing. Results: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${1:-10000}
LARGE_MB=${2:-512}
VENV=${VENV:-$ROOT/.venv-engine-peers}
# DVC's S3 plugin and moto pin conflicting botocore versions: moto runs from the system
# python3 (as in .ci/run), DVC from the venv.
if [ ! -x "$VENV/bin/dvc" ] || ! "$VENV/bin/python" -c 'import dvc_s3' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'dvc[s3]==3.67.1'
fi
python3 -c 'import moto.server, flask_cors' 2>/dev/null || python3 -m pip install -q 'moto[server]>=5,<6'

# FPIPE_BIN: an fpipe already built (else a release build of the bare engine, which has the
# `shell` kind these stages use).
if [ -n "${FPIPE_BIN:-}" ]; then
    FPIPE=$FPIPE_BIN
else
    cargo build --release --locked --no-default-features
    FPIPE=${CARGO_TARGET_DIR:-$ROOT/target}/release/fpipe
fi
"$VENV/bin/dvc" --version | sed 's/^/dvc /'

WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m moto.server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT" && break; sleep 0.1; done
curl -s -X PUT "http://127.0.0.1:$PORT/bench" -o /dev/null
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT

# t CMD...: "SECONDS PEAK_RSS_MB" of the command (GNU time; DVC's figure is its main process).
t() {
    /usr/bin/time -f '%e %M' -o "$WORK/time" "$@" >/dev/null 2>"$WORK/stderr" || { cat "$WORK/stderr" >&2; return 1; }
    awk '{printf "%s %.0f", $1, $2 / 1024}' "$WORK/time"
}
row() { # row LABEL "FPIPE_S FPIPE_MB" "DVC_S DVC_MB"
    set -- "$1" $2 $3
    printf '| %-34s | %8.2f s | %5d MB | %8.2f s | %5d MB | %6.1fx |\n' "$1" "$2" "$3" "$4" "$5" "$(echo "$4 / $2" | bc -l)"
}

# The same bytes for both: N small files, and one large file, each the output of one stage.
mkdir -p "$WORK/fp" && cd "$WORK/fp"
printf '%s\n' 'stages:' '  small:' '    uses: shell' \
    "    with: {run: 'mkdir small; i=0; while [ \$i -lt $N ]; do head -c 1024 /dev/urandom > small/f\$i; i=\$((i+1)); done', outputs: [small]}" > small.yaml
printf '%s\n' 'stages:' '  large:' '    uses: shell' \
    "    with: {run: 'head -c ${LARGE_MB}000000 /dev/urandom > large.bin', outputs: [large.bin]}" > large.yaml
"$FPIPE" run small.yaml >/dev/null 2>&1
"$FPIPE" run large.yaml >/dev/null 2>&1
SMALL_DIR=$("$FPIPE" out small -f small.yaml)/small
LARGE_FILE=$("$FPIPE" out large -f large.yaml)/large.bin

DVC=$VENV/bin/dvc
mkdir -p "$WORK/dvc" && cd "$WORK/dvc"
git init -q . && "$DVC" init -q
"$DVC" remote add -q -d s3 s3://bench/dvc
"$DVC" remote modify s3 endpointurl "$AWS_ENDPOINT_URL"
cp -r "$SMALL_DIR" small && chmod -R u+w small
cp "$LARGE_FILE" large.bin && chmod u+w large.bin
"$DVC" add -q small large.bin
if [ -n "${CACHE_ALL:-}" ]; then
    # The same bytes for DVC: every artifact folder of the cache, as one tracked folder.
    cp -r "$CACHE_ALL/objects" all && chmod -R u+w all
    "$DVC" add -q all
    echo "CACHE_ALL=$CACHE_ALL: $(find all -type f | wc -l) files, $(du -sm all | cut -f1) MB in $(find all -mindepth 2 -maxdepth 2 -type d | wc -l) artifacts"
fi

echo
echo "$N files of 1 KiB in one artifact, and one file of $LARGE_MB MB; moto S3 server on loopback"
echo
echo "| | fpipe | fpipe peak RSS | dvc | dvc peak RSS | dvc / fpipe time |"
echo "|---|---:|---:|---:|---:|---:|"
# Every push before any pull: a pull empties DVC's whole cache, which the next push needs.
for what in small large; do
    target=$what
    [ "$what" = large ] && target=large.bin
    cd "$WORK/fp"; f=$(t "$FPIPE" cache push s3://bench/fpipe "$what.yaml")
    cd "$WORK/dvc"; d=$(t "$DVC" push "$target.dvc")
    row "push $what" "$f" "$d"
    cd "$WORK/fp"; f=$(t "$FPIPE" cache push s3://bench/fpipe "$what.yaml")
    cd "$WORK/dvc"; d=$(t "$DVC" push "$target.dvc")
    row "push $what again (nothing to send)" "$f" "$d"
done
for what in small large; do
    target=$what
    [ "$what" = large ] && target=large.bin
    cd "$WORK/fp"; f=$(t "$FPIPE" --cache "$WORK/fp-pulled-$what" cache pull s3://bench/fpipe "$what.yaml")
    cd "$WORK/dvc"; rm -rf .dvc/cache "$target"; d=$(t "$DVC" pull "$target.dvc")
    row "pull $what into an empty cache" "$f" "$d"
done
if [ -n "${CACHE_ALL:-}" ]; then
    cd "$WORK/fp"; f=$(t "$FPIPE" --cache "$CACHE_ALL" cache push s3://bench/fp-all --all)
    cd "$WORK/dvc"; d=$(t "$DVC" push all.dvc)
    row "push every artifact of CACHE_ALL" "$f" "$d"
    cd "$WORK/fp"; f=$(t "$FPIPE" --cache "$CACHE_ALL" cache push s3://bench/fp-all --all)
    cd "$WORK/dvc"; d=$(t "$DVC" push all.dvc)
    row "push it again (nothing to send)" "$f" "$d"
    cd "$WORK/fp"; f=$(t "$FPIPE" --cache "$WORK/fp-pulled-all" cache pull s3://bench/fp-all)
    cd "$WORK/dvc"; rm -rf .dvc/cache all; d=$(t "$DVC" pull all.dvc)
    row "pull it into an empty cache" "$f" "$d"
fi
