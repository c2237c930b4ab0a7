# The Python environment the README's two commands run in; sourced by scripts/quickstart.sh and
# scripts/test.sh (`source scripts/setup.sh [tests]`), from the checkout's root. It says what it does.
#
# Which environment (the first that applies):
#   1. an active virtual or conda environment other than the checkout's .venv (VIRTUAL_ENV /
#      CONDA_PREFIX): yours, used as it is; nothing is installed into it. If it lacks the project
#      or torch, this stops and prints the pip command to run;
#   2. the checkout's .venv, created here if missing, then kept in step with pyproject.toml:
#      - torch first, unless it imports already (a GPU machine keeps its CUDA build): torch==2.13.0
#        (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for PyTorch's CPU wheels where no
#        local one is found: a plain `pip install torch` on Linux is the multi-GB CUDA build);
#      - then `pip install -e ".[test,app,export]"` with torch pinned to the installed one (an extra
#        must not replace it), skipped while .venv/.minigpt-setup holds the hash of pyproject.toml
#        and the checkout's path, so a second call installs nothing.
#   With `tests`: Debian's chromium + chromium-driver for the browser test, when running as root
#   with apt-get and they are missing (tests/apps/test_web.py skips without them); and, into .venv,
#   llama.cpp for the GGUF tests (tests/training/saved/test_runtimes.py skips without it), per
#   MINIGPT_LLAMA_CPP: 1 builds it when missing (minutes, once), 0 never installs it, unset installs
#   it only when pip's cache already holds the wheel built before (seconds). Also for `tests` only, into .venv:
#   deepspeed (the ZeRO-2/3 tests) and ExecuTorch's runtime (the portable .pte test), see below.
# shellcheck shell=bash

# The extras the quickstart and the whole test suite need (executorch is left out: it pulls torchao,
# which transformers then imports at every start; its tests skip without it).
_SETUP_EXTRAS="test,app,export"

# llama-cpp-python builds llama.cpp from source: PyPI has no wheel that runs on Debian 12's glibc and
# libstdc++. Built minimal: the library and one CPU backend only (no tools, tests, examples, server,
# nor the multimodal library the bindings load only for image chat), for any x86-64 CPU with AVX2
# rather than -march=native, because the wheel is cached and reused on other machines. Measured: 14
# min at nice 19 on 2 cores shared with other jobs (load average 6). pip caches the built wheel by the
# sdist's URL (not by these arguments), so a second install of this version takes 4 s.
_SETUP_LLAMA_CPP_NAME="llama_cpp_python"
_SETUP_LLAMA_CPP_VERSION="0.3.36"
_SETUP_LLAMA_CPP_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF \
-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"

# Packages only the suite needs, installed by `tests` into .venv and not by the quickstart:
# - deepspeed: once installed, accelerate imports it at every save_pretrained, and its import prints a
#   "Setting accelerator to CPU" warning on a machine without a GPU: not in a newcomer's first run.
# - executorch without its declared dependencies, which pull torchao, coremltools, scikit-learn and
#   pandas: the portable export and its runtime need only ruamel.yaml and tabulate besides.
# - torchao, which XNNPACK's partitioner imports, beside .venv's packages (in .venv/xnnpack-torchao):
#   once importable, transformers imports it at every model load (+0.4 s) and its import prints
#   "Failed to load" for its CUDA libraries, so only the XNNPACK export test puts it on PYTHONPATH.
_SETUP_TEST_PACKAGES=("deepspeed==0.19.8")
_SETUP_EXECUTORCH=("executorch==1.5.1" "ruamel.yaml" "tabulate")
_SETUP_TORCHAO="torchao==0.18.0"

_setup_say() { printf 'setup: %s\n' "$*"; }

_setup_fail() {
    printf 'error: %s\n' "$*" >&2
    return 1
}

# An environment is complete when it holds this project (any install of it) and torch.
_setup_complete() {
    python -c "import importlib.metadata as m, importlib.util as u; m.version('minigpt-hf'); assert u.find_spec('torch')" \
        2>/dev/null
}

