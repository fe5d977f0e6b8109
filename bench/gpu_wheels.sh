#!/usr/bin/env bash
# The wheels of bench/gpu_wheels.txt for CPython 3.12 on x86-64 Linux, into .whl/ (ignored by git), plus
# .whl/env.sh, for a GPU host that has PyTorch but no package registry.
#
# Here, from the repository's root:   bash bench/gpu_wheels.sh
# There, from the repository's root:  . .whl/env.sh && HF_HUB_OFFLINE=1 python3 bench/gpu_check.py
# env.sh installs the wheels into a scratch folder and puts it and the repository on PYTHONPATH.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl -r bench/gpu_wheels.txt
cat > .whl/env.sh <<'EOS'
# Source this on the GPU host: installs the wheels into a scratch folder.
VLA_WHEEL_SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$VLA_WHEEL_SITE" .whl/*.whl || return 1
export PYTHONPATH=$VLA_WHEEL_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
EOS
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/"
