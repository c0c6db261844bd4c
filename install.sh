#!/usr/bin/env bash
# Installs bpffsd on Debian 12 (or a later Debian/Ubuntu with python3 >= 3.11), as root or with
# sudo for the apt step:
#   1. apt: python3 and python3-venv; FUSE 3 and what builds pyfuse3 from source (gcc, pkg-config,
#      libfuse3-dev, python3-dev); clang/llvm for the examples and the ELF tests; iproute2,
#      util-linux, systemd (systemd-analyze) and bpftool, which the tests compare against.
#   2. a virtualenv, since Debian's python3 is externally managed (PEP 668): /opt/bpffsd/venv as
#      root, ~/.local/share/bpffsd/venv for any other user ($BPFFSD_VENV overrides). This checkout
#      is installed into it editable, with the daemon, test, bench and native (llvmlite) extras, and every dependency
#      upgraded to its newest release.
#   3. bpffsd, bpffs and bpffs-vm-plugin linked into /usr/local/bin as root, ~/.local/bin for any
#      other user ($BPFFSD_BIN overrides), and `.venv` in this checkout linked to the virtualenv, so
#      that `. .venv/bin/activate && python3 -m pytest -q` runs the tests.
#
# Options:
#   --client       the client library and the bpffs CLI only: no FUSE, no compiler, no test tools
#                  (apt installs only python3 and python3-venv)
#   --fresh        remove the virtualenv first and build it anew
#   --no-editable  copy the package into the virtualenv instead of linking this checkout (for a
#                  system service that must not read a checkout under /root or /home)
#   --no-apt       skip the apt step (the packages are already there)
set -euo pipefail
cd "$(dirname "$0")"
SRC=$(pwd)

client=0 fresh=0 editable=1 apt=1
for arg in "$@"; do
    case "$arg" in
        --client) client=1 ;;
        --fresh) fresh=1 ;;
        --no-editable) editable=0 ;;
        --no-apt) apt=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $arg (see bash install.sh --help)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
    VENV=${BPFFSD_VENV:-/opt/bpffsd/venv}
    BIN=${BPFFSD_BIN:-/usr/local/bin}
else
    SUDO="sudo"
    VENV=${BPFFSD_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/bpffsd/venv}
    BIN=${BPFFSD_BIN:-$HOME/.local/bin}
fi

if [ $client -eq 1 ]; then
    APT_PACKAGES=(python3 python3-venv ca-certificates)
    EXTRAS=""
else
    APT_PACKAGES=(python3 python3-venv python3-dev ca-certificates fuse3 libfuse3-dev pkg-config
                  gcc make clang llvm iproute2 util-linux systemd bpftool)
    EXTRAS="[daemon,test,bench,native]"
fi

if [ $apt -eq 1 ]; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install.sh: apt-get install ${missing[*]}"
        $SUDO apt-get update -q
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
fi

PYTHON=${BPFFSD_PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: bpffsd needs Python 3.11 or later; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    exit 1
fi

if [ $fresh -eq 1 ]; then
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python3" ]; then
    echo "install.sh: creating the virtualenv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi

pip=("$VENV/bin/python3" -m pip)
"${pip[@]}" install -q --upgrade pip
if [ $editable -eq 1 ]; then
    target=(-e "$SRC$EXTRAS")
else
    target=("$SRC$EXTRAS")
fi
echo "install.sh: pip install ${target[*]} into $VENV"
"${pip[@]}" install -q --upgrade --upgrade-strategy eager "${target[@]}"

mkdir -p "$BIN"
for cmd in bpffsd bpffs bpffs-vm-plugin; do
    ln -sfn "$VENV/bin/$cmd" "$BIN/$cmd"
done
ln -sfn "$VENV" "$SRC/.venv"

echo "install.sh: installed $("$VENV/bin/bpffs" version 2>/dev/null | head -1 || echo bpffsd) into $VENV;" \
     "bpffsd and bpffs are in $BIN"
for cmd in bpffsd bpffs; do
    found=$(command -v "$cmd" || true)
    if [ -z "$found" ]; then
        echo "install.sh: note: $BIN is not on your PATH yet: log in again (Debian's ~/.profile" \
             "adds ~/.local/bin when it exists) or run: export PATH=\"$BIN:\$PATH\"" >&2
        break
    elif [ "$found" != "$BIN/$cmd" ]; then
        echo "install.sh: note: \`$cmd\` on your PATH is $found, not $BIN/$cmd:" \
             "put $BIN first on PATH, or run $BIN/$cmd" >&2
    fi
done
