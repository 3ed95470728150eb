#!/usr/bin/env bash
# Runs benchmarks/embed_gpu.py once on a lent nvidia-h200 machine (its image has Python 3.12 and PyTorch but not
# spatialdata & co., and nothing can be downloaded there). In the session that has the GPU, first, here:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r benchmarks/h200_wheels.txt
#
# then call the device tool's run with command="bash benchmarks/run_embed_gpu.sh", carry=[".whl"],
# timeout_s=600. The figures are printed and written to $OUT/embed_gpu.json and $OUT/embed_gpu.log; the script
# stops itself after ~7.5 minutes (--budget-s), skipping the optional torch.compile parts it cannot finish.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c "import hopt_st.pp._embed, hopt_st.io._tiff, imagecodecs, spatialdata; print('imports ok')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/embed_gpu.py --budget-s 450 "$@" 2>&1 | tee "${OUT:-/tmp}/embed_gpu.log"
