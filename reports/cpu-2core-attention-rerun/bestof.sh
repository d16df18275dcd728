#!/bin/bash
# usage: OLD_TREE=DIR bestof.sh THREADS RES METHODS ROUNDS
# alternate the code in OLD_TREE (a folder holding an attnbench/ package) and this
# worktree's, one process each per round; bestof.py prints best times and ratios
cd "$(git rev-parse --show-toplevel)"
for i in $(seq 1 "$4"); do
  for tree in "${OLD_TREE:?set OLD_TREE}" "$PWD"; do
    echo "== $tree"; PYTHONPATH=$tree timeout 900 .venv/bin/python reports/cpu-2core-attention-rerun/bestof.py "$1" "$2" "$3" 2 2>&1 | grep -v Warn
  done
done
