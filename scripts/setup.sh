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
#   with apt-get and they are missing (tests/apps/test_web.py skips without them).
# shellcheck shell=bash

# The extras the quickstart and the whole test suite need (executorch is left out: it pulls torchao,
# which transformers then imports at every start; its tests skip without it).
_SETUP_EXTRAS="test,app,export"

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
    fi
    if [[ "${1:-}" == tests ]]; then
        _setup_browser
    fi
}

_setup_main "$@"
