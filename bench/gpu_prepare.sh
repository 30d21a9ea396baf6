#!/usr/bin/env bash
# Fill .wheels/ with the Python packages that loraflow's trainer imports and the GPU machine lacks,
# at the versions this project's .venv has, for that machine's Python (3.12, x86-64 Linux). Run it
# here, where PyPI is reachable, before `bash bench/gpu.sh` goes to the GPU machine with
# carry [".wheels"]. .wheels/ is ignored through .git/info/exclude, so it travels only when carried.
#
#     bash bench/gpu_prepare.sh
#
# bitsandbytes' wheel holds a native library for every CUDA and ROCm release (41 MiB, 123 MiB
# unpacked); the copy kept here has only the CUDA 13 ones (the GPU machine's torch is built for
# CUDA 13.0) and the CPU one: 7 MiB. duckdb (24 MiB) is imported by loraflow.dataset (for building
# datasets from the warehouse), so it travels too although the benchmark never opens a database.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
# the training engine (trl, datasets and what datasets needs beyond the machine's image), 4-bit
# layers, Liger's kernels, the spec's models, the warehouse module; transformers at this project's
# version (the machine's is older)
PACKAGES="bitsandbytes trl datasets dill multiprocess xxhash liger_kernel transformers pydantic pydantic_core annotated_types typing_inspection typing_extensions duckdb"
KEEP_LIBRARIES='libbitsandbytes_(cpu|cuda13[0-9])\.so$'
LIMIT_MIB=64 # what the device tool carries, working tree included

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for ignored in /.wheels/ /.gpu-bench-work/; do # the second: where bench/gpu.sh may build its models
    grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >>"$exclude"
done

pins=$("$PYTHON" - $PACKAGES <<'EOF'
import importlib.metadata
import sys

# GPU-only packages this machine's .venv does not hold: the `gpu` extra's pin
NOT_HERE = {"liger_kernel": "0.8.5"}


def pin(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name}=={NOT_HERE[name]}"


print(" ".join(pin(name) for name in sys.argv[1:]))
EOF
)
echo "downloading: $pins"
rm -rf .wheels
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .wheels $pins

"$PYTHON" - .wheels/bitsandbytes-*.whl "$KEEP_LIBRARIES" <<'EOF'
"""Rewrite the bitsandbytes wheel without the native libraries the GPU machine cannot use."""
import os
import re
import sys
import zipfile

wheel, keep = sys.argv[1], re.compile(sys.argv[2])


def dropped(name: str) -> bool:
    return "/libbitsandbytes_" in name and not keep.search(name)


before = os.path.getsize(wheel)
slim = wheel + ".part"
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for entry in source.infolist():
        if dropped(entry.filename):
            continue
        data = source.read(entry)
        if entry.filename.endswith(".dist-info/RECORD"):  # the file list pip installs from
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not dropped(line.split(",")[0])).encode()
        target.writestr(entry, data)
os.replace(slim, wheel)
print(f"{os.path.basename(wheel)}: {before / 2**20:.1f} MiB -> {os.path.getsize(wheel) / 2**20:.1f} MiB")
EOF

ls -l .wheels
travels=$( (git ls-files -co --exclude-standard -z; find .wheels -type f -print0) |
    du -cb --files0-from=- | tail -1 | cut -f1)
echo "what travels with carry [\".wheels\"]: $((travels / 2**20)) MiB of $LIMIT_MIB"
if [ "$travels" -gt $(((LIMIT_MIB - 4) * 2**20)) ]; then
    echo "too close to the device tool's $LIMIT_MIB MiB: leave something out of .wheels/" >&2
    exit 1
fi
