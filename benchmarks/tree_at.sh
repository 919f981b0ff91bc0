#!/usr/bin/env bash
# Unpack the code of commit REV into DIR, for `bench_memory.py --trees before=DIR,after=.` (a before/after
# on one machine). Only what bench_memory imports: the package, kernels, presets, benchmarks, tests (its
# single-file configs use tests/test_single_file.py); not the recorded results or the toy checkpoints.
# The links stand in for pyproject's package-dir (kernels/ and presets/ ship as lowvram_dopsd.*).
#
#   bash benchmarks/tree_at.sh ea7bf9f .ab/before      # .ab/ is git-ignored: carry it to the GPU machine
#
# A commit before 4271014 has no guard in kernels/__init__.py: beside transformers 5.25+ (which imports
# Hugging Face's `kernels`) its folder shadows that package and the run stops at bench_memory's check
# of the tree. Use an environment with an older transformers for it (the GPU image had 5.17).
set -euo pipefail
rev=${1:?usage: tree_at.sh REV DIR}
dir=${2:?usage: tree_at.sh REV DIR}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
git archive "$rev" -- lowvram_dopsd kernels presets benchmarks tests \
  ':(exclude)benchmarks/results' ':(exclude)lowvram_dopsd/assets/toy' | tar -x -C "$dir"
ln -sfn ../kernels "$dir/lowvram_dopsd/kernels"
ln -sfn ../presets "$dir/lowvram_dopsd/presets"
echo "$rev $(git rev-parse "$rev")" > "$dir/REV"
du -sh "$dir" | cut -f1
