//! Generates the prost types from waypost.proto with protox (pure Rust, no system protoc).
fn main() {
    println!("cargo:rerun-if-changed=waypost.proto");
    let fds = protox::compile(["waypost.proto"], ["."]).expect("waypost.proto does not compile");
    let mut cfg = prost_build::Config::new();
    // BTreeMap works without std (the crate is no_std + alloc) and gives a stable order, so an
    // encoded snapshot is byte-identical for identical contents.
    cfg.btree_map(["."]);
    cfg.compile_fds(fds).expect("prost code generation failed");
}
