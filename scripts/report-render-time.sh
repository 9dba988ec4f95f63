#!/usr/bin/env bash
# Render time of an `fpipe report` page in headless Chromium (docs/benchmarks.md, "Report
# page"). Writes the report of PIPELINE's newest run (default pipelines/vargface.yaml; run
# it first), opens it REPS times (default 5) and prints, per load, the page's render time as
# the page measures it itself (`render_ms` in its self-check: from the start of navigation,
# through parsing the page, uPlot and the data, to the last chart's first draw; `charts_ms`:
# the part the page's own script took) and the wall time of the whole headless Chromium
# process (browser start, load, render, exit), then the medians. Usage: scripts/report-render-time.sh [PIPELINE] [REPS]
# Needs `chromium` on PATH (or FPIPE_CHROMIUM) and a built fpipe (FPIPE, default
# target/debug/fpipe, or $CARGO_TARGET_DIR/debug/fpipe).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
pipeline="${1:-pipelines/vargface.yaml}"
reps="${2:-5}"
fpipe="${FPIPE:-${CARGO_TARGET_DIR:-target}/debug/fpipe}"
chrome="${FPIPE_CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
if [ -z "$chrome" ]; then
    echo "no chromium on PATH; install it (apt-get install chromium) or set FPIPE_CHROMIUM" >&2
    exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$fpipe" report "$pipeline" -o "$out/report.html" --json > "$out/summary.json"
bytes=$(stat -c %s "$out/report.html")
echo "page: $pipeline, $(( bytes / 1024 )) KiB, $(python3 -c "import json,sys; d=json.load(open('$out/summary.json')); print(len(d['plots']), 'plots,', sum(p['series'] for p in d['plots']), 'lines')")"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $("$chrome" --version 2>/dev/null | head -1)"
render=()
charts=()
wall=()
for i in $(seq "$reps"); do
    start=$(date +%s.%N)
    "$chrome" --headless --no-sandbox --disable-gpu --no-first-run --disable-extensions \
        --user-data-dir="$out/profile" --window-size=1280,2400 --dump-dom \
        "file://$out/report.html" > "$out/dom.html" 2> "$out/chrome.log"
    end=$(date +%s.%N)
    ms=$(python3 - "$out/dom.html" <<'PY'
import html, json, re, sys
dom = open(sys.argv[1]).read()
m = re.search(r'<pre id="selfcheck"[^>]*>(.*?)</pre>', dom, re.S)
if not m or not m.group(1).strip():
    sys.exit("the page did not finish rendering")
c = json.loads(html.unescape(m.group(1)))
if c["errors"] or c["drawn"] != c["plots"]:
    sys.exit(f"page errors: {c}")
print(c["render_ms"], c["charts_ms"])
PY
)
    w=$(python3 -c "print(round(($end - $start) * 1000))")
    read -r r c <<< "$ms"
    echo "load $i: page rendered in $r ms (charts script $c ms); chromium process $w ms"
    render+=("$r")
    charts+=("$c")
    wall+=("$w")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "median: page rendered in $(median "${render[@]}") ms (charts script $(median "${charts[@]}") ms); whole headless chromium process $(median "${wall[@]}") ms"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
