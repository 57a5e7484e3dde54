//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

pub mod http;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flux_golden::Golden;
use flux_pipeline::{read_png, GenerateRequest, InitImage};

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

/// The request of a task golden case (`tasks.safetensors`): every field its record has
/// (pictures by file name in the golden folder).
pub fn task_request(g: &Golden, case: &str) -> GenerateRequest {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let m = g.case_meta(case);
    let picture = |key: &str| {
        m[key]
            .as_str()
            .map(|f| read_png(&dir.join(f)).unwrap().image)
    };
    GenerateRequest {
        prompts: vec![m["prompt"].as_str().unwrap().to_string()],
        width: m["width"].as_u64().unwrap() as usize,
        height: m["height"].as_u64().unwrap() as usize,
        steps: Some(m["steps"].as_u64().unwrap() as usize),
        guidance: m["guidance"].as_f64().map(|g| g as f32),
        seeds: vec![m["seed"].as_u64().unwrap()],
        max_sequence_length: Some(m["max_sequence_length"].as_u64().unwrap() as usize),
        image: picture("image").map(|image| InitImage {
            image,
            strength: m["strength"].as_f64().unwrap(),
            mask: picture("mask"),
        }),
        edit_image: picture("edit_image"),
        control_image: picture("control_image"),
        negative_prompt: m["negative_prompt"].as_str().map(String::from),
        true_cfg: m["true_cfg"].as_f64().unwrap_or(1.0) as f32,
        ..Default::default()
    }
}
