#!/usr/bin/env bash
# `make gpu-check`: every GPU check in one command, kept to one short run
# (GPU_CHECK_BUDGET, below), since GPU time here comes in short runs. It
# builds the extension for this GPU, probes torch's clamp gradient, runs the
# GPU tests (failures again alone), the kernel, train-step
# and loader benchmarks, and writes bench/results/*-<gpu>.json (plus the logs under
# bench/results/gpu-check-<gpu>/), from which `python bench/report.py`
# regenerates the README tables. Each step has its own time limit, so one
# slow or failing step still leaves the others' results. With $OUT set (the
# device tool), everything written is packed there as it is made. Named in
# GPU_CHECK_ONLY only: kernel-variants (+ build-tuned), stem-grad (the
# profile of free-m's extra cost at ResNet-50's stem), train-step-resnet50-stem
# and -stem-compile (free-4 with each way of making its input gradient, graphed,
# and compiled + graphed) and the compare-* runs.
# The whole run keeps to GPU_CHECK_BUDGET seconds (default 480 for the default
# set, 590 when GPU_CHECK_ONLY names steps, under one device call's 600; 0: no
# budget): a step gets at most what is left, and steps that find it spent are
# listed as not run, to be named in the next run's GPU_CHECK_ONLY.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
status=0

gpu=$($PY -c 'import torch; n = torch.cuda.get_device_name(); print(next((w.lower() for w in n.split() if w[:1] in "HABLV" and w[1:2].isdigit()), "gpu"))' 2>/dev/null)
[ -n "$gpu" ] || { echo "gpu-check: torch sees no GPU" >&2; exit 2; }
arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
logs=bench/results/gpu-check-$gpu
mkdir -p "$logs"

