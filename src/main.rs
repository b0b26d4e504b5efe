fn main() {
    std::process::exit(waypost_entrypoint::main())
}
