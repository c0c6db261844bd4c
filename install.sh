#!/usr/bin/env bash
# Install everything bpffsd needs on Debian 12 (run as root, or with sudo available):
# FUSE 3 and its headers (pyfuse3 builds from source), clang/llvm for the examples and the
# ELF tests, systemd-analyze for unit checks, bpftool (the CLI tests compare their output with
# its), then the Python package with test extras.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev clang llvm iproute2 util-linux systemd bpftool)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e '.[test,bench]'
