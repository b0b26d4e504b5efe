#!/usr/bin/env bash
# Enforce the server's layers (docs/architecture.md, "The server in layers"): in
# server/src/server/, a lower layer never uses a higher one, and SQLite stays inside the store.
#
#   scripts/check-layers.sh [--src DIR] [--no-self-test]
#
#   --src DIR        the crate's src/ to check (default: this repository's server/src)
#   --no-self-test   skip the self-test (which runs the check on copies with a violation planted)
#
# Layers, lowest first: model < store < service < transport. A file in a layer's folder may
# name `crate::server::X` only for X a layer at or below its own, and may not climb out of its
# folder with `super::super` (paths across folders are written from `crate::server::`). The
# rules read `use` lines and paths alike, `crate::server::{a, b::c}` groups included, with
# comments removed first. Anywhere in the crate outside store/, `rusqlite` is an error: the
# store is the one seam to the database, so no SQLite type leaks above it.
# Exit 0: layers OK. Exit 1: a violation (each printed as file:line). Exit 2: usage error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
src="$ROOT/server/src"
self_test=1

while (($# > 0)); do
    case "$1" in
    --src) (($# >= 2)) || { echo "check-layers.sh: --src needs a value" >&2; exit 2; }; src="$2"; shift ;;
    --no-self-test) self_test=0 ;;
    -h | --help) sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "check-layers.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

LAYERS=(model store service transport)

# Prints file:line: message for every violation under $1 (a crate's src/); no output = clean.
violations() {
    local src="$1" i layer allowed
    for i in "${!LAYERS[@]}"; do
        layer="${LAYERS[$i]}"
        [[ -d "$src/server/$layer" ]] || { echo "$src/server/$layer: missing layer folder"; continue; }
        allowed="${LAYERS[*]:0:$((i + 1))}"
        find "$src/server/$layer" -name '*.rs' -print0 | xargs -0 perl -e '
            my ($layer, @allowed) = split / /, shift @ARGV;
            my %ok = map { $_ => 1 } @allowed;
            for my $file (@ARGV) {
                open my $fh, "<", $file or die "$file: $!";
                my $text = do { local $/; <$fh> };
                # Comments out (line and block), keeping the line breaks so lines still count.
                $text =~ s{/\*.*?\*/}{ (my $c = $&) =~ s/[^\n]//g; $c }gse;
                $text =~ s{//[^\n]*}{}g;
                my @lines = split /\n/, $text, -1;
                my $line_of = sub { my $pos = shift; (substr($text, 0, $pos) =~ tr/\n//) + 1 };
                # Top-level names after crate::server:: (a single name or a {group}).
                while ($text =~ /\b(?:crate|waypost)::server::/g) {
                    my $start = pos($text);
                    my @names;
                    if (substr($text, $start, 1) eq "{") {
                        my ($depth, $j, $item) = (0, $start, "");
                        for (; $j < length $text; $j++) {
                            my $ch = substr($text, $j, 1);
                            if ($ch eq "{") { $depth++; next if $depth == 1; }
                            if ($ch eq "}") { $depth--; last if $depth == 0; }
                            if ($ch eq "," && $depth == 1) { push @names, $item; $item = ""; next; }
                            $item .= $ch;
                        }
                        push @names, $item;
                    } elsif (substr($text, $start) =~ /^(\w+)/) {
                        @names = ($1);
                    }
                    for my $n (@names) {
                        next unless $n =~ /^\s*(\w+)/;
                        my $name = $1;
                        next if $name eq "self";
                        unless ($ok{$name}) {
                            printf "%s:%d: the %s layer uses crate::server::%s (allowed: %s)\n",
                                $file, $line_of->($start), $layer, $name, join(", ", @allowed);
                        }
                    }
                }
                for my $k (0 .. $#lines) {
                    printf "%s:%d: super::super climbs out of the %s layer; write crate::server::...\n",
                        $file, $k + 1, $layer if $lines[$k] =~ /\bsuper::super\b/;
                }
            }
        ' "$layer $allowed"
    done
    # SQLite only inside the store.
    find "$src" -name '*.rs' -not -path "$src/server/store/*" -print0 | xargs -0 perl -e '
        for my $file (@ARGV) {
            open my $fh, "<", $file or die "$file: $!";
            my $n = 0;
            while (my $l = <$fh>) {
                $n++;
                $l =~ s{//.*}{};
                print "$file:$n: rusqlite outside server/src/server/store (the store is the seam to the database)\n"
                    if $l =~ /\brusqlite\b/;
            }
        }
    '
}

found="$(violations "$src")"
if [[ -n "$found" ]]; then
    echo "check-layers.sh: the server's layers are broken:" >&2
    echo "$found" >&2
    exit 1
fi
echo "check-layers.sh: layers OK (${LAYERS[*]}; SQLite only in store/)"

((self_test)) || exit 0
# Negative controls: the check must fail on a copy with a violation planted, one per rule.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
plant() { # $1: file under src/server, $2: the line to append; prints the violations found
    rm -rf "$tmp/src"
    cp -r "$src" "$tmp/src"
    printf '\n%s\n' "$2" >>"$tmp/src/server/$1"
    violations "$tmp/src"
}
for case in \
    'model/mod.rs|use crate::server::transport::Shared;' \
    'store/mod.rs|use crate::server::{model::App, service::live};' \
    'service/mod.rs|fn f() -> crate::server::transport::Shared { todo!() }' \
    'model/logs.rs|use super::super::Shared;' \
    'service/live.rs|type C = rusqlite::Connection;'; do
    file="${case%%|*}"
    if [[ -z "$(plant "$file" "${case#*|}")" ]]; then
        echo "check-layers.sh: self-test failed: a planted violation in $file went unnoticed: ${case#*|}" >&2
        exit 1
    fi
done
# ...and must not fail on what is allowed (a higher layer using a lower one, in a group too).
if [[ -n "$(plant 'transport/mod.rs' 'use crate::server::{model::{App, InstanceId}, store, service::live};')" ]]; then
    echo "check-layers.sh: self-test failed: an allowed import was reported" >&2
    exit 1
fi
echo "check-layers.sh: self-test OK (6 planted cases)"
