#!/usr/bin/env bash
# All tests: vet, unit and VM integration tests, bounded fuzzing of every
# parser that reads guest- or user-controlled bytes, and the Python SDK
# suite when present. Called by `make test` and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZTIME=${FUZZTIME:-10s}

echo "== go vet"
go vet ./...

echo "== go test"
go test -count=1 -timeout 45m ./...

echo "== fuzz (${FUZZTIME} each)"
# fuzz_one DIR FN BUDGET runs one target. Go 1.26's fuzz coordinator can
# fail a duration-bounded run with a bare "context deadline exceeded" when
# the time runs out while a worker is mid-call (golang/go#75804, fixed in
# Go 1.27): no input failed and none was written. Such a run is repeated
# once with a count budget as large as the work it had done, which has no
# deadline to race; any other failure, or that one failing too, fails.
fuzz_one() {
  local dir=$1 fn=$2 budget=$3 out execs
  if out=$(go test -run='^$' -fuzz="^${fn}\$" -fuzztime="$budget" "./$dir" 2>&1); then
    return 0
  fi
  if [[ $budget != *x ]] && grep -q '^    context deadline exceeded$' <<<"$out" &&
     ! grep -q 'Failing input written to' <<<"$out"; then
    execs=$(grep -oE 'execs: [0-9]+' <<<"$out" | tail -1 | awk '{print $2}')
    (( ${execs:-0} >= 1000 )) || execs=1000
    echo "   $fn: deadline race in Go's fuzz coordinator after $execs execs; again for ${execs}x"
    fuzz_one "$dir" "$fn" "${execs}x"
    return
  fi
  printf '%s\n' "$out" | tail -40
  return 1
}
# Every Fuzz* function in the module.
grep -rl --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]+\(' . | sort | while read -r f; do
  dir=$(dirname "$f")
  for fn in $(grep -oE '^func Fuzz[A-Za-z0-9_]+' "$f" | awk '{print $2}'); do
    echo "-- $dir $fn"
    fuzz_one "$dir" "$fn" "$FUZZTIME" || exit 1
  done
done

if [ -d sdk/python/tests ]; then
  echo "== python sdk"
  (cd sdk/python && python3 -m unittest discover -s tests -v)
fi
echo "== all tests passed"
