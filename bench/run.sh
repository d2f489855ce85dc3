#!/usr/bin/env bash
# Runs the benchmarks whose figures docs/performance.md reports. Needs
# `make build` and `make kernel`; imports the busybox test image if absent.
set -euo pipefail
cd "$(dirname "$0")/.."
ML=./bin/matchlock
$ML image inspect busybox:latest >/dev/null 2>&1 ||
  ./scripts/mkimage-busybox.sh | $ML image import busybox:latest - >/dev/null

echo "== start-up, control channel, idle memory"
go run ./bench/startup -bin "$ML" -image busybox:latest -n "${N:-15}"

echo "== snapshots: cold vs restore vs 4 forks"
go run ./bench/snapshot -bin "$ML" -image busybox:latest

for b in bench/*.sh; do
  case "$b" in bench/run.sh) continue ;; esac
  echo "== $b"
  "$b"
done
