//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// Copies folder `src` into `dst` recursively, symbolic links resolved (the copy can be altered
/// without touching the committed files).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if from.is_dir() {
            copy_dir(&from, &to);
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// Runs the `flux` binary in `cwd` with `args`.
pub fn flux_in<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flux"))
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap()
}
