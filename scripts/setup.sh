#!/usr/bin/env bash
# One-command setup on a fresh Debian 12 machine: installs the packages
# matchlock needs, builds the guest kernel (cached) and the binaries, builds
# a small image offline from Debian's busybox-static, and runs a real
# sandbox from it. Run as root (or with sudo). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 e2fsprogs busybox-static ca-certificates
      linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils
      docker-registry skopeo umoci python3 git sqlite3)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

command -v go >/dev/null || { echo "setup: Go is required (https://go.dev/doc/install); put it on PATH" >&2; exit 1; }

echo "setup: guest kernel (first build takes ~5 minutes on 2 cores; cached afterwards)" >&2
./kernel/build.sh >/dev/null
echo "setup: building matchlock" >&2
make -s build

echo "setup: building the busybox image from Debian's busybox-static" >&2
./scripts/mkimage-busybox.sh | ./bin/matchlock image import busybox:latest - >/dev/null

echo "setup: running a sandbox" >&2
./bin/matchlock run --image busybox:latest -- sh -c 'echo "hello from $(hostname), kernel $(uname -r)"'
