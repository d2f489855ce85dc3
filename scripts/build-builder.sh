#!/usr/bin/env bash
# Assembles matchlock's builder image (the VM `matchlock build` boots) from
# Debian packages and BuildKit built from source, offline except for apt
# and the Go module proxy:
#
#   /usr/bin/buildkitd, /usr/bin/buildctl   BuildKit $BUILDKIT_VERSION (static)
#   /usr/sbin/runc                          Debian's runc (+ libseccomp2, libc6)
#   /bin/busybox + applets                  Debian's busybox-static
#   /etc/ssl/certs/ca-certificates.crt      Debian's ca-certificates
#
# The result is a plain rootfs tar, cached by the hash of its inputs (this
# script, the BuildKit version, the Go toolchain and the package versions):
#
#   $DIR/<hash>/builder.tar     DIR = $MATCHLOCK_BUILDER_CACHE, else
#   $DIR/current -> <hash>            ${XDG_CACHE_HOME:-~/.cache}/matchlock/builder
#
# `matchlock build` imports $DIR/current/builder.tar into its image store as
# matchlock-builder:<hash> on first use. A cached run only hashes the inputs
# (well under a second). Prints the tar's path on stdout.
set -euo pipefail
BUILDKIT_VERSION=${BUILDKIT_VERSION:-v0.34.2}
PKGS=(runc libseccomp2 libc6 busybox-static ca-certificates)
DIR=${MATCHLOCK_BUILDER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/builder}
log() { echo "build-builder: $*" >&2; }

pkg_versions() { apt-cache policy "${PKGS[@]}" | awk '/^[^ ]/{p=$1} /Candidate:/{print p, $2}'; }
versions=$(pkg_versions)
if { grep -q '(none)' <<<"$versions" || [ "$(wc -l <<<"$versions")" -ne ${#PKGS[@]} ]; } && [ "$(id -u)" = 0 ]; then
  log "apt-get update (package lists missing)"; apt-get update -q >&2; versions=$(pkg_versions)
fi
if grep -q '(none)' <<<"$versions" || [ "$(wc -l <<<"$versions")" -ne ${#PKGS[@]} ]; then
  log "packages unknown to apt: run apt-get update"; echo "$versions" >&2; exit 1
fi
hash=$( { cat "$0"; echo "$BUILDKIT_VERSION"; go env GOVERSION; echo "$versions"; } | sha256sum | cut -c1-16)
out=$DIR/$hash
if [ -s "$out/builder.tar" ]; then
  ln -sfn "$hash" "$DIR/current"
  echo "$out/builder.tar"
  exit 0
fi

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
if [ -s "$out/builder.tar" ]; then   # built by someone else while we waited
  ln -sfn "$hash" "$DIR/current"; echo "$out/builder.tar"; exit 0
fi
work=$(mktemp -d "$DIR/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root" "$work/debs" "$work/bin"

t0=$SECONDS
log "BuildKit $BUILDKIT_VERSION"
mod=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/moby/buildkit@$BUILDKIT_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$mod" ] || { log "go mod download of BuildKit failed"; exit 1; }
# BuildKit's go.mod has exclude lines, so `go install …@version` refuses
# it: build inside the module cache copy instead (GOFLAGS=-mod=mod lets go
# fill in go.sum entries for the module's own build, without writing).
(cd "$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o "$work/bin/" ./cmd/buildkitd ./cmd/buildctl)
log "packages: $(echo $versions)"
(cd "$work/debs" && apt-get download -q "${PKGS[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
for d in "$work"/debs/*.deb; do dpkg-deb -x "$d" "$root"; done

install -m 0755 "$work/bin/buildkitd" "$work/bin/buildctl" "$root/usr/bin/"
mkdir -p "$root"/{bin,sbin,etc,root,tmp,proc,sys,dev,run,var/lib/buildkit,etc/ssl/certs}
[ -x "$root/bin/busybox" ] || { log "busybox-static did not provide /bin/busybox"; exit 1; }
for app in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$app" ] || [ -e "$root/usr/bin/$app" ] || [ -e "$root/usr/sbin/$app" ] || ln -s busybox "$root/bin/$app"
done
find "$root/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z | xargs -0 cat >"$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
# Trim what a builder never needs (docs, locales, the gconv modules).
rm -rf "$root"/usr/share/{doc,man,locale,lintian,info} "$root"/usr/lib/x86_64-linux-gnu/gconv
cat >"$root/etc/matchlock-builder" <<INFO
buildkit=$BUILDKIT_VERSION
$versions
INFO

mkdir -p "$out.tmp"
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$out.tmp/builder.tar" .
rm -rf "$out" && mv "$out.tmp" "$out"
ln -sfn "$hash" "$DIR/current"
# Older builders are superseded (their store copies go with 'image prune').
for d in "$DIR"/*/; do d=${d%/}; [ "${d##*/}" = "$hash" ] || rm -rf "$d"; done
log "built $out/builder.tar ($(du -h "$out/builder.tar" | cut -f1)) in $((SECONDS - t0)) s"
echo "$out/builder.tar"
