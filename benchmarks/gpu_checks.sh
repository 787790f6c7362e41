#!/usr/bin/env bash
# Every CUDA check and GPU table in one go, for a machine with an NVIDIA GPU (a few minutes on an H100/H200).
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [STEP ...]     # steps: tests step profile calibration inference compiled
#
# tests:       the CUDA-only tests (strategies equal in bf16, no host syncs, bf16 training and cached generation)
# step:        step_time.py's GPU tables (step time and N-scaling in bf16, MoPE rows also with dispatch forced to
#              masked and grouped; peak memory) -> step_time_gpu.md/.json
# profile:     torch.profiler table of the MoPE and LoRA steps on CUDA, kernels launched per step
# calibration: dispatch_calibration.py on CUDA (masked / sorted / grouped per shape)
# inference:   inference_time.py on CUDA (forward latency, KV-cached generation)
# compiled:    LoRA r=16 and MoPE top-2 of 8, eager and under torch.compile -> step_time_gpu_compiled.md
# Each step has its own time limit, so one that hangs leaves the others' results in OUT_DIR.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [STEP ...]}
shift
steps=${*:-tests step profile calibration inference compiled}
want() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$out"
py=${PYTHON:-python3}
log="$out/gpu_checks.log" # every step's output
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if want tests; then
    timeout 150 "$py" -m pytest -q -p no:cacheprovider -rs -k "cuda or host_sync" \
        tests/test_dispatch.py tests/test_gates_sparse.py tests/test_gates_more.py >>"$log" 2>&1
    echo "tests exit $?"
    grep -E "passed|failed" "$log" | tail -2
fi
if want step; then
    timeout 180 "$py" benchmarks/step_time.py --sections gpu --dispatch masked,grouped --out "$out/step" >>"$log" 2>&1
    echo "step exit $?"
    mv "$out/step/step_time.md" "$out/step_time_gpu.md" && mv "$out/step/step_time.json" "$out/step_time_gpu.json"
fi
if want profile; then
    timeout 60 "$py" benchmarks/step_time.py --profile --profile-device cuda --out "$out" >>"$log" 2>&1
    echo "profile exit $?"
fi
if want calibration; then
    timeout 90 "$py" benchmarks/dispatch_calibration.py --device cuda --out "$out" >>"$log" 2>&1
    echo "calibration exit $?"
    rm -f "$out/dispatch_calibration_cuda.json" # the .md holds every number; the device returns 8 files at most
fi
if want inference; then
    timeout 90 "$py" benchmarks/inference_time.py --device cuda --out "$out" >>"$log" 2>&1
    echo "inference exit $?"
fi
if want compiled; then
    timeout 200 "$py" benchmarks/step_time.py --sections gpu_compiled --out "$out/compiled" >>"$log" 2>&1
    echo "compiled exit $?"
    mv "$out/compiled/step_time.md" "$out/step_time_gpu_compiled.md"
fi
rm -rf "$out/step" "$out/compiled"
ls "$out"
