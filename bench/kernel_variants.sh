#!/usr/bin/env bash
# Builds bench/kernel_variants.cu against kernels/perturb.cu once per setting
# of the kernel's tuning knobs (bytes of x per pack, grid-stride or full grid,
# uint8 quotient table) and times each on this GPU; every variant must
# compute the same bits. Writes the JSON lines to $1 (default: stdout).
#   bash bench/kernel_variants.sh [bench/results/kernel-variants-<gpu>.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/dev/stdout}
arch=$(python3 -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null \
       || nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
dir=build/kernel-variants
mkdir -p "$dir"
variants=()
for pack in 4 16; do for grid in 0 1; do for lut in 0 1; do variants+=("$pack $grid $lut"); done; done; done
for v in "${variants[@]}"; do
    set -- $v
    nvcc -std=c++17 -O3 -Icsrc -DFREEADV_WITH_CUDA -DFREEADV_X_PACK_BYTES=$1 -DFREEADV_FULL_GRID=$2 \
        -DFREEADV_U8_LUT=$3 -gencode "arch=compute_$arch,code=sm_$arch" bench/kernel_variants.cu kernels/perturb.cu \
        -o "$dir/kv-$1-$2-$3" &
done
wait
: > "$dir/lines.json"
for v in "${variants[@]}"; do set -- $v; "$dir/kv-$1-$2-$3" | tee -a "$dir/lines.json"; done
sums=$(python3 -c 'import json, sys; print(len({(l["shape"], l["checksum"]) for l in map(json.loads, open(sys.argv[1]))}))' "$dir/lines.json")
[ "$sums" = 2 ] || { echo "kernel_variants: the variants disagree on the result ($sums checksums for 2 shapes)" >&2; exit 1; }
cp "$dir/lines.json" "$out" 2>/dev/null || cat "$dir/lines.json" > "$out"
echo "kernel_variants: every variant computes the same bits" >&2
