#!/usr/bin/env bash
# fpipe against DVC and Snakemake on identical shell DAGs (see benches/engine_peers.py).
# Installs the peers into .venv-engine-peers/ on first use. Results: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-engine-peers}
if [ ! -x "$VENV/bin/dvc" ] || [ ! -x "$VENV/bin/snakemake" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q dvc==3.67.1 snakemake==9.27.1
fi
cargo build --release --locked
"$VENV/bin/dvc" --version | sed 's/^/dvc /'
"$VENV/bin/snakemake" --version | sed 's/^/snakemake /'
python3 benches/engine_peers.py --fpipe "$PWD/target/release/fpipe" --venv "$PWD/$VENV" "$@"