publish() {  # results travel back even if a later step runs out of time: one archive, since the device tool
    # returns only a few files ($OUT/gpu-check-<gpu>.tgz: bench/results/*<gpu>* and the logs)
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/gpu-check-$gpu.tgz.partial" bench/results/*"$gpu"* 2>/dev/null && mv "$OUT/gpu-check-$gpu.tgz.partial" "$OUT/gpu-check-$gpu.tgz"
}
# the commit measured (a tree copied to the GPU machine may carry a stale .git): $FREEADV_GIT_COMMIT, or git's
export FREEADV_GIT_COMMIT=${FREEADV_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
only=${GPU_CHECK_ONLY:-}  # space-separated step names to run (a rerun of some steps); empty: the default set
budget=${GPU_CHECK_BUDGET:-$([ -n "$only" ] && echo 590 || echo 480)}
opt_in="kernel-variants stem-grad train-step-resnet50-stem train-step-resnet50-stem-compile"
step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, logs it, records its status
    local name=$1 limit=$2; shift 2
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then echo "=== $name: not in GPU_CHECK_ONLY"; return; fi
    # the method comparisons each take a GPU run of their own, and kernel tuning and the stem profile are
    # studies, not checks: only when named (the default set is sized for one run of at most ~8 minutes)
    if [[ " $opt_in " == *" $name "* || $name == compare-* ]] && [[ " $only " != *" $name "* ]]; then
        echo "=== $name: name it in GPU_CHECK_ONLY"; return
    fi
    if [ "$budget" -gt 0 ]; then
        local left=$((budget - (SECONDS - start)))
        if [ $left -lt 20 ]; then
            echo "=== $name: not run, the ${budget}s budget is spent"
            echo "$name not-run-budget 0s" >> "$logs/status.txt"
            return
        fi
        [ "$limit" -gt $left ] && limit=$left
    fi
    local t0=$SECONDS
    echo "=== [$((SECONDS - start))s] $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$logs/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    echo "$name $rc $((SECONDS - t0))s" >> "$logs/status.txt"  # the seconds size the next run's step list
    [ $rc -eq 0 ] || status=1
    publish
}
{
    echo "command: make gpu-check"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $FREEADV_GIT_COMMIT"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} > "$logs/about.txt"
: > "$logs/status.txt"
cat "$logs/about.txt"

# pure-Python needs the GPU image may lack, from a wheelhouse the caller carried along (.gpu-wheels/:
# pip download pyyaml hypothesis sortedcontainers attrs tqdm); nothing is downloaded here
missing=$($PY - <<'PYEOF'
import importlib.util
print(" ".join(p for m, p in (("yaml", "pyyaml"), ("hypothesis", "hypothesis"), ("tqdm", "tqdm"))
               if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    if [ -d .gpu-wheels ]; then
        step deps 60 $PY -m pip install --no-index --find-links .gpu-wheels $missing
    else
        echo "gpu-check: missing $missing and no .gpu-wheels/ to install them from"
    fi
fi
step build 240 env TORCH_CUDA_ARCH_LIST="$arch" $PY -m pip install --no-build-isolation --no-deps -e .
step clamp-probe 60 $PY bench/clamp_probe.py --json "bench/results/clamp-probe-$gpu.json"
# the CPU equality tests under this machine's torch: they state their clamp mask, so they hold on any torch
step cpu-equality-tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_trainer.py -k "official_loop or clamp_mask"
# the CUDA kernel's tuning knobs, one build per setting (opt-in); if a setting beats the source's defaults,
# the extension is rebuilt with it (FREEADV_KERNEL_FLAGS, recorded by the kernel benchmark) for what follows
step kernel-variants 120 bash bench/kernel_variants.sh "bench/results/kernel-variants-$gpu.jsonl"
best=
[[ " $only " == *" kernel-variants "* ]] && best=$($PY - "bench/results/kernel-variants-$gpu.jsonl" <<'PYEOF' 2>/dev/null
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rows = [r for r in rows if r["shape"].startswith("imagenet")]
b = min(rows, key=lambda r: r["op_in_graph_ms"])
print(" ".join(f"-DFREEADV_{k.upper()}={b.get(k, 0)}" for k in ("full_grid", "f64_division", "rgb_steps", "streaming", "min_blocks", "rgb_coalesced")))
PYEOF
)
if [ -n "$best" ]; then
    echo "fastest kernel setting: $best"
    export FREEADV_KERNEL_FLAGS="$best"
    step build-tuned 120 env TORCH_CUDA_ARCH_LIST="$arch" $PY -m pip install --no-build-isolation --no-deps -e .
fi
step kernels 100 $PY bench/kernels.py --device cuda --json "bench/results/kernels-$gpu.json"
step stem-grad 60 $PY bench/stem_grad.py --json "bench/results/stem-grad-$gpu.json"
step tests 150 $PY -m pytest -m gpu -q -p no:cacheprovider -n 6 --continue-on-collection-errors --junitxml "$logs/tests.xml"
# each failed test again, alone and without xdist (does it fail without the tests run before it in its
# worker?), under faulthandler, and under gdb for a native backtrace where the image has gdb
failed=$($PY - "$logs/tests.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).iter("testcase")
except (OSError, ET.ParseError):
    cases = []
print(" ".join(c.get("classname").replace(".", "/") + ".py::" + c.get("name") for c in cases
               if c.find("failure") is not None or c.find("error") is not None))
PYEOF
)
read -ra failed_ids <<< "$failed"  # test ids hold [brackets]: no globbing
if [ ${#failed_ids[@]} -gt 0 ]; then
    if command -v gdb > /dev/null; then
        step tests-failed-alone 90 gdb -q -batch -ex run -ex bt --args $PY -X faulthandler -m pytest -x -q \
            -p no:cacheprovider -m gpu "${failed_ids[@]}"
    else
        step tests-failed-alone 90 $PY -X faulthandler -m pytest -q -p no:cacheprovider -m gpu "${failed_ids[@]}"
    fi
fi
step train-step-preact-b128 70 $PY bench/train_step.py --model preact_resnet18 --batch-size 128 --precision bf16 \
    --json "bench/results/train-step-preact_resnet18-b128-$gpu.json"
step train-step-resnet50 120 $PY bench/train_step.py --model resnet50 --precision bf16 --steps 10 \
    --json "bench/results/train-step-resnet50-$gpu.json"
# free-m's input gradient made three ways (freeadv_fast/stem.py) in the graphed step, against natural (opt-in)
step train-step-resnet50-stem 100 $PY bench/train_step.py --model resnet50 --precision bf16 --steps 10 \
    --methods natural,free-4 --variants graph --stem-input-grad autograd,subpixel,padded \
    --json "bench/results/train-step-resnet50-stem-$gpu.json"
step train-step-resnet50-stem-compile 240 $PY bench/train_step.py --model resnet50 --precision bf16 --steps 10 \
    --methods natural,free-4 --variants compile+graph --stem-input-grad autograd,subpixel \
    --json "bench/results/train-step-resnet50-stem-compile-$gpu.json"
step train-step-resnet50-fp32 60 $PY bench/train_step.py --model resnet50 --precision fp32 --steps 10 \
    --methods natural,free-4 --json "bench/results/train-step-resnet50-fp32-$gpu.json"
step train-step-preact-b512 40 $PY bench/train_step.py --model preact_resnet18 --batch-size 512 --precision bf16 \
    --methods natural,free-8,official --json "bench/results/train-step-preact_resnet18-b512-$gpu.json"
step train-step-preact-b128-compile 90 $PY bench/train_step.py --model preact_resnet18 --batch-size 128 \
    --precision bf16 --variants compile,compile+graph --methods natural,free-8,official \
    --json "bench/results/train-step-preact_resnet18-b128-compile-$gpu.json"
# ImageNet at other sizes, and the loaders against those step rates, on ImageNet-like files made here from
# Tiny-ImageNet-20 (the caller carries ../shared/datasets/tiny-imagenet-20.tar.gz along as .gpu-data/)
# ResNet-50 at the other sizes of the imagenet-fast-* phases (128 px at batch 256, 288 px at 128), and the
# projected wall time of those presets from the rates at 128, 224 and 288 px
step train-step-resnet50-sizes 120 bash -c "$PY bench/train_step.py --model resnet50 --precision bf16 --steps 10 \
    --image-size 128 --batch-size 256 --methods natural,free-4,fgsm-rs --variants graph \
    --json bench/results/train-step-resnet50-128px-$gpu.json && $PY bench/train_step.py --model resnet50 \
    --precision bf16 --steps 10 --image-size 288 --batch-size 128 --methods natural,free-4,fgsm-rs --variants graph \
    --json bench/results/train-step-resnet50-288px-$gpu.json"
for preset in imagenet-fast-free4-eps4 imagenet-fast-fgsm-eps4; do
    step "projection-$preset" 30 $PY bench/train_step.py --project "$preset" --results \
        "bench/results/train-step-resnet50-128px-$gpu.json" "bench/results/train-step-resnet50-$gpu.json" \
        "bench/results/train-step-resnet50-288px-$gpu.json" --json "bench/results/projection-$preset-$gpu.json"
done
if [ -f .gpu-data/tiny-imagenet-20.tar.gz ]; then
    rm -rf build/imagenet-like
    step imagenet-like 60 $PY bench/make_imagenet_like.py .gpu-data/tiny-imagenet-20.tar.gz build/imagenet-like \
        --limit 3000 --grain 8
    # batches of 64: a timed pass of 46 batches gives the 16 workers more than one round each; nvjpeg decoding
    # in 8 processes of its own, in this process (one GPU decoder behind one lock), then in 4 processes; 224 px
    # first (the size the targets name); the results file is rewritten after each row, so a run stopped by its
    # limit keeps what it measured
    step loader 240 $PY bench/loader.py --data build/imagenet-like --device cuda --image-size 224,128,288 \
        --batch-size 64 --decode-processes 8,0,4 --train-step "bench/results/train-step-resnet50-128px-$gpu.json" \
        --train-step "bench/results/train-step-resnet50-$gpu.json" \
        --train-step "bench/results/train-step-resnet50-288px-$gpu.json" --json "bench/results/loader-$gpu.json"
else
    echo "gpu-check: no .gpu-data/tiny-imagenet-20.tar.gz, so no loader benchmark"
fi
# The paper's claim on real CIFAR-10 (bench/compare.py), each its own run of under 10 minutes, named in
# GPU_CHECK_ONLY; the caller carries ../shared/datasets/cifar10-jpeg.tar.gz along as .gpu-data/. Their rows
# merge with `python bench/report.py --merge ... --out bench/results/compare-cifar10-<gpu>.json`.
if [ -f .gpu-data/cifar10-jpeg.tar.gz ] && [[ " $only " == *" compare-"* ]]; then
    [ -d build/cifar10-jpeg ] || { mkdir -p build/cifar10-jpeg && tar xzf .gpu-data/cifar10-jpeg.tar.gz -C build/cifar10-jpeg; }
    cmp=(--data build/cifar10-jpeg --data-name "CIFAR-10 (JPEG q75 copy)" --cuda-graph --eval-samples 1000)
    step compare-recipe 560 $PY bench/compare.py "${cmp[@]}" --recipe fast-at \
        --json "bench/results/compare-cifar10-$gpu-recipe.json"
    step compare-sweep 560 $PY bench/compare.py "${cmp[@]}" --methods "" --sweep-replays 2,4,8,10 \
        --json "bench/results/compare-cifar10-$gpu-sweep.json"
    step compare-frontier-a 560 $PY bench/compare.py "${cmp[@]}" --methods "" --frontier \
        --frontier-methods natural,fast,free --json "bench/results/compare-cifar10-$gpu-frontier-a.json"
    step compare-frontier-b 560 $PY bench/compare.py "${cmp[@]}" --methods "" --frontier --frontier-methods pgd \
        --json "bench/results/compare-cifar10-$gpu-frontier-b.json"
fi
echo "gpu-check: done in $((SECONDS - start))s; step statuses in $logs/status.txt"
cat "$logs/status.txt"
skipped=$(awk '$2 == "not-run-budget" && $1 != "deps" && $1 != "build" {printf "%s ", $1}' "$logs/status.txt")
[ -z "$skipped" ] || echo "gpu-check: not run within the ${budget}s budget: ${skipped}(on a fresh machine: GPU_CHECK_ONLY=\"deps build ${skipped% }\")"
publish
exit $status
