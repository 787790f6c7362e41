#!/usr/bin/env bash
# Every CUDA check and GPU table in one go, for a machine with an NVIDIA GPU (a few minutes on an H100/H200).
#
#   bash benchmarks/gpu_checks.sh prepare                # here, first: the wheels the device lacks -> .whl
#   bash benchmarks/gpu_checks.sh OUT_DIR [STEP ...]     # there: steps in the order given (default: all, as listed)
#   BASELINE=DIR bash benchmarks/gpu_checks.sh OUT_DIR step baseline   # also the step table of an older mope
#   BUDGET=540 bash benchmarks/gpu_checks.sh ...         # all steps within 540 s: each step's limit shrinks to
#                                                          what is left, and a step with under 20 s left is skipped
#
# On a lent machine (one call, .whl carried; device time is short, so the figures come first):
#   BUDGET=540 bash benchmarks/gpu_checks.sh "$OUT" step profile inference compiled tests host
# prepare: the lent machines' image has Python 3.12, torch 2.11 and Triton 3.6 but transformers 5.17 and
#          numpy 2.5 (Triton 3.6's interpreter, which the host step uses, fails with numpy >= 2.4:
#          mope.kernels.interpreter); .whl holds peft, transformers and numpy 2.3 for Python 3.12,
#          and this script installs them there into /tmp/site when .whl is present.
# tests:       the CUDA-only tests (strategies equal in bf16, no host syncs, bf16 training and cached generation;
#              the Triton kernels against masked and the torch router, and compiled with inductor against eager:
#              tests/test_triton_kernels.py)
# step:        step_time.py's GPU tables (step time and N-scaling in bf16, MoPE rows also with dispatch forced to
#              DISPATCH, default masked,grouped,triton, DISPATCH= for none; peak memory) -> step_time_h100.md/.json
#              (every file is named by the GPU's model: h100, h200, ...; see step_time.machine_tag)
# profile:     torch.profiler table of the MoPE and LoRA steps on CUDA, kernels launched per step (the MoPE step
#              also with dispatch forced to each of KERNEL_DISPATCH, default triton), and each Triton kernel variant
#              compiled (warps, stages, shared memory, registers, spills) -> step_time_profile_h100.md
# calibration: dispatch_calibration.py on CUDA (masked / sorted / grouped / triton per shape) -> dispatch_calibration_cuda.md
# inference:   inference_time.py on CUDA (forward latency, KV-cached generation; token-level MoPE rows also with
#              dispatch forced to each of KERNEL_DISPATCH) -> inference_time_h100.md
# host:        step_time.py's and inference_time.py's host tables on this machine's CPU (TRITON_INTERPRET=1, CUDA
#              hidden: Triton launches run nothing), the host work of an eager step and of a decoded token that
#              the GPU rows above are bound by when it exceeds the GPU's -> step_time_host_gpu_machine_cpu.md,
#              inference_time_host_gpu_machine_cpu.md
# (the device returns 8 files at most: `tests step profile inference host compiled` writes 8 with the log)
# compiled:    LoRA r=16 and MoPE top-2 of 8 (and MoPE with each of KERNEL_DISPATCH): eager, torch.compile,
#              CUDA graphs, bf16 autocast -> step_time_compiled_h100.md
# KERNEL_DISPATCH (default triton; KERNEL_DISPATCH= for none): the kernel strategies that profile, inference and
#              compiled add; auto keeps its torch picks on CUDA until these figures say a kernel strategy pays.
# sharded:     (only when named: needs deepspeed) mope.train on one GPU under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (needs deepspeed==0.19.8) and with
#              training.compile (reduce-overhead: CUDA graphs), then FSDP2 and ZeRO-3 on a 4-bit base (bf16; needs
#              bitsandbytes): each run's summary.json -> sharded/<kind>/
#              (two-process runs need two GPUs: tests/training/test_sharded.py runs them on CPU processes)
# baseline:    step's GPU tables with the mope package in BASELINE=DIR (e.g. `git archive REV mope | tar -x -C DIR`):
#              the same machine's before figures -> step_time_h100_baseline.md
# Each step has its own time limit, so one that hangs leaves the others' results in OUT_DIR.
set -u
out=${1:?usage: gpu_checks.sh prepare | OUT_DIR [STEP ...]}
shift
py=${PYTHON:-python3}
if [ "$out" = prepare ]; then
    # pure-Python wheels but numpy's; versions: what this project tests with (transformers 5.24, not 5.25:
    # 5.25 needs huggingface_hub 2.4, which needs packages the image lacks)
    mkdir -p .whl
    pip=(${PIP:-.venv/bin/python -m pip})
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        peft==0.21.2 transformers==5.24.0 numpy==2.3.5 || exit
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >>.git/info/exclude; }
    du -sh .whl
    exit 0
