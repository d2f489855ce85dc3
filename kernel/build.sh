#!/usr/bin/env bash
# Build the matchlock guest kernel: a stripped, uncompressed x86_64 vmlinux that QEMU boots
# directly through its PVH ELF note.
#
# Source:  Debian's /usr/src/linux-source-6.1.tar.xz (apt-get install linux-source-6.1)
# Config:  kernel/matchlock.config, merged over allnoconfig
# Output:  ${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/kernel/<hash>/vmlinux
#          <hash> = first 16 hex digits of sha256(fragment + source package version + BUILD_REV)
#          ($MATCHLOCK_CACHE replaces ${XDG_CACHE_HOME:-$HOME/.cache}/matchlock if set, as in
#          internal/paths.) .../kernel/vmlinux is a symlink to the kernel of the last
#          successful run, which is where kernel.DefaultPath looks.
#
# Usage:   kernel/build.sh               build if needed; print the vmlinux path on stdout
#          kernel/build.sh --print-path  print the expected path; exit 1 if it is not built
#
# Only the final path goes to stdout; all progress goes to stderr.
# Environment: MATCHLOCK_KERNEL_JOBS (default: nproc), MATCHLOCK_KERNEL_KEEP_BUILD=1 keeps
# the build tree (for inspecting .config after a failure).
set -euo pipefail

# Bump when this script changes the build in a way the fragment and source version don't
# capture (toolchain flags, strip method, ...), to force a rebuild.
BUILD_REV=1

SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz

# Fragment symbols that may legitimately differ in the final .config. Format: SYMBOL, one
# per entry, each with a reason. Keep this empty unless a symbol is renamed or implied.
ALLOWED_MISMATCH=(
)

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$script_dir/matchlock.config"

log() { printf 'kernel/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -r $fragment ]] || die "missing config fragment $fragment"
pkg_version=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null) ||
	die "package $SRC_PKG is not installed (apt-get install $SRC_PKG)"
[[ -n $pkg_version ]] || die "package $SRC_PKG has no version (not installed?)"

hash=$({ cat "$fragment"; printf '%s\n%s\n' "$pkg_version" "$BUILD_REV"; } | sha256sum | cut -c1-16)
cache_root="${MATCHLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/matchlock}/kernel"
out_dir="$cache_root/$hash"
out="$out_dir/vmlinux"

case "${1:-}" in
--print-path)
	echo "$out"
	[[ -f $out ]] && exit 0 || exit 1
	;;
"") ;;
*) die "unknown argument: $1 (usage: $0 [--print-path])" ;;
esac

# Point .../kernel/vmlinux at this kernel (atomically: a new symlink renamed over the old).
link_latest() {
	ln -sfn "$hash/vmlinux" "$cache_root/.vmlinux.tmp.$$"
	mv -Tf "$cache_root/.vmlinux.tmp.$$" "$cache_root/vmlinux"
}

if [[ -f $out ]]; then
	link_latest
	echo "$out"
	exit 0
fi

for tool in make gcc flex bison bc tar xz strip readelf flock sha256sum; do
	command -v "$tool" >/dev/null || die "missing build tool: $tool (build-essential bc bison flex libelf-dev libssl-dev)"
done
[[ -r $SRC_TARBALL ]] || die "missing $SRC_TARBALL (apt-get install $SRC_PKG)"

mkdir -p "$cache_root"
# One builder per hash: a second caller waits, then finds the finished kernel.
# The lock file is left behind on purpose: deleting it would let a waiter and a newcomer
# lock different files.
exec 9>"$cache_root/.build-$hash.lock"
flock 9
if [[ -f $out ]]; then
	link_latest
	echo "$out"
	exit 0
fi

build="$cache_root/build-$hash"
cleanup() {
	if [[ ${MATCHLOCK_KERNEL_KEEP_BUILD:-} == 1 ]]; then
		log "keeping build tree $build"
	else
		rm -rf "$build"
	fi
}
trap cleanup EXIT
rm -rf "$build"
mkdir -p "$build"

start=$(date +%s)
log "building kernel $hash ($SRC_PKG $pkg_version, BUILD_REV $BUILD_REV) in $build"
log "extracting $SRC_TARBALL"
tar -xJf "$SRC_TARBALL" -C "$build" --strip-components=1

cd "$build"
export ARCH=x86
export KBUILD_BUILD_USER=matchlock KBUILD_BUILD_HOST=matchlock
cp "$fragment" "$build/matchlock.config"

log "merging config fragment over allnoconfig"
scripts/kconfig/merge_config.sh -n matchlock.config >&2

# merge_config.sh only warns about requested values that did not make it (a typo, an unmet
# dependency, a symbol gone in this kernel version). Fail instead.
is_allowed() {
	local s
	for s in "${ALLOWED_MISMATCH[@]}"; do [[ $s == "$1" ]] && return 0; done
	return 1
}
missing=()
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		sym=${BASH_REMATCH[1]}
		grep -qxF -- "$line" .config && continue
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		sym=${BASH_REMATCH[1]}
		# "not set" holds whether the line is present or the symbol is absent altogether.
		grep -q -- "^$sym=" .config || continue
	else
		continue
	fi
	is_allowed "$sym" && continue
	actual=$(grep -E -- "^$sym=|^# $sym is not set" .config || true)
	missing+=("  requested: $line    final: ${actual:-<absent>}")
done <matchlock.config
if ((${#missing[@]})); then
	log "error: ${#missing[@]} fragment line(s) did not survive into the final .config:"
	printf '%s\n' "${missing[@]}" >&2
	log "fix kernel/matchlock.config (or document an exception in ALLOWED_MISMATCH)"
	exit 1
fi
log "all fragment lines present in .config"

jobs=${MATCHLOCK_KERNEL_JOBS:-$(nproc)}
log "make -j$jobs vmlinux"
make -j"$jobs" vmlinux >&2

# strip drops the symbol table only; the PVH entry note lives in an allocated .notes section
# and must survive (QEMU boots an ELF kernel only through it).
strip -o vmlinux.stripped vmlinux
# XEN_ELFNOTE_PHYS32_ENTRY = 18 (0x12), owner "Xen".
notes=$(readelf -n vmlinux.stripped)
grep -Eq '^ *Xen .*(0x00000012|PHYS32_ENTRY)' <<<"$notes" ||
	die "stripped vmlinux has no PVH (Xen PHYS32_ENTRY) note; is CONFIG_PVH set?"

mkdir -p "$out_dir"
cp .config "$out_dir/.config.tmp.$$"
mv -f "$out_dir/.config.tmp.$$" "$out_dir/config"
cp vmlinux.stripped "$out_dir/.vmlinux.tmp.$$"
mv -f "$out_dir/.vmlinux.tmp.$$" "$out"
link_latest

log "built vmlinux ($(stat -c %s "$out") bytes) in $(($(date +%s) - start)) s"
echo "$out"
