#!/usr/bin/env bash
# Set up bnzoo on a fresh machine: Debian's Fashion-MNIST package, a virtual environment in .venv, and the
# package with its dependencies. Idempotent: a second run with unchanged dependencies takes about a second.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh dev      # plus the test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
venv=.venv
python="${PYTHON:-python3}"

# 1. Data: Fashion-MNIST from Debian (files under /usr/share/datasets/fashion-mnist/).
if ! dpkg-query -W -f='${Status}' dataset-fashion-mnist 2>/dev/null | grep -q "install ok installed"; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    echo "[setup] installing the Debian package dataset-fashion-mnist"
    $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
        $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
    }
fi

# 2. The virtual environment and the package. A stamp records what was installed, so a second run is fast.
# The dev set-up includes the base one, so scripts/main.sh after scripts/test.sh (or the reverse) stays fast.
key="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp="$venv/.bnzoo-setup-$key-${extra:-base}"
if [ -f "$stamp" ] || { [ -z "$extra" ] && [ -f "$venv/.bnzoo-setup-$key-dev" ]; }; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
fi
pip_install() {
    # pip's own output goes to a log, shown only when pip fails.
    local log="$venv/pip.log"
    if ! "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2
        echo "[setup] pip install $* failed" >&2
        exit 1
    fi
}
# torch and torchvision first, pinned: pip takes these two from this machine's disk (no multi-GB download).
echo "[setup] installing torch and torchvision"
pip_install "torch==2.14.1" "torchvision==0.29.1"
spec="."
if [ -n "$extra" ]; then spec=".[$extra]"; fi
echo "[setup] installing bnzoo$([ -n "$extra" ] && echo "[$extra]") and its dependencies"
pip_install -e "$spec"
"$venv/bin/python" -c "import bnzoo, torch, lightning, timm" || { echo "[setup] install failed" >&2; exit 1; }
find "$venv" -maxdepth 1 -name ".bnzoo-setup-*" ! -name ".bnzoo-setup-$key-*" -delete  # stale dependency sets
touch "$stamp"
echo "[setup] done"
