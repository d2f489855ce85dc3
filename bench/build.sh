#!/usr/bin/env bash
# Dockerfile build times (matchlock build): cold (empty BuildKit cache) and
# cached rebuilds, for the busybox base (~2 MB) and a synthetic ~100 MB base
# (busybox + 100 MB of incompressible files, imported as a rootfs tar), and
# the builder's start (VM boot, buildkitd ready). Uses a private
# MATCHLOCK_HOME so the real build cache is untouched. N rebuilds (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
ML=${ML:-$PWD/bin/matchlock}
N=${N:-3}
./scripts/build-builder.sh >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export MATCHLOCK_HOME=$tmp/home
$ML image inspect busybox:latest >/dev/null 2>&1 ||
  ./scripts/mkimage-busybox.sh | $ML image import busybox:latest - >/dev/null
if ! $ML image inspect bench-base100:1 >/dev/null 2>&1; then
  mkdir -p "$tmp/rootfs" && ./scripts/mkimage-busybox.sh | tar -C "$tmp/rootfs" -xf -
  mkdir -p "$tmp/rootfs/data"
  for i in $(seq 1 100); do head -c 1048576 /dev/urandom >"$tmp/rootfs/data/f$i"; done
  tar -C "$tmp/rootfs" --numeric-owner -cf - . | $ML image import bench-base100:1 - >/dev/null
  rm -rf "$tmp/rootfs"
fi

# one build; prints "wall boot daemon"
build1() {
  local t0 t1 line
  t0=$(date +%s.%N)
  line=$($ML build --progress quiet -t bench-out:1 "$@" 2>&1 >/dev/null | grep 'matchlock: built') || { echo "build failed" >&2; exit 1; }
  t1=$(date +%s.%N)
  local boot daemon
  boot=$(sed -n 's/.*builder boot \([0-9.]*\)s.*/\1/p' <<<"$line")
  daemon=$(sed -n 's/.*buildkitd ready \([0-9.]*\)s.*/\1/p' <<<"$line")
  echo "$(echo "$t1 - $t0" | bc) $boot $daemon"
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

printf '%-22s %10s %14s %12s %14s\n' base cold_s cached_med_s boot_med_s buildkitd_med_s
for base in busybox:latest bench-base100:1; do
  ctx=$tmp/ctx-${base%%:*}
  mkdir -p "$ctx"
  printf 'FROM %s\nRUN echo step1 > /a && ls / > /b\nCOPY file /file\nRUN cat /file /a > /c\n' "$base" >"$ctx/Dockerfile"
  head -c 4096 /dev/urandom >"$ctx/file"
  $ML build prune >/dev/null
  read -r cold boot0 d0 < <(build1 "$ctx")
  : >"$tmp/w" ; : >"$tmp/b"; : >"$tmp/d"
  for _ in $(seq 1 "$N"); do
    read -r w b d < <(build1 "$ctx")
    echo "$w" >>"$tmp/w"; echo "$b" >>"$tmp/b"; echo "$d" >>"$tmp/d"
  done
  printf '%-22s %10.1f %14.1f %12.1f %14.1f\n' "$base" "$cold" "$(median <"$tmp/w")" "$(median <"$tmp/b")" "$(median <"$tmp/d")"
done
$ML image rm bench-out:1 >/dev/null 2>&1 || true
