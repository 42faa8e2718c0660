#!/usr/bin/env bash
# Idempotent set-up: system packages for ffcv, a virtual environment in .venv, the project installed
# into it. A second run only re-installs when pyproject.toml changed.
#
#   scripts/setup.sh          the project and its test tools (the dev extra: trackers, moto, ruff)
#   scripts/setup.sh runtime  the project alone (what `make demo` runs: about half a minute less)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
case "$extras" in
    dev) spec=".[dev]" ;;
    runtime) spec="." ;;
    *) echo "setup.sh: unknown argument '$extras' (dev or runtime)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=""
for p in pkg-config libopencv-dev libturbojpeg0-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need_apt="$need_apt $p"
done
if [ -n "$need_apt" ]; then
    echo "[setup] apt-get install$need_apt"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need_apt >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# dev includes runtime: either stamp of this pyproject.toml satisfies a runtime set-up
hash=$(sha1sum < pyproject.toml | cut -c1-12)
stamp=.venv/.installed-$hash-$extras
[ "$extras" = runtime ] && [ -f ".venv/.installed-$hash-dev" ] && stamp=".venv/.installed-$hash-dev"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing the project ($extras) into .venv (first time: minutes, ffcv builds from source)"
    # (the grep drops pip's notes about local index mirrors that lack a package)
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel 2>&1 | { grep -v "is ignored: it is neither" || true; }
    .venv/bin/python -m pip install -q -e "$spec" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
    touch "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, ray, ffcv; print("torch", torch.__version__, "ray", ray.__version__, "ffcv", ffcv.__version__)')"
