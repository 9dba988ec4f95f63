#!/usr/bin/env bash
# Runs the fuzz loops of stages/tests/fuzz_readers.rs for longer than the test suite does.
#
#   scripts/fuzz.sh            # 600 s per target (pickle, verification-bin, recordio, packed, image)
#   scripts/fuzz.sh 60 pickle  # 60 s, only the targets whose test name contains `pickle`
#
# Environment: FPIPE_FUZZ_SEED picks another mutation sequence (default fixed, so a run is
# repeatable); FPIPE_FUZZ_MAX_MB is the memory one input may take (default 64).
#
# A mutant that panics, or takes more memory than allowed, fails the test and is saved under
# target/tmp/fuzz/<target>/failure-N/ (the files the reader was given); the input being run
# is always in target/tmp/fuzz/<target>/current/, so one that kills the process (stack
# overflow, allocation failure) can be replayed too. Fix the reader, then turn the input into
# a regression test in stages/tests/data_hostile.rs (build it there with the writers in
# stages/tests/common/mod.rs rather than committing the bytes, where that is practical), so
# that it can never come back.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
filter="${2:-fuzz_}"
export FPIPE_FUZZ_SECONDS="$seconds"
cargo test -p fpipe-stages --test fuzz_readers -- --nocapture --test-threads=1 "$filter"
