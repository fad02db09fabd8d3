#!/bin/sh
# Build the service's Python environment the way the image does (Dockerfile), so that a test can
# build the same one without a Docker engine (tests/test_installs.py, docs/deployment.md (Image)).
#
#   scripts/build_venv.sh deps VENV   # a fresh venv with exactly the packages in requirements.lock
#   scripts/build_venv.sh app VENV    # then the service itself, from the current directory
#
# Run from the directory holding requirements.lock, pyproject.toml and src/. Nothing is resolved
# at build time: --no-deps installs only what the lock pins, and `pip check` proves the pinned set
# is complete and consistent.
set -eu
phase=$1
venv=$2
pip="$venv/bin/python -m pip --disable-pip-version-check --no-input"
case "$phase" in
    deps)
        python3 -m venv "$venv"
        $pip install --quiet --no-cache-dir --no-deps --requirement requirements.lock
        ;;
    app)
        $pip install --quiet --no-cache-dir --no-deps .
        $pip check
        ;;
    *)
        echo "usage: $0 deps|app VENV" >&2
        exit 2
        ;;
esac
