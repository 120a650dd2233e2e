#!/usr/bin/env bash
# The one-shot GPU check (issues 15, 21): on a machine with one CUDA GPU, one command, under 10 minutes:
#
#   bench/gpu_check.sh [OUT_DIR] [--device cpu --tiny]
#
# runs the parts of bench/gpu_check.py (bf16 training steps of VGG16 at 640x480 with and without the trunk cache and
# their peak GPU memory; the same for DINOv2 ViT-B/14 at 224x224 and 322x322 with blocks 8-11 trainable and the
# cache at the block boundary, with a refresh's forward; features throughput against the bare backbone; exact search at 10,000 x 6,816 x 32,768
# float16; a 1-GPU torchrun smoke test of `train`), each under its own timeout, and writes one JSON of figures,
# OUT_DIR/gpu_check.json (OUT_DIR: the argument, else $OUT, else ./gpu_check_out). A part that fails or times out is
# recorded as such in the JSON and the script exits 1 after the others have run. `--device cpu --tiny` is a dry run
# of every part at toy sizes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-gpu_check_out}"
if [[ $# -gt 0 && "$1" != --* ]]; then
    out_dir="$1"
    shift
fi
extra=("$@")
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
export DVC_NO_ANALYTICS=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$out_dir"
rm -f "$out_dir"/part_*.json
status=0
# name, seconds: 150 + 120 + 60 + 90 + 120 = 9 minutes at most
for part in train:150 vit:120 features:60 search:90 torchrun:120; do
    name="${part%%:*}"
    limit="${part##*:}"
    echo "== gpu_check $name (timeout ${limit} s)" >&2
    if ! timeout --kill-after=10 "$limit" "$python" -m bench.gpu_check --part "$name" --out "$out_dir" \
            ${extra[@]+"${extra[@]}"}; then
        echo "gpu_check: part $name failed or timed out" >&2
        status=1
    fi
done
"$python" -m bench.gpu_check --merge --out "$out_dir" ${extra[@]+"${extra[@]}"}
exit "$status"
