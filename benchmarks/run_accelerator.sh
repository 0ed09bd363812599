#!/usr/bin/env bash
# The one command to run on a machine with a GPU or TPU (tried on CPU first, where it runs the
# XLA paths and says so): the kernel tests on the compiled kernels, the kernel benchmarks, each
# method's routed inference and training step; one report, benchmarks/accelerator_<device>.md.
#   bash benchmarks/run_accelerator.sh            # full sizes
#   bash benchmarks/run_accelerator.sh --quick    # small sizes, fewer repeats
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
exec "$PYTHON" scripts/run_accelerator.py "$@"
