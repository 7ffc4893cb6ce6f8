//! Compiles tests/cpp/bridge_test.cpp with the system C++ compiler against
//! the crate's static library and the cxx-generated header, runs it, and
//! fails on any failed C++ check. Skipped (with a message) only when no C++
//! compiler exists; CI has g++.

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>` of this test binary (`target/<profile>/deps/…`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn cpp_program_against_static_lib() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        // A skip is not a pass: the bridge's C++ side is what this tests.
        panic!("no C++ compiler `{cxx}` (install g++ or set CXX)");
    }
    // `cargo test` builds the rlib only: build the staticlib (same profile,
    // same target dir) so the C++ program links the current code.
    let prof = profile_dir();
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-p", "infinitehip-cpp-bridge", "--lib"]);
    if prof.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let st = build
        .env("CARGO_TARGET_DIR", prof.parent().unwrap())
        .status()
        .expect("run cargo build");
    assert!(st.success(), "cargo build of the static library failed");
    let lib = prof.join("libinfinitehip_bridge.a");
    assert!(lib.exists(), "static library missing: {}", lib.display());
    let include = prof.parent().unwrap().join("cxxbridge");
    assert!(
        include.join("infinitehip-cpp-bridge/src/lib.rs.h").exists(),
        "generated header missing under {}",
        include.display()
    );
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cpp/bridge_test.cpp");
    let exe = prof.join("bridge_test_cpp");
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-Wall", "-fPIE"])
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm"])
        .output()
        .expect("run the C++ compiler");
    assert!(
        out.status.success(),
        "C++ compile failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run bridge_test");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "bridge_test failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
