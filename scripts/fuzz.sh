#!/usr/bin/env bash
# Runs the fuzz loops for longer than the test suite does: the data readers of
# stages/tests/fuzz_readers.rs and the pipeline front end of engine/tests/fuzz_pipeline.rs.
#
#   scripts/fuzz.sh            # 600 s per target (pipeline, pickle, verification-bin, recordio, packed, image)
#   scripts/fuzz.sh 60 pickle  # 60 s, only the data targets whose test name contains `pickle`
#
# Environment: FPIPE_FUZZ_SEED picks another mutation sequence (default fixed, so a run is
# repeatable); FPIPE_FUZZ_MAX_MB is the memory one input may take (default 64).
#
# A mutant that panics, or takes more memory than allowed, fails the test and is saved under
# target/tmp/fuzz/<target>/failure-N/ (the files the reader was given); the input being run
# is always in target/tmp/fuzz/<target>/current/, so one that kills the process (stack
# overflow, allocation failure) can be replayed too. Fix the reader, then turn the input into
# a regression test in stages/tests/data_hostile.rs (a pipeline text that panics is saved as
# target/tmp/fuzz-pipeline-panic-N.yaml and becomes a case in engine/tests/front_end.rs) (build it there with the writers in
# stages/tests/common/mod.rs rather than committing the bytes, where that is practical), so
# that it can never come back.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
filter="${2:-fuzz_}"
export FPIPE_FUZZ_SECONDS="$seconds"
if [ -z "${2:-}" ] || [ "$filter" = pipeline ]; then
    cargo test -p fpipe-engine --test fuzz_pipeline -- --nocapture
fi
[ "$filter" = pipeline ] && exit 0
cargo test -p fpipe-stages --test fuzz_readers -- --nocapture --test-threads=1 "$filter"
