#!/usr/bin/env bash
# Correctness of a device bundle on aarch64 (64-bit ARM: Raspberry Pi OS, phones' CPUs) without a
# board: run the bundle's bench.py under qemu user-mode emulation in a Debian arm64 root, with
# onnxruntime's aarch64 wheel from PyPI, and compare its argmax predictions on samples.npz with
# this machine's (x86). Emulated timings mean nothing: only the predictions are checked.
#
#   sudo bash scripts/arm64_check.sh BUNDLE_DIR
#
# Needs root (debootstrap, chroot, mount). The root is kept in $ARM64_ROOT (default
# /var/tmp/compresskit-arm64-root) and reused; the first run takes minutes (debootstrap's second
# stage runs emulated). Exit 0: identical predictions for every model; 1: some differ; 2: setup.
# Environment: ARM64_ROOT, ARM64_MIRROR (default http://deb.debian.org/debian), PYTHON (host
# Python with numpy and onnxruntime; default .venv/bin/python, else python3).
set -euo pipefail

BUNDLE=${1:-}
if [[ -z "$BUNDLE" || ! -f "$BUNDLE/bench.py" || ! -f "$BUNDLE/bundle.json" ]]; then
    echo "usage: scripts/arm64_check.sh BUNDLE_DIR (a folder written by compresskit bundle)" >&2
    exit 2
fi
if [[ ! -f "$BUNDLE/samples.npz" ]]; then
    echo "error: $BUNDLE has no samples.npz: make the bundle with samples (not --samples 0)" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "error: needs root (debootstrap, chroot, mount): sudo bash $0 $*" >&2
    exit 2
fi
BUNDLE=$(cd "$BUNDLE" && pwd)
ROOT=${ARM64_ROOT:-/var/tmp/compresskit-arm64-root}
MIRROR=${ARM64_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x "$HERE/.venv/bin/python" ]]; then PY="$HERE/.venv/bin/python"; else PY=python3; fi
fi
WORK=$(mktemp -d)
say() { echo "[arm64] $*"; }

# 1. qemu-user-static + binfmt_misc, so aarch64 binaries run here
if ! command -v debootstrap >/dev/null || [[ ! -e /usr/bin/qemu-aarch64-static && ! -e /usr/bin/qemu-aarch64 ]]; then
    say "installing qemu-user-static debootstrap binfmt-support"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap binfmt-support
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    echo "error: binfmt_misc has no qemu-aarch64 entry (update-binfmts --enable qemu-aarch64 failed)" >&2
    exit 2
fi

# 2. a Debian bookworm arm64 root with python3 + venv (kept for the next run)
if [[ ! -x "$ROOT/usr/bin/python3" ]]; then
    say "debootstrap arm64 bookworm minbase into $ROOT (minutes: the second stage runs emulated)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv bookworm "$ROOT" "$MIRROR" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 2; }
fi
mounted=0
cleanup() {
    if [[ $mounted -eq 1 ]]; then umount "$ROOT/proc" || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
# /proc in the root, or onnxruntime's CPU detection warns; never bind the host's /sys (segfaults
# under emulation)
if ! mountpoint -q "$ROOT/proc"; then
    mount -t proc proc "$ROOT/proc"
    mounted=1
fi

# 3. numpy + onnxruntime aarch64 wheels fetched on the host, installed offline in the root
if [[ ! -x "$ROOT/opt/v/bin/python" ]] || ! chroot "$ROOT" /opt/v/bin/python -c "import numpy, onnxruntime" >/dev/null 2>&1; then
    PYVER=$(chroot "$ROOT" python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    say "pip download numpy onnxruntime for cp${PYVER/./} aarch64"
    rm -rf "$ROOT/wheels" && mkdir -p "$ROOT/wheels"
    "$PY" -m pip download -q --no-warn-script-location --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
        -d "$ROOT/wheels" onnxruntime numpy
    say "installing them in the root (offline)"
    chroot "$ROOT" sh -c 'python3 -m venv /opt/v && /opt/v/bin/pip install -q --no-index /wheels/*.whl' \
        2> >(grep -v -i cpuinfo >&2)
fi
ORT_ARM=$(chroot "$ROOT" /opt/v/bin/python -c "import onnxruntime, platform; print(onnxruntime.__version__, platform.machine())" \
    2> >(grep -v -i cpuinfo >&2))
say "root: onnxruntime $ORT_ARM"

# 4. the same bundle here and in the root, predictions saved by each
rm -rf "$ROOT/bundle" && cp -r "$BUNDLE" "$ROOT/bundle" && rm -f "$ROOT/bundle"/result*.json
ARGS=(--max-seconds 0.05 --min-runs 2 --warmup 1 --batch-sizes 1 --threads 1 -q)
say "bench.py on this machine ($(uname -m))"
"$PY" "$BUNDLE/bench.py" "${ARGS[@]}" --predictions "$WORK/host.npz" --json "$WORK/host.json" > /dev/null
say "bench.py in the arm64 root (emulated)"
# (onnxruntime's cpuinfo cannot read /sys in the root and says so: expected, filtered out)
chroot "$ROOT" /opt/v/bin/python /bundle/bench.py "${ARGS[@]}" --device-name arm64-qemu \
    --predictions /bundle/arm64.npz --json /bundle/arm64.json > /dev/null 2> >(grep -v -i cpuinfo >&2)
cp "$ROOT/bundle/arm64.json" "$ROOT/bundle/arm64.npz" "$WORK/"

# 5. compare
"$PY" - "$WORK/host.npz" "$WORK/arm64.npz" "$WORK/arm64.json" "$ROOT/bundle/arm64.json" <<'EOF'
import json, sys
import numpy as np

host, arm = np.load(sys.argv[1]), np.load(sys.argv[2])
result = json.load(open(sys.argv[3]))
print(f"[arm64] the root runs {result['device']['machine']}, onnxruntime {result['onnxruntime']['version']}, "
      f"python {result['device']['python']}")
bad = 0
for name in host.files:
    a, b = host[name], arm[name]
    same = int(np.sum(a == b))
    acc = next((m["accuracy"] for m in result["models"] if m["name"] == name), None)
    flag = "identical" if same == len(a) else f"{len(a) - same} DIFFER"
    bad += same != len(a)
    print(f"[arm64] {name}: {same}/{len(a)} predictions equal to x86 ({flag}); aarch64 accuracy on the samples "
          f"{acc:.2%}")
print("[arm64] timings under qemu user-mode emulation mean nothing: only predictions were checked here "
      f"(the root's result: {sys.argv[4]}; do not merge it into a report)")
sys.exit(1 if bad else 0)
EOF
