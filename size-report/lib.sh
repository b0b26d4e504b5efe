# shellcheck shell=bash
# Shared helpers for size-report/*.sh. Sourced, never run; the caller sets `set -euo pipefail`.
#
# Provides:
#   ROOT            the repository root (the directory holding the workspace Cargo.toml)
#   TARGET          the shipped target triple
#   PROFILE         the shipped cargo profile
#   PKG             the shipped package (and binary) name
#   die MSG...      print "NAME: MSG" on stderr and exit 1
#   require_target  exit with a clear message if the musl std library is not installed
#   build_min       build the shipped binary; prints its path on stdout (cargo's output goes to stderr)
#   read_budget     print the size budget in bytes from size-report/budget (comment lines ignored)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
TARGET=x86_64-unknown-linux-musl
PROFILE=min
PKG=waypost-entrypoint
BUDGET_FILE="$ROOT/size-report/budget"

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

# The musl standard library must already be installed; installing toolchains is .ci/run's job,
# not this script's (it may run on a developer's machine).
require_target() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH"
    local sysroot
    # Run rustc from the repo root so a rust-toolchain file there (if any) picks the toolchain.
    sysroot="$(cd "$ROOT" && rustc --print sysroot)" || die "could not run 'rustc --print sysroot'"
    if [[ ! -d "$sysroot/lib/rustlib/$TARGET/lib" ]]; then
        die "the Rust target $TARGET is not installed for the toolchain at $sysroot
  install it with:  rustup target add $TARGET   (and: apt-get install musl-tools)"
    fi
}

# cargo's target directory (honours CARGO_TARGET_DIR and .cargo/config build.target-dir).
target_dir() {
    local meta dir
    meta="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null)" ||
        die "'cargo metadata' failed in $ROOT"
    dir="$(grep -o '"target_directory":"[^"]*"' <<<"$meta" | head -n1 | sed 's/^"target_directory":"//; s/"$//')"
    [[ -n "$dir" ]] || die "could not find the target directory in 'cargo metadata' output"
    printf '%s\n' "$dir"
}

build_min() {
    require_target
    local rc=0
    (cd "$ROOT" && cargo build --profile "$PROFILE" --target "$TARGET" -p "$PKG" >&2) || rc=$?
    if ((rc != 0)); then
        if ! command -v musl-gcc >/dev/null 2>&1 && ! command -v x86_64-linux-musl-gcc >/dev/null 2>&1; then
            echo "$(basename "$0"): hint: no musl C compiler found (apt-get install musl-tools); crates with C code need it" >&2
        fi
        die "build failed: cargo build --profile $PROFILE --target $TARGET -p $PKG (exit $rc)"
    fi
    local bin
    bin="$(target_dir)/$TARGET/$PROFILE/$PKG"
    [[ -x "$bin" ]] || die "build succeeded but $bin is missing or not executable"
    printf '%s\n' "$bin"
}

read_budget() {
    [[ -r "$BUDGET_FILE" ]] || die "cannot read the budget file $BUDGET_FILE"
    local -a values
    # Drop comment lines (optionally indented) and blank lines; what is left must be one number.
    mapfile -t values < <(grep -Ev '^[[:space:]]*(#|$)' "$BUDGET_FILE" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    if ((${#values[@]} != 1)) || [[ ! "${values[0]}" =~ ^[0-9]+$ ]]; then
        die "size-report/budget must hold exactly one number of bytes besides # comment lines (found: ${values[*]:-nothing})"
    fi
    printf '%s\n' "$((10#${values[0]}))"
}
