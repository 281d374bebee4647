#!/usr/bin/env bash
# Builds bench/kernel_variants.cu against kernels/perturb.cu once per setting
# of the kernel's tuning knobs (grid-stride or full grid, the fp64 form of the
# normalising division or __fdiv_rn, steps of 12 elements a thread loads at
# once, streaming cache hints, a minimum of resident blocks, a thread's or a
# warp's contiguous elements on the RGB path) and times each on
# this GPU; every variant must compute the same bits. Writes the JSON lines to $1 (default: stdout).
#   bash bench/kernel_variants.sh [bench/results/kernel-variants-<gpu>.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/dev/stdout}
arch=$(python3 -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null \
       || nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
dir=build/kernel-variants
mkdir -p "$dir"
variants=()
if [ -n "${KERNEL_VARIANTS:-}" ]; then  # "GRID F64 STEPS STREAM MINBLOCKS COALESCED;...": a rerun of some settings
    IFS=';' read -ra variants <<< "$KERNEL_VARIANTS"
else  # around the fastest so far (one thread a pack, fp64 division, 2 steps), and the __fdiv_rn baseline
    variants=("1 0 2 0 0 0")
    for coalesced in 0 1; do for steps in 1 2 4; do for stream in 0 1; do
        variants+=("1 1 $steps $stream 0 $coalesced")
    done; done; done
fi
for v in "${variants[@]}"; do
    set -- $v
    nvcc -std=c++17 -O3 -Icsrc -DFREEADV_WITH_CUDA -DFREEADV_FULL_GRID=$1 -DFREEADV_F64_DIVISION=$2 \
        -DFREEADV_RGB_STEPS=$3 -DFREEADV_STREAMING=$4 -DFREEADV_MIN_BLOCKS=$5 -DFREEADV_RGB_COALESCED=${6:-0} -gencode "arch=compute_$arch,code=sm_$arch" \
        bench/kernel_variants.cu kernels/perturb.cu -o "$dir/kv-${v// /-}" &
done
wait
: > "$dir/lines.json"
for v in "${variants[@]}"; do "$dir/kv-${v// /-}" | tee -a "$dir/lines.json"; done
sums=$(python3 -c 'import json, sys; print(len({(l["shape"], l["checksum"]) for l in map(json.loads, open(sys.argv[1]))}))' "$dir/lines.json")
[ "$sums" = 2 ] || { echo "kernel_variants: the variants disagree on the result ($sums checksums for 2 shapes)" >&2; exit 1; }
cp "$dir/lines.json" "$out" 2>/dev/null || cat "$dir/lines.json" > "$out"
echo "kernel_variants: every variant computes the same bits" >&2
