//! The `flux` binary on the committed tiny model: PNG size and metadata, re-running from the
//! metadata, and errors that stop before any work.

use std::path::{Path, PathBuf};
use std::process::Command;

use flux_pipeline::{read_png, ModelSource, PARAMS_KEY};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flux-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn flux(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flux"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_writes_png_with_parameters_and_reruns_identically() {
    let model = tiny();
    let out = tmp("first-{seed}.png");
    let o = flux(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red fox in the snow, 日本",
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "3",
        "--guidance",
        "4.5",
        "--seed",
        "1234",
        "--output",
        out.to_str().unwrap(),
        "--offline",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("encode") && stderr.contains("denoise") && stderr.contains("decode"),
        "{stderr}"
    );
    let first = tmp("first-1234.png");
    let png = read_png(&first).unwrap();
    assert_eq!((png.image.width, png.image.height), (96, 64));
    let p = png.params.clone().expect("parameters chunk");
    assert_eq!(
        (
            p.prompt.as_str(),
            p.seed,
            p.steps,
            p.guidance,
            p.width,
            p.height
        ),
        ("a red fox in the snow, 日本", 1234, 3, Some(4.5), 96, 64)
    );
    // the individual chunks are there too
    let bytes = std::fs::read(&first).unwrap();
    for key in [
        PARAMS_KEY, "prompt", "seed", "steps", "guidance", "model", "version",
    ] {
        assert!(
            bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "chunk {key} missing"
        );
    }
    // re-run from the metadata: identical pixels
    let again = tmp("again.png");
    let o = flux(&[
        "generate",
        "--from-image",
        first.to_str().unwrap(),
        "--output",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png2 = read_png(&again).unwrap();
    assert_eq!(png2.image, png.image);
    assert_eq!(png2.params, png.params);
    // no temporary files left behind
    let leftovers: Vec<_> = std::fs::read_dir(first.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty());
}

fn fails_with(args: &[&str], needle: &str) {
    let o = flux(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
    assert!(
        err.lines().next().unwrap_or("").starts_with("error: "),
        "{err}"
    );
}

#[test]
fn errors_are_one_line_with_a_hint() {
    let m = tiny();
    let m = m.to_str().unwrap();
    let ok = tmp("x.png");
    let ok = ok.to_str().unwrap();
    fails_with(
        &[
            "generate", "--model", m, "--prompt", "a", "--width", "100", "--output", ok,
        ],
        "multiple of 16",
    );
    fails_with(
        &[
            "generate", "--model", m, "--prompt", "a", "--steps", "0", "--width", "64", "--height",
            "64", "--output", ok,
        ],
        "steps",
    );
    fails_with(
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "a",
            "--output",
            "/nonexistent-dir/x.png",
        ],
        "cannot write here",
    );
    fails_with(
        &[
            "generate", "--model", m, "--prompt", "a", "--device", "cuda", "--output", ok,
        ],
        "CUDA",
    );
    fails_with(
        &[
            "generate",
            "--model",
            "not a model",
            "--prompt",
            "a",
            "--output",
            ok,
        ],
        "hub id",
    );
    let cache = tmp("empty-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_flux"))
        .env("HF_HOME", &cache)
        .args([
            "generate",
            "--model",
            "someone/some-flux",
            "--offline",
            "--prompt",
            "a",
            "--output",
            ok,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("not in the Hugging Face cache")
            && err.contains("hint:"),
        "{err}"
    );
}

fn copy_resolved(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if from.is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            copy_resolved(&from, &to);
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

#[test]
fn offline_hub_source_reads_the_cache_and_names_missing_files() {
    // A Hugging Face cache laid out as hf-hub writes it: refs/main → snapshot folder.
    let cache = tmp("hf-cache/hub");
    let repo = cache.join("models--tiny--flux");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    copy_resolved(&tiny(), &snap);
    let src = ModelSource::Hub {
        repo: "tiny/flux".into(),
        offline: true,
        cache_dir: Some(cache.clone()),
    };
    let files = src.resolve().unwrap();
    assert!(
        files.shift.is_some(),
        "dev scheduler config read from the cache"
    );
    std::fs::remove_file(snap.join("vae/config.json")).unwrap();
    let err = src.resolve().unwrap_err();
    assert!(err.to_string().contains("vae/config.json"), "{err}");
    assert!(
        err.hint().unwrap().contains("diffusers folder"),
        "{:?}",
        err.hint()
    );
}
