#!/bin/sh
# Fetch into .whl/ (git-ignored) the wheels `make gpu-check` installs on a bare CUDA machine: x86-64,
# Python 3.12, torch + triton + transformers present, no network. That machine gets the working tree, so
# these travel with it; keep them under 40 MiB (the tree and the wheels together must stay under 64 MiB).
#
# The list: diffusers and its requirements, matplotlib (the benchmark plots), pytest (+ pytest-timeout,
# which pyproject's `timeout` setting names), ftfy (diffusers' Wan pipelines), and the packages transformers
# and huggingface_hub import. Versions: those of the development .venv (`.venv/bin/pip freeze`).
# Left out on purpose: torch, triton, transformers, numpy (the machine has them: transformers needs
# numpy), hf-xet (only Hub downloads use it; the check runs offline), gradio / playwright / jsonschema /
# opencv (the app, browser and workflow tests and the evaluation, which `pytest -m gpu` does not collect).
# gpu_check.py installs only the wheels whose package the machine lacks or has at a version the others
# do not accept, so the machine's own transformers keeps the versions it was installed with.
#
#   tools/fetch_gpu_wheels.sh          (or: make gpu-wheels)
#   PYTHON=.venv/bin/python tools/fetch_gpu_wheels.sh
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The machine's Python, and the folder; a rehearsal on another Python may set both
# (WHEEL_PYTHON_VERSION=3.11 WHEEL_DIR=/tmp/whl311 for this repo's .venv).
WHEEL_PYTHON_VERSION=${WHEEL_PYTHON_VERSION:-3.12}
WHEEL_DIR=${WHEEL_DIR:-.whl}

WHEELS="
anyio==4.16.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
contourpy==1.3.3
cycler==0.12.1
diffusers==0.42.1
filelock==4.0.8
fsspec==2026.9.0
ftfy==6.3.1
h11==0.16.0
httpcore2==2.16.2
httpx2==2.16.2
huggingface-hub==2.4.0
idna==3.20
importlib-metadata==10.2.0
iniconfig==2.3.1
kiwisolver==1.5.1
lazy-importer==0.1.0
matplotlib==3.11.2
packaging==26.4
pillow==12.3.0
pluggy==1.7.0
pygments==2.21.0
pyparsing==3.3.3
pytest==9.2.0
pytest-timeout==2.4.0
python-dateutil==4.0.0
pyyaml==6.0.4
regex==2026.11.19
requests==2.34.2
safetensors==0.8.0
tokenizers==0.23.3
tqdm==4.70.1
truststore==0.10.5
typing-extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
wcwidth==0.9.4
zipp==4.1.2
"
# Pure-python builds of packages that also publish compiled ones: fonttools' compiled wheel is 5.4 MB
# against 1.2 MB, and matplotlib needs only its pure half to write PNGs.
PURE_WHEELS="
fonttools==4.68.0
"
# WHEEL_SET=minimal: about 7 MiB, for a machine whose image already holds a CUDA data-science stack
# (huggingface_hub >= 1.32, safetensors >= 0.8, regex, pillow, matplotlib, pytest, tqdm): diffusers and
# what such images tend to lack. Use it when the full set would push the working tree over 64 MiB.
if [ "${WHEEL_SET:-full}" = minimal ]; then
    WHEELS="diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 importlib-metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2"
    PURE_WHEELS=""
elif [ "${WHEEL_SET:-full}" != full ]; then
    echo "WHEEL_SET=$WHEEL_SET is not a wheel set; accepted: full (the default), minimal" >&2
    exit 2
fi

# A fresh folder, then swapped in: two versions of one package in one folder would make the install fail.
NEW="$WHEEL_DIR.new"
rm -rf "$NEW"
# shellcheck disable=SC2086  # the lists split into one argument per wheel on purpose
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$NEW" $WHEELS
if [ -n "$PURE_WHEELS" ]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON_VERSION" \
        --implementation py --abi none --platform any -d "$NEW" $PURE_WHEELS
fi
rm -rf "$WHEEL_DIR"
mv "$NEW" "$WHEEL_DIR"

count=$(ls "$WHEEL_DIR"/*.whl | wc -l)
bytes=$(cat "$WHEEL_DIR"/*.whl | wc -c)
echo "fetched $count wheels into $WHEEL_DIR: $(( (bytes + 1048575) / 1048576 )) MiB"
if [ "$bytes" -gt $((40 * 1048576)) ]; then
    echo "warning: $WHEEL_DIR is over 40 MiB; with the working tree it may not fit the device tool's 64 MiB" >&2
fi
