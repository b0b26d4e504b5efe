#!/usr/bin/env bash
# Fail if the shipped waypost-entrypoint binary is bigger than size-report/budget.
#
#   size-report/check-budget.sh            build it (profile min, musl) and check
#   size-report/check-budget.sh PATH       check an already built binary, no build
#
# Exit 0: within budget. Exit 1: over budget, or the build/budget file/binary is broken.
set -euo pipefail
# shellcheck source=size-report/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

case "${1:-}" in
-h | --help) usage; exit 0 ;;
-*) usage >&2; exit 2 ;;
esac
(($# <= 1)) || { usage >&2; exit 2; }

budget="$(read_budget)"
if (($# == 1)); then
    bin="$1"
    [[ -f "$bin" ]] || die "no such file: $bin"
else
    bin="$(build_min)"
fi

size="$(stat -L -c %s "$bin")"
if ((size > budget)); then
    echo "waypost-entrypoint is $size bytes, over the budget of $budget bytes (size-report/budget)" >&2
    exit 1
fi
pct="$(awk -v s="$size" -v b="$budget" 'BEGIN { printf "%.1f", (b > 0 ? 100 * s / b : 0) }')"
echo "size OK: $size bytes (budget $budget, $pct% used)"
