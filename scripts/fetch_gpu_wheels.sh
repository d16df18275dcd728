#!/usr/bin/env bash
# The Python packages attnbench needs on the lent GPU machine that its image lacks, as wheels
# for its Python (CPython 3.12, x86-64 manylinux), downloaded here into .whl/ (never committed).
#
#   scripts/fetch_gpu_wheels.sh            (PYTHON=... to choose the pip; default python3)
#
# What the image has (the device library's KINDS.md package list) covers attnbench's
# speed runs: torch, triton, numpy, pandas, matplotlib, safetensors, scipy, tqdm, pyarrow,
# pytest (+ xdist). Missing are only the diffusers adapter's needs:
#   diffusers 0.42.1        attnbench.integrations.diffusers; its own requirements are on
#                           the image (huggingface-hub ≥ 1.32 < 3: 1.33; safetensors ≥ 0.8:
#                           0.8.0; filelock, numpy, regex, requests, Pillow) except
#   importlib_metadata      declared by diffusers; on Python ≥ 3.8 diffusers uses the
#                           standard library's importlib.metadata, so this is for the
#                           declaration's sake (its own need, zipp, is on the image).
# torch-fidelity and clean-fid (quality metrics) are not used by the GPU run.
#
# The wheels travel with the device call (`carry: [".whl"]`) and install at its start:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
# (scripts/gpu_run.py's header gives the whole call.)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

"$PY" -m pip --version >/dev/null 2>&1 || {
    echo "fetch_gpu_wheels: $PY has no pip; set PYTHON to an interpreter with pip" >&2; exit 2; }
mkdir -p .whl
# never committed, never sent as untracked files: ignored in the repository and in git's
# own exclude file (the device tool reads both)
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n "$exclude" ]]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
fi
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d .whl "${WHEELS[@]}"

# one version of each package: two of one name stop the install on the device
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
    echo "fetch_gpu_wheels: several versions of: $dupes in .whl/; delete the stale ones" >&2
    exit 1
fi
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null \
       | awk '$2 == "total" {s += $1} END {print s + 0}')
limit=$((64 * 1024 * 1024))
ls -l .whl/
awk -v w="$wheels" -v t="$tree" -v l="$limit" 'BEGIN {
    printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB a device call carries\n",
           w / 1048576, t / 1048576, (w + t) / 1048576, l / 1048576 }'
if (( wheels + tree > limit )); then
    echo "fetch_gpu_wheels: over the limit: carry less" >&2
    exit 1
fi
