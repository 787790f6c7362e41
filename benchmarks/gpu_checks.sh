#!/usr/bin/env bash
# Every CUDA check and GPU table in one go, for a machine with an NVIDIA GPU (a few minutes on an H100/H200).
#
#   bash benchmarks/gpu_checks.sh OUT_DIR
#
# 1. the CUDA-only tests (strategies equal in bf16, no host syncs, bf16 training and cached generation);
# 2. step_time.py's GPU tables (step time and N-scaling in bf16, each MoPE row also with dispatch
#    forced to masked and grouped; peak memory);
# 3. a torch.profiler table of the MoPE and LoRA steps on CUDA with the kernels launched per step;
# 4. dispatch_calibration.py on CUDA (masked / sorted / grouped per shape);
# 5. inference_time.py on CUDA (forward latency, KV-cached generation).
# Each step has its own time limit, so one that hangs leaves the others' results in OUT_DIR.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
log="$out/gpu_checks.log"  # every step's output
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 150 "$py" -m pytest -q -p no:cacheprovider -rs -k "cuda or host_sync" \
    tests/test_dispatch.py tests/test_gates_sparse.py tests/test_gates_more.py >"$log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|error" "$log" | tail -3
timeout 180 "$py" benchmarks/step_time.py --sections gpu --dispatch masked,grouped --out "$out/gpu" >>"$log" 2>&1
echo "step_time exit $?"
mv "$out/gpu/step_time.md" "$out/step_time_gpu.md"
mv "$out/gpu/step_time.json" "$out/step_time_gpu.json"
timeout 60 "$py" benchmarks/step_time.py --profile --profile-device cuda --out "$out" >>"$log" 2>&1
echo "profile exit $?"
timeout 90 "$py" benchmarks/dispatch_calibration.py --device cuda --out "$out" >>"$log" 2>&1
echo "calibration exit $?"
rm -f "$out/dispatch_calibration_cuda.json"  # the .md holds every number; the device returns 8 files at most
timeout 90 "$py" benchmarks/inference_time.py --device cuda --out "$out" >>"$log" 2>&1
echo "inference exit $?"
rmdir "$out/gpu" 2>/dev/null
ls "$out"
