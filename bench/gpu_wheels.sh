#!/usr/bin/env bash
# The wheels a lent GPU machine (torch 2.11, transformers 5.17, peft 0.21 there; x86-64, Python 3.12) needs
# for the benches, downloaded here into folders that .git/info/exclude ignores, each under the 64 MiB a
# device call may carry. Run from the repository root:
#
#   bash bench/gpu_wheels.sh            # .whl: transformers 5.24 + what train.py/infer.py import (~26 MB)
#   bash bench/gpu_wheels.sh bnb        # .wbnb: bitsandbytes (43 MB; --quantization 4bit)
#   bash bench/gpu_wheels.sh fla        # .wfla1: tilelang (48 MB); .wfla2: fla 0.6.0, apache-tvm-ffi,
#                                       #   torch-c-dlpack-ext, z3-solver (33 MB; issue 31: fla on Hopper, Triton 3.6)
#   bash bench/gpu_wheels.sh data       # .bench/shared: ../shared without its hooks (35 MB; the benches' --shared)
#
# On the machine, each folder in a call of its own while it is warm (files left there stay between calls):
#   python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# (the same --target for every folder; carry [".whl", ".bench"] with the data, or one wheel folder alone).
set -euo pipefail
cd "$(dirname "$0")/.."
get() {  # folder, requirement...
    local folder=$1; shift
    grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d "$folder" "$@"
    du -sh "$folder"
}
case "${1:-base}" in
    base)
        get .whl transformers==5.24.0 swanlab==0.10.3 rapidfuzz pykatex==0.1.1 orjson platformdirs pydantic-settings \
            "pydantic~=2.0" pydantic-core==2.50.5 annotated-types "typing-extensions>=4.16" typing-inspection pyecharts \
            prettytable wcwidth "pyroaring<1.0.4" watchdog python-dotenv
        python3 -m pip wheel -q --no-deps pwinput -w .whl  # an sdist only: built here (pure Python)
        ;;
    bnb) get .wbnb "bitsandbytes>=0.50" ;;
    data)
        grep -qx "/.bench/" .git/info/exclude 2>/dev/null || echo "/.bench/" >> .git/info/exclude
        chmod -R u+w .bench/shared 2>/dev/null || true  # ../shared is read-only, and so is its copy
        rm -rf .bench/shared && mkdir -p .bench && cp -r ../shared .bench/shared && chmod -R u+w .bench/shared
        rm -rf .bench/shared/hooks
        du -sh .bench
        ;;
    fla)
        get .wfla1 tilelang==0.1.15
        # tilelang 0.1.15 pins apache-tvm-ffi >=0.1.11,<0.1.13 and z3-solver >=4.13,<4.15.5 (--no-deps checks nothing);
        # its other needs (cloudpickle, ml-dtypes, psutil, tqdm) and fla-core's einops are in the machine's image
        get .wfla2 flash-linear-attention==0.6.0 fla-core==0.6.0 "apache-tvm-ffi>=0.1.11,<0.1.13" torch-c-dlpack-ext \
            "z3-solver>=4.13,<4.15.5"
        ;;
    *) echo "usage: bash bench/gpu_wheels.sh [base|bnb|fla|data]" >&2; exit 2 ;;
esac
