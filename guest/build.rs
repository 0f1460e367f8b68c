//! Link the kernel with the top-level linker script when building for the bare-metal target.

fn main() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rustc-link-arg-bins=--gc-sections");
    }
}
