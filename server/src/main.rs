//! The `waypost` binary: see `waypost --help`.

fn main() {
    std::process::exit(waypost::cli::main());
}