fi
steps=${*:-tests step profile calibration inference host compiled}
mkdir -p "$out"
log="$out/gpu_checks.log" # every step's output
dispatch=${DISPATCH-masked,grouped,triton}
kernels=${KERNEL_DISPATCH-triton}
budget=${BUDGET:-0} # seconds for all steps (0: none)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels=${WHEELS:-.whl} # what prepare downloaded, installed when present
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl ||
        exit
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$py" -c "import sys, numpy, torch, transformers, peft; import triton; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" | tee -a "$log"
limit() { # limit SECONDS: a step's own time limit, or what is left of BUDGET if less
    local left=$((budget - SECONDS))
    if [ "$budget" -gt 0 ] && [ "$left" -lt "$1" ]; then echo $((left > 1 ? left : 1)); else echo "$1"; fi
}
for step in $steps; do
    start=$SECONDS
    if [ "$budget" -gt 0 ] && [ $((budget - SECONDS)) -lt 20 ]; then
        echo "$step skipped: under 20 s of BUDGET=$budget left" | tee -a "$log"
        continue
    fi
    case $step in
    tests)
        timeout "$(limit 150)" "$py" -m pytest -q -p no:cacheprovider -rs -k "cuda or host_sync" \
            tests/test_dispatch.py tests/routing/test_gate_battery.py tests/test_precision.py >>"$log" 2>&1
        echo "tests exit $?"
        # 360 s: each kernel specialisation compiles once (75 distinct launches under the interpreter, more on
        # CUDA where bf16 experts take bf16 tl.dot; compiling 71 took ~50 s on CPU), three tests run inductor
        timeout "$(limit 360)" "$py" -m pytest -q -p no:cacheprovider -rs tests/test_triton_kernels.py >>"$log" 2>&1
        echo "triton tests exit $?"
        grep -E "passed|failed" "$log" | tail -2
        ;;
    step)
        timeout "$(limit 180)" "$py" benchmarks/step_time.py --sections gpu --dispatch "$dispatch" --out "$out" >>"$log" 2>&1
        echo "step exit $?"
        ;;
    baseline)
        PYTHONPATH="${BASELINE:?baseline needs BASELINE=DIR}:$PYTHONPATH" timeout "$(limit 180)" "$py" benchmarks/step_time.py \
            --sections gpu --dispatch "$dispatch" --out "$out/baseline" >>"$log" 2>&1
        echo "baseline exit $?"
        for md in "$out"/baseline/step_time_*.md; do [ -e "$md" ] && mv "$md" "$out/$(basename "$md" .md)_baseline.md"; done
        ;;
    profile)
        timeout "$(limit 90)" "$py" benchmarks/step_time.py --profile --profile-device cuda --dispatch "$kernels" --out "$out" >>"$log" 2>&1
        echo "profile exit $?"
        ;;
    calibration)
        timeout "$(limit 90)" "$py" benchmarks/dispatch_calibration.py --device cuda --out "$out" >>"$log" 2>&1
        echo "calibration exit $?"
        rm -f "$out/dispatch_calibration_cuda.json" # the .md holds every number; the device returns 8 files at most
        ;;
    inference)
        timeout "$(limit 120)" "$py" benchmarks/inference_time.py --device cuda --dispatch "$kernels" --out "$out" >>"$log" 2>&1
        echo "inference exit $?"
        rm -f "$out"/inference_time_*.json # the .md holds every number
        ;;
    host)
        TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= timeout "$(limit 120)" "$py" benchmarks/step_time.py --sections host \
            --dispatch masked,triton --name step_time_host_gpu_machine_cpu --out "$out" >>"$log" 2>&1
        echo "host exit $?"
        TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= timeout "$(limit 60)" "$py" benchmarks/inference_time.py --host \
            --dispatch masked,triton --out "$out/host" >>"$log" 2>&1
        echo "inference host exit $?"
        mv "$out/host/inference_time_host_cpu.md" "$out/inference_time_host_gpu_machine_cpu.md"
        rm -rf "$out/host" "$out/step_time_host_gpu_machine_cpu.json" # the .md holds every number
        ;;
    compiled)
        timeout "$(limit 360)" "$py" benchmarks/step_time.py --sections gpu_compiled --dispatch "$kernels" --out "$out" >>"$log" 2>&1
        echo "compiled exit $?"
        rm -f "$out"/step_time_compiled_*.json # only the .md is kept (it holds every number), as for calibration
        ;;
    sharded)
        tiny=(--recipe recipes/offline/tiny_llama_lm.yaml training.max_steps=4 training.save_every=null data.max_examples=64)
        launch=("$py" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no)
        fsdp2=(--use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
            --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer)
        nf4=("model.quantization={bits: 4, compute_dtype: bfloat16}" training.mixed_precision=bf16) # needs bitsandbytes
        for kind in fsdp2 zero2 zero3 compiled fsdp2-nf4 zero3-nf4; do
            case $kind in
            fsdp2) flags=("${fsdp2[@]}") extra=() ;;
            zero2) flags=(--use_deepspeed --zero_stage 2) extra=() ;;
            zero3) flags=(--use_deepspeed --zero_stage 3) extra=() ;;
            fsdp2-nf4) flags=("${fsdp2[@]}") extra=("${nf4[@]}") ;;
            zero3-nf4) flags=(--use_deepspeed --zero_stage 3) extra=("${nf4[@]}") ;;
            compiled) flags=() extra=(training.compile=true training.compile_mode=reduce-overhead) ;;
            esac
            timeout "$(limit 240)" "${launch[@]}" "${flags[@]}" -m mope.train "${tiny[@]}" "${extra[@]}" \
                training.output_dir="$out/sharded/$kind" >>"$log" 2>&1
            echo "sharded $kind exit $?"
            rm -rf "$out/sharded/$kind/bundle" "$out/sharded/$kind/checkpoints" # summary.json says it all
        done
        ;;
    *) echo "unknown step '$step' (tests step profile calibration inference host compiled sharded baseline)" ;;
    esac
    echo "$step took $((SECONDS - start)) s" | tee -a "$log"
done
rm -rf "$out/baseline"
ls "$out"
