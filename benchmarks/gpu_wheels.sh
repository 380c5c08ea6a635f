#!/usr/bin/env bash
# Downloads the wheels of benchmarks/gpu_wheels.txt for the GPU machine (CPython 3.12, x86-64 manylinux) into .whl/
# (ignored by git), for benchmarks/gpu_evidence.sh to install there. Run it here, before the device call.
# `bash benchmarks/gpu_wheels.sh 3.11 /tmp/whl311` fetches them for another Python into another folder (a dry run
# of the install on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
dest=${2:-.whl}
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" -d "$dest" -r benchmarks/gpu_wheels.txt
du -sh "$dest"
ls "$dest"
