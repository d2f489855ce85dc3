#!/usr/bin/env bash
# Usage: mkimage-tools.sh OUT.tar
#
# Writes a plain rootfs tarball (as accepted by `matchlock image import`) of
# busybox-static plus this machine's git and sqlite3, for the workspace tests
# that run real tools on a shared directory (sandbox/workspace_tools_test.go).
# Built offline from the host's own files: the two binaries, the git helper
# programs a local clone, status, log and commit need, and every shared
# library they load (found with ldd, the dynamic loader included). No root
# needed: ownership is set in the tar headers.
set -euo pipefail
out=${1:?usage: mkimage-tools.sh OUT.tar}
BUSYBOX=${BUSYBOX:-/bin/busybox}
die() { echo "mkimage-tools: $*" >&2; exit 1; }
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing: apt-get install busybox-static"
git=$(command -v git) || die "git is not installed on this machine: apt-get install git"
sqlite=$(command -v sqlite3) || die "sqlite3 is not installed on this machine: apt-get install sqlite3"
command -v ldd >/dev/null || die "ldd missing (package libc-bin)"
# git runs its helpers from its exec path (/usr/lib/git-core on Debian).
gitcore=$("$git" --exec-path)
[ -x "$gitcore/git" ] || die "$gitcore/git missing: is git installed completely?"

dir=$(mktemp -d)
trap 'rm -rf "$dir" "$out.tmp"' EXIT
chmod 755 "$dir"
mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var,proc,sys,dev,run}
cp "$BUSYBOX" "$dir/bin/busybox"
for app in $("$BUSYBOX" --list); do
  [ "$app" = busybox ] && continue
  ln -sf busybox "$dir/bin/$app"
done

# put SRC [DEST]: copies a file (following symlinks) to the same path, or
# DEST, in the image.
put() {
  local dest=$dir${2:-$1}
  mkdir -p "$(dirname "$dest")"
  cp -L "$1" "$dest"
}
# libs BIN...: every library ldd names for the binaries, and the loader.
libs() {
  ldd "$@" | awk -v bin="$*" '
    /not found/ { print "mkimage-tools: " bin ": " $1 " not found" > "/dev/stderr"; bad = 1 }
    $2 == "=>" && $3 ~ /^\// { print $3 }
    $1 ~ /^\// && $1 !~ /:$/ { print $1 }
    END { exit bad }' | sort -u
}

put "$git" /usr/bin/git
put "$sqlite" /usr/bin/sqlite3
libs "$git" "$sqlite" >"$dir/.libs" || die "unresolved shared libraries"
while read -r lib; do put "$lib"; done <"$dir/.libs"
rm "$dir/.libs"

# The helpers: `git` itself (git runs builtins such as the auto gc after a
# commit as `git CMD` from its exec path) and git-upload-pack (a clone of a
# local path runs it through /bin/sh). Both are the git binary on Debian.
mkdir -p "$dir$gitcore"
for h in git git-upload-pack; do
  [ -e "$gitcore/$h" ] || die "$gitcore/$h missing"
  if [ "$(readlink -f "$gitcore/$h")" = "$(readlink -f "$git")" ] || cmp -s "$gitcore/$h" "$git"; then
    ln -sf /usr/bin/git "$dir$gitcore/$h"
  else
    put "$gitcore/$h"
    libs "$gitcore/$h" | while read -r lib; do put "$lib"; done
  fi
done
# An empty template directory: git init and clone warn without one.
mkdir -p "$dir/usr/share/git-core/templates"

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$dir/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/etc/group"
chmod 1777 "$dir/tmp"
tar -C "$dir" --numeric-owner --owner=0 --group=0 -cf "$out.tmp" .
mv "$out.tmp" "$out"
