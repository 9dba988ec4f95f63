#!/bin/sh
# Side-by-side benchmark of fpipe's data side and its peers on 2 cores (docs/benchmarks.md).
# Needs the two Python environments described in stages/tests/golden/make_golden.py:
#   PY=.venv-data/bin/python  PY_MX=.venv-data-mx/bin/python  sh stages/examples/bench_data.sh
set -e
DIR=${DIR:-/tmp/fpipe-bench-data}
PY=${PY:-.venv-data/bin/python}
PY_MX=${PY_MX:-.venv-data-mx/bin/python}
# The dev profile of this workspace compiles fpipe-stages and all dependencies at opt-level 3
# (with debug assertions and overflow checks on, so these numbers are conservative).
cargo build -q -p fpipe-stages --example bench_data
BIN=${CARGO_TARGET_DIR:-target}/debug/examples/bench_data
RAYON_NUM_THREADS=2 taskset -c 0,1 "$BIN" "$DIR"
OMP_NUM_THREADS=2 taskset -c 0,1 "$PY" stages/examples/bench_data.py "$DIR" align roc
OMP_NUM_THREADS=2 MXNET_CPU_WORKER_NTHREADS=2 taskset -c 0,1 "$PY_MX" stages/examples/bench_data.py "$DIR" recordio
