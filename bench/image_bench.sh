#!/usr/bin/env bash
# Pull + convert of a ~100 MB, three-layer image from a local docker-registry,
# first time and cached, against doing it by hand with skopeo copy + umoci
# unpack + mkfs.ext4 -d. Prints the Go benchmark's log and metrics.
#
#   bench/image_bench.sh [COUNT]     (COUNT runs, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in docker-registry:docker-registry skopeo:skopeo umoci:umoci mkfs.ext4:e2fsprogs busybox:busybox-static; do
	command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
	echo "installing ${need[*]}" >&2
	apt-get install -y "${need[@]}" >/dev/null
fi

exec go test ./image/ -run '^$' -bench '^BenchmarkPullConvert$' -benchtime 1x -count "${1:-3}" -timeout 20m
