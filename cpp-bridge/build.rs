// Generates the C++ side of the bridge. The header lands in
// target/cxxbridge/infinitehip-cpp-bridge/src/lib.rs.h and cxx's runtime
// header in target/cxxbridge/rust/cxx.h; C++ code includes both with
// `-I target/cxxbridge`.
fn main() {
    cxx_build::bridge("src/lib.rs")
        .std("c++17")
        .flag_if_supported("-fPIC")
        .compile("infinitehip_bridge_cxx");
    println!("cargo:rerun-if-changed=src/lib.rs");
}