_setup_venv() {
    local venv="$PWD/.venv"
    local stamp_file="$venv/.minigpt-setup"
    local stamp
    stamp="$(python3 -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())') $PWD"
    if [[ ! -x "$venv/bin/python" ]]; then
        _setup_say "creating a virtual environment in .venv (python3 -m venv)"
        python3 -m venv "$venv" || _setup_fail "python3 -m venv failed; on Debian/Ubuntu: apt-get install python3-venv" \
            || return 1
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] && _setup_complete; then
        _setup_say "using .venv (up to date with pyproject.toml)"
        return 0
    fi
    if python -c "import torch" 2>/dev/null; then
        _setup_say "keeping torch $(python -c 'import torch; print(torch.__version__)') in .venv"
    else
        local where="no CUDA GPU found"
        command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && where="CUDA GPU found"
        _setup_say "installing torch==2.13.0 into .venv ($where${TORCH_INDEX_URL:+, from $TORCH_INDEX_URL})"
        python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} || return 1
    fi
    local torch_version
    torch_version="$(python -c 'import torch; print(torch.__version__)')"
    _setup_say "installing the project and its extras into .venv (pip install -e \".[$_SETUP_EXTRAS]\", a few minutes)"
    python -m pip install --quiet -e ".[$_SETUP_EXTRAS]" "torch==$torch_version" || return 1
    echo "$stamp" >"$stamp_file"
}

_setup_browser() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return 0
    fi
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
        _setup_say "no chromium/chromedriver (not root with apt-get): the browser test will skip"
        return 0
    fi
    _setup_say "installing Debian's chromium and chromium-driver for the browser test (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
        || _setup_say "apt-get could not install chromium: the browser test will skip"
}

_setup_llama_cpp() {
    local want="${MINIGPT_LLAMA_CPP:-}"
    if [[ "$want" == 0 ]] || python -c "import importlib.util as u; assert u.find_spec('llama_cpp')" 2>/dev/null; then
        return 0
    fi
    if [[ "$want" != 1 ]] \
        && [[ -z "$(python -m pip cache list "$_SETUP_LLAMA_CPP_NAME-$_SETUP_LLAMA_CPP_VERSION" 2>/dev/null \
            | grep -F "$_SETUP_LLAMA_CPP_NAME")" ]]; then
        _setup_say "no llama.cpp: its GGUF tests will skip (MINIGPT_LLAMA_CPP=1 builds it, minutes, once)"
        return 0
    fi
    _setup_say "installing llama-cpp-python==$_SETUP_LLAMA_CPP_VERSION into .venv (a build from source unless cached)"
    CMAKE_ARGS="$_SETUP_LLAMA_CPP_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        python -m pip install --quiet "$_SETUP_LLAMA_CPP_NAME==$_SETUP_LLAMA_CPP_VERSION" \
        || _setup_say "llama-cpp-python did not install: the llama.cpp tests will skip"
}

_setup_test_packages() {
    if ! python -c "import deepspeed" >/dev/null 2>&1; then
        _setup_say "installing ${_SETUP_TEST_PACKAGES[*]} into .venv for the suite"
        python -m pip install --quiet "${_SETUP_TEST_PACKAGES[@]}" \
            || _setup_say "deepspeed did not install: the ZeRO-2/3 tests will skip"
    fi
    if ! python -c "from executorch.runtime import Runtime" >/dev/null 2>&1; then
        _setup_say "installing ${_SETUP_EXECUTORCH[*]} into .venv for the suite (executorch without its dependencies)"
        python -m pip install --quiet --no-deps "${_SETUP_EXECUTORCH[@]}" \
            || _setup_say "executorch did not install: the ExecuTorch tests will skip"
    fi
    if [[ ! -d .venv/xnnpack-torchao/torchao ]]; then
        _setup_say "installing $_SETUP_TORCHAO into .venv/xnnpack-torchao for the ExecuTorch XNNPACK test"
        python -m pip install --quiet --no-deps --target .venv/xnnpack-torchao "$_SETUP_TORCHAO" \
            || _setup_say "torchao did not install: the ExecuTorch XNNPACK test will skip"
    fi
}

_setup_main() {
    local active="${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"
    if [[ -n "$active" && "$(realpath "$active")" != "$(realpath -m "$PWD/.venv")" ]]; then
        if ! _setup_complete; then
            _setup_fail "the active environment $active lacks this project or torch; install them" \
                "(pip install torch==2.13.0 && pip install -e \".[$_SETUP_EXTRAS]\"), or deactivate it to use .venv"
            return 1
        fi
        _setup_say "using the active environment $active as it is"
    else
        _setup_venv || return 1
        if [[ "${1:-}" == tests ]]; then
            _setup_test_packages
            _setup_llama_cpp
        fi
    fi
    if [[ "${1:-}" == tests ]]; then
        _setup_browser
    fi
}

_setup_main "$@"
