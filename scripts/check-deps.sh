#!/usr/bin/env bash
# Enforce the entrypoint's dependency boundary (docs/architecture.md): no tokio, anyhow, thiserror, clap,
# tracing or serde in the entrypoint's normal (non-dev, non-build) dependency tree.
#
#   scripts/check-deps.sh [--package P] [--manifest-path PATH] [--target T]
#
#   --package P           the package to check (default: waypost-entrypoint)
#   --manifest-path PATH  the Cargo.toml of the workspace to run in (default: this repository's)
#   --target T            the target whose dependencies count (default: x86_64-unknown-linux-musl)
#
# Forbidden: the exact crates anyhow, thiserror, clap, and every crate named tokio, tracing or
# serde or starting with one of those followed by - or _ (tokio-util, tracing-core, serde_json).
# Proc-macros count too (the rule is about the tree, as `cargo tree -e normal` shows it); that is
# why waypost-proto generates its prost impls itself instead of using prost-derive.
# Exit 0: boundary OK. Exit 1: a forbidden crate is in the tree. Exit 2: usage or cargo error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
package=waypost-entrypoint
manifest="$ROOT/Cargo.toml"
target=x86_64-unknown-linux-musl

usage() { sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
need_arg() { (($# >= 2)) || { echo "check-deps.sh: $1 needs a value" >&2; exit 2; }; }

while (($# > 0)); do
    case "$1" in
    --package | -p) need_arg "$@"; package="$2"; shift ;;
    --package=*) package="${1#*=}" ;;
    --manifest-path) need_arg "$@"; manifest="$2"; shift ;;
    --manifest-path=*) manifest="${1#*=}" ;;
    --target) need_arg "$@"; target="$2"; shift ;;
    --target=*) target="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    *) echo "check-deps.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[[ -f "$manifest" ]] || { echo "check-deps.sh: no such manifest: $manifest" >&2; exit 2; }
manifest="$(cd "$(dirname "$manifest")" && pwd -P)/$(basename "$manifest")"
command -v cargo >/dev/null 2>&1 || { echo "check-deps.sh: cargo not found on PATH" >&2; exit 2; }

# Run from the manifest's directory (the repo root by default), as `cargo tree` would be run by hand.
tree() { (cd "$(dirname "$manifest")" && cargo tree --manifest-path "$manifest" -p "$package" --target "$target" "$@"); }

err="$(mktemp)"
trap 'rm -f "$err"' EXIT
if ! all="$(tree -e normal --prefix none 2>"$err")"; then
    echo "check-deps.sh: 'cargo tree -p $package -e normal --target $target' failed:" >&2
    cat "$err" >&2
    exit 2
fi
# Lines look like `serde_json v1.0.140`, `tokio v1.45.0 (*)`, `prost-derive v0.14.6 (proc-macro)`.
# Keep "name vVERSION" (the package id), one per package.
ids() { awk 'NF >= 2 && $2 ~ /^v[0-9]/ { print $1 " " $2 }' | sort -u; }
forbidden='^((anyhow|thiserror|clap)|(tokio|tracing|serde)([-_][^ ]*)?) '

all_ids="$(ids <<<"$all")"
count="$(grep -c . <<<"$all_ids" || true)"

failed=0
while read -r name version; do
    [[ -n "$name" ]] || continue
    failed=1
    echo "forbidden dependency: $name $version in $package. Path (cargo tree -i $name@${version#v}):" >&2
    tree -e normal -i "$name@${version#v}" 2>&1 | sed 's/^/    /' >&2 || true
done < <(grep -E "$forbidden" <<<"$all_ids" || true)

if ((failed)); then
    echo "dependency boundary VIOLATED for $package: see above; docs/architecture.md forbids tokio, anyhow, thiserror, clap, tracing, serde in the entrypoint" >&2
    exit 1
fi
echo "dependency boundary OK ($count crates)"
