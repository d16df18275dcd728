#!/usr/bin/env bash
# What the lent GPU machine needs that its image lacks, fetched here (never committed):
# Python wheels for its Python (CPython 3.12, x86-64 manylinux) into .whl/, and the source of
# the official SLA kernel into .peers/SLA/.
#
#   scripts/fetch_gpu_wheels.sh            (PYTHON=... to choose the pip; default python3)
#   SLA_GIT=<git dir or URL>               (default https://github.com/thu-ml/SLA; a local
#                                           mirror works where GitHub cannot be reached)
#
# What the image has (the device library's KINDS.md package list) covers attnbench's
# speed runs: torch 2.11, triton 3.6, numpy, pandas, matplotlib, safetensors, scipy, tqdm,
# pyarrow, pytest (+ xdist), einops, transformers. Missing:
#   diffusers 0.42.1        attnbench.integrations.diffusers; its own requirements are on
#                           the image (huggingface-hub ≥ 1.32 < 3: 1.33; safetensors ≥ 0.8:
#                           0.8.0; filelock, numpy, regex, requests, Pillow) except
#   importlib_metadata      declared by diffusers; on Python ≥ 3.8 diffusers uses the
#                           standard library's importlib.metadata, so this is for the
#                           declaration's sake (its own need, zipp, is on the image).
#   fla-core 0.6.0          the peers stage (scripts/gpu_peers.py): fla's Triton linear-
#                           attention kernels (fla.ops.linear_attn). Pure Python; needs
#                           einops (on the image), torch ≥ 2.7 and triton ≥ 3.3 (its "cuda"
#                           extra; on the image). Its kernels are causal only.
#   xformers 0.0.35         the peers stage and the `xformers` method: a 3 MB wheel for
#                           torch ≥ 2.10 (its compiled library loads or the row says why).
# Left out, and why (the peers stage says so in its rows):
#   flash-attn              PyPI has its source only (no binary wheel for cp312); a build
#                           needs nvcc and far more time than a lease.
#   natten                  PyPI has its source only; NATTEN's own wheels (natten.org, e.g.
#                           0.21.6+torch2110cu130) come from whl.natten.org, which this
#                           machine cannot reach.
# torch-fidelity and clean-fid (quality metrics) are not used by the GPU run.
#
# The official SLA kernel (thu-ml/SLA, pinned below): its package sparse_linear_attention/
# (Python + Triton, ~30 KB) is copied into .peers/SLA/ with its LICENSE and the commit in
# .peers/SLA/COMMIT; scripts/gpu_peers.py imports it from there. Never copied into attnbench.
#
# Both travel with the device call (`carry: [".whl", ".peers"]`); the wheels install at its
# start:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
# (scripts/gpu_run.py's header gives the whole call.)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0 fla-core==0.6.0 xformers==0.0.35)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
SLA_GIT=${SLA_GIT:-https://github.com/thu-ml/SLA}
SLA_COMMIT=d973e55ea5b5b5fd0bc5141959e8410f0d366336  # 2026-01-17, the code gpu_peers.py calls

"$PY" -m pip --version >/dev/null 2>&1 || {
    echo "fetch_gpu_wheels: $PY has no pip; set PYTHON to an interpreter with pip" >&2; exit 2; }
mkdir -p .whl .peers
# never committed, never sent as untracked files: ignored in the repository and in git's
# own exclude file (the device tool reads both)
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n "$exclude" ]]; then
    mkdir -p "$(dirname "$exclude")"
    for folder in /.whl/ /.peers/; do
        grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
    done
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

# the official SLA source at the pinned commit
if [[ "$(cat .peers/SLA/COMMIT 2>/dev/null)" != "$SLA_COMMIT" ]]; then
    rm -rf .peers/SLA .peers/.sla-git
    if [[ -d "$SLA_GIT" ]]; then
        git_dir=$SLA_GIT
    else
        git init -q --bare .peers/.sla-git
        git --git-dir=.peers/.sla-git fetch -q --depth 1 "$SLA_GIT" "$SLA_COMMIT"
        git_dir=.peers/.sla-git
    fi
    mkdir -p .peers/SLA
    git --git-dir="$git_dir" archive "$SLA_COMMIT" sparse_linear_attention LICENSE.txt \
        | tar -x -C .peers/SLA
    echo "$SLA_COMMIT" >.peers/SLA/COMMIT
    rm -rf .peers/.sla-git
fi

size() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
wheels=$(size .whl/*.whl)
peers=$(size .peers)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null \
       | awk '$2 == "total" {s += $1} END {print s + 0}')
limit=$((64 * 1024 * 1024))
ls -l .whl/
awk -v w="$wheels" -v p="$peers" -v t="$tree" -v l="$limit" 'BEGIN {
    printf "wheels %.1f MiB + peers %.2f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB a device call carries\n",
           w / 1048576, p / 1048576, t / 1048576, (w + p + t) / 1048576, l / 1048576 }'
if (( wheels + peers + tree > limit )); then
    echo "fetch_gpu_wheels: over the limit: carry less" >&2
    exit 1
fi
