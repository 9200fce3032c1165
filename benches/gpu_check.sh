#!/usr/bin/env bash
# Validate a lent CUDA GPU in one command: tests, kernel / training / inference benches, SmolLM2 parity, with
# the results under benches/results/gpu-<device>/. The steps, their time limits and options are described in
# benches/gpu_check.py (or: bash benches/gpu_check.sh --help); --dry-run prints the plan on any machine.
#   bash benches/gpu_check.sh [--dry-run] [--budget-s 570] [--wheels DIR] [--shared DIR] [--out DIR]
# PYTHON picks the interpreter (default: python3, the one that holds torch on the lent machines).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" benches/gpu_check.py "$@"
