//! The `waypost` binary: see `waypost --help`.

#![deny(unsafe_code)]

fn main() {
    std::process::exit(waypost::cli::main());
}
