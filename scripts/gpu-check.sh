#!/usr/bin/env bash
# The GPU check (issue 16): every GPU test and benchmark, each under its time cap, in at most
# 8 minutes on an H100/H200; `--dry-run` runs the same steps on the CPU with tiny shapes.
# The steps and the budget table are in scripts/gpu_check.py; docs/benchmarks.md says how to run it.
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's venv where there is one (this machine); the lent GPU machine's own Python, with
# its CUDA torch, elsewhere.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
