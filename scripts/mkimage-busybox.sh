#!/usr/bin/env bash
# Writes a plain rootfs tarball (as accepted by `matchlock image import`) of
# a minimal busybox system to stdout, built offline from Debian's
# busybox-static. No root needed: ownership is set in the tar headers.
set -euo pipefail
BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || { echo "mkimage-busybox: $BUSYBOX missing: apt-get install busybox-static" >&2; exit 1; }
file "$BUSYBOX" 2>/dev/null | grep -q 'static' || true
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,home,var,proc,sys,dev,run}
cp "$BUSYBOX" "$dir/bin/busybox"
for app in $("$BUSYBOX" --list); do
  [ "$app" = busybox ] && continue
  ln -sf busybox "$dir/bin/$app"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nuser:x:1000:1000:user:/home/user:/bin/sh\n' >"$dir/etc/passwd"
printf 'root:x:0:\nusers:x:100:user\nnogroup:x:65534:\nuser:x:1000:\n' >"$dir/etc/group"
mkdir -p "$dir/home/user"
chmod 1777 "$dir/tmp"
tar -C "$dir" --numeric-owner --owner=0 --group=0 -cf - . 
