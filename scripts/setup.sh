#!/usr/bin/env bash
# Set up simclrv2 on a fresh machine: torch (CPU wheel 2.13.0) only when torch is missing, the
# Fashion-MNIST files when missing, then the package itself (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0"
    "$PY" -m pip install --quiet torch==2.13.0
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }
fi

"$PY" -m pip install --quiet -e ".[test]"
echo "setup: done ($("$PY" -c 'import torch, simclrv2; print("torch", torch.__version__, "simclrv2", simclrv2.__version__)'))"
