#!/usr/bin/env bash
# The prepared GPU check, run on a GPU machine (it has nvcc, PyTorch and onnxruntime but no
# Rust): `scripts/gpu-bundle.sh` builds fpipe and gpu_check here with `--features cuda` into
# target/gpu-bundle/, which travels with the checkout; then, there, from the repository root:
#   bash scripts/gpu-check.sh [BUNDLE]        (default target/gpu-bundle)
# Each step is timed and bounded; a failing step is reported and the next one runs.
#   (a) one training step of each backbone at batch 8, cuda:0 against the CPU (gpu_check step)
#   (b) grouped and depthwise convolutions at the backbones' shapes, batch 128 (gpu_check conv)
#   (c) the quickstart's stages end to end on cuda:0; the embedding stage rerun with --force
#       must give identical bytes
#   (d) iresnet50 and MobileFaceNet steps at batch 128, 112 px on cuda:0, fpipe against
#       PyTorch (fp32 and AMP bf16) on the same GPU in the same run
#   (e) two training and two shell stages with resources {gpu: 1} under --gpus 2 and under
#       CUDA_VISIBLE_DEVICES=0: which device each stage used
# Total bound: about 9 minutes of steps.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
B="${1:-target/gpu-bundle}"
work="${TMPDIR:-/tmp}/fpipe-gpu-check"
rm -rf "$work" && mkdir -p "$work"
failed=0
step() { # step LABEL SECONDS COMMAND...
    local label=$1 limit=$2
    shift 2
    echo "== $label (limit ${limit}s)"
    local t0=$SECONDS
    if timeout "$limit" "$@"; then
        echo "== $label: ok in $((SECONDS - t0)) s"
    else
        echo "== $label: FAILED (exit $?) after $((SECONDS - t0)) s"
        failed=$((failed + 1))
    fi
}
nvidia-smi -L || true
"$B/fpipe" --version || { echo "no fpipe in $B: run scripts/gpu-bundle.sh first"; exit 2; }

step "(a) training step, cuda:0 vs cpu" 120 "$B/gpu_check" step --batch 8
step "(b) grouped/depthwise convolutions" 90 "$B/gpu_check" conv --batch 128

quick() {
    local p=scripts/gpu-check/quickstart-embed.yaml c="$work/cache-quick"
    "$B/fpipe" run "$p" --cache "$c" --device cuda:0 || return 1
    "$B/fpipe" show "$p" --cache "$c" || return 1
    local first second
    first=$(cd "$("$B/fpipe" out embed -f "$p" --cache "$c")" && sha256sum embeddings.safetensors)
    "$B/fpipe" run "$p" --cache "$c" --device cuda:0 --force embed || return 1
    second=$(cd "$("$B/fpipe" out embed -f "$p" --cache "$c")" && sha256sum embeddings.safetensors)
    echo "embeddings, first run:  $first"
    echo "embeddings, forced rerun: $second"
    [ "$first" = "$second" ]
}
step "(c) quickstart end to end on cuda:0" 150 quick

timing() {
    "$B/gpu_check" time --batch 128 --reps 10 || return 1
    python3 scripts/bench_step_torch_cuda.py --batch 128 --reps 10
}
step "(d) training step timing, fpipe vs PyTorch" 150 timing

slots() {
    local p=scripts/gpu-check/two-gpu-stages.yaml
    for how in "--gpus 2" "CUDA_VISIBLE_DEVICES=0"; do
        local c="$work/cache-slots-${how%% *}"
        echo "-- $how"
        if [ "$how" = "--gpus 2" ]; then
            "$B/fpipe" run "$p" --cache "$c" --device cuda --gpus 2 -j 4
            echo "(exit $?)"
        else
            CUDA_VISIBLE_DEVICES=0 "$B/fpipe" run "$p" --cache "$c" --device cuda -j 4 || return 1
        fi
        for s in shell_a shell_b; do
            d=$("$B/fpipe" out "$s" -f "$p" --cache "$c" 2>/dev/null) && cat "$d/gpu"
        done
        for s in train_a train_b; do
            find "$c" -path "*/logs/$s.log" -exec grep -h "device:" {} + 2>/dev/null | tail -1 | sed "s/^/$s: /"
        done
    done
}
step "(e) GPU slots" 60 slots

echo "gpu-check: $failed step(s) failed"
[ "$failed" -eq 0 ]
