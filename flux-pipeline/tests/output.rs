//! Careless and hostile use of the `flux` binary: outputs that must never be replaced or
//! collide, output patterns checked before any model loads, closed pipes, prompt files, and
//! faithful re-runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flux_pipeline::read_png;

mod common;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev")
}

fn dir(name: &str) -> PathBuf {
    flux_golden::scratch_dir(&format!("output-{name}"))
}

/// `flux generate` on the tiny model, 64×64, 1 step, with `extra` flags.
fn generate(cwd: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny();
    Command::new(env!("CARGO_BIN_EXE_flux"))
        .current_dir(cwd)
        .args(["generate", "--model", model.to_str().unwrap()])
        .args([
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--offline",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The image paths a run in `cwd` printed (`PATH (seed N)`), joined to `cwd`.
fn ok_in(cwd: &Path, o: &std::process::Output) -> Vec<PathBuf> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.rsplit_once(" (seed ").map(|(p, _)| cwd.join(p)))
        .collect()
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn existing_files_are_never_replaced_and_names_never_collide() {
    let d = dir("numbering");
    let first = ok_in(
        &d,
        &generate(&d, &["--prompt", "a cat", "--seed", "1", "-o", "img.png"]),
    );
    assert_eq!(first, vec![d.join("img.png")]);
    let before = std::fs::read(d.join("img.png")).unwrap();
    // same name again, another seed: a numbered name, the first file untouched
    let second = ok_in(
        &d,
        &generate(&d, &["--prompt", "a cat", "--seed", "2", "-o", "img.png"]),
    );
    assert_eq!(second, vec![d.join("img-1.png")]);
    assert_eq!(std::fs::read(d.join("img.png")).unwrap(), before);
    // two images of one run mapping to one name ({seed} with the same seed twice)
    let dup = ok_in(
        &d,
        &generate(
            &d,
            &[
                "--prompt",
                "a cat",
                "--seed",
                "5,5",
                "--num-images",
                "2",
                "-o",
                "s-{seed}.png",
            ],
        ),
    );
    assert_eq!(dup, vec![d.join("s-5.png"), d.join("s-5-1.png")]);
    // --overwrite replaces
    let over = ok_in(
        &d,
        &generate(
            &d,
            &[
                "--prompt",
                "a dog",
                "--seed",
                "3",
                "-o",
                "img.png",
                "--overwrite",
            ],
        ),
    );
    assert_eq!(over, vec![d.join("img.png")]);
    assert_ne!(std::fs::read(d.join("img.png")).unwrap(), before);
    // a folder as the output: the default name inside it
    std::fs::create_dir_all(d.join("into")).unwrap();
    let inside = ok_in(
        &d,
        &generate(&d, &["--prompt", "a cat", "--seed", "9", "-o", "into"]),
    );
    assert_eq!(inside, vec![d.join("into/flux-9.png")]);
    assert!(
        !names(&d).iter().any(|n| n.contains(".partial")),
        "{:?}",
        names(&d)
    );
}

/// Bad output patterns are refused before the model is even looked at (the model named here
/// does not exist: the error must be about the output).
#[test]
fn output_patterns_are_checked_before_anything_loads() {
    let d = dir("patterns");
    let long = format!("{}.png", "n".repeat(240));
    for (pattern, needle) in [
        ("", "empty"),
        ("{seed}/x.png", "file name only"),
        ("x-{sed}.png", "unknown template"),
        ("x.jpg", "PNG"),
        (long.as_str(), "limit is 255"),
        ("missing-folder/x.png", "no such folder"),
        ("missing-folder/", "no such folder"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_flux"))
            .current_dir(&d)
            .args([
                "generate",
                "--model",
                "nobody/nothing",
                "--offline",
                "--prompt",
                "a",
            ])
            .args(["--output", pattern])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{pattern:?}: {err}"
        );
        assert!(
            !err.contains("nobody/nothing"),
            "{pattern:?}: the model was looked at: {err}"
        );
    }
    // a file where the folder should be
    std::fs::write(d.join("plain"), "x").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_flux"))
        .current_dir(&d)
        .args([
            "generate",
            "--model",
            "nobody/nothing",
            "--prompt",
            "a",
            "-o",
            "plain/x.png",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a folder"));
}

/// `flux … | head -0` and a closed stderr: a quiet end, never a panic; the image is written.
#[test]
fn closed_stdout_or_stderr_is_not_a_panic() {
    let d = dir("pipes");
    let model = tiny();
    let run = |stdout: Stdio, stderr: Stdio, out: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flux"))
            .current_dir(&d)
            .args(["generate", "--model", model.to_str().unwrap(), "--offline"])
            .args([
                "--width", "64", "--height", "64", "--steps", "1", "--prompt", "a",
            ])
            .args(["--output", out])
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        // close our ends at once: the child's writes meet a broken pipe
        drop(c.stdout.take());
        drop(c.stderr.take());
        c.wait().unwrap()
    };
    let st = run(Stdio::piped(), Stdio::null(), "a.png");
    assert!(st.success(), "closed stdout: {st:?}");
    assert!(d.join("a.png").is_file());
    let st = run(Stdio::null(), Stdio::piped(), "b.png");
    assert!(st.success(), "closed stderr: {st:?}");
    assert!(d.join("b.png").is_file());
    // an error message to a closed stderr: still the failure status, not a panic (101)
    let mut c = Command::new(env!("CARGO_BIN_EXE_flux"))
        .args(["generate", "--model", "not a model", "--prompt", "a"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stderr.take());
    assert_eq!(c.wait().unwrap().code(), Some(1));
}

#[test]
fn prompt_files_are_bounded_checked_and_batched() {
    let d = dir("prompts");
    let bad = |bytes: &[u8], needle: &str| {
        std::fs::write(d.join("p.txt"), bytes).unwrap();
        let o = generate(&d, &["--prompt-file", "p.txt"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{needle}: {err}"
        );
    };
    bad(b"a cat\na dog\x00\n", "line 2 contains a NUL byte");
    bad(b"a cat\n\na \xff dog\n", "line 3 is not valid UTF-8");
    let big = std::fs::File::create(d.join("p.txt")).unwrap();
    big.set_len((16 << 20) + 1).unwrap();
    let o = generate(&d, &["--prompt-file", "p.txt"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("larger than 16 MiB"));
    // 17 prompts: two batches; seeds continue across them, every image written
    let prompts: Vec<String> = (0..17).map(|i| format!("prompt number {i}")).collect();
    std::fs::write(d.join("p.txt"), prompts.join("\n")).unwrap();
    let out = ok_in(
        &d,
        &generate(
            &d,
            &[
                "--prompt-file",
                "p.txt",
                "--seed",
                "100",
                "-o",
                "b-{index}.png",
            ],
        ),
    );
    assert_eq!(out.len(), 17);
    for (i, p) in out.iter().enumerate() {
        let params = read_png(p).unwrap().params.unwrap();
        assert_eq!(
            (params.seed, params.prompt.as_str()),
            (100 + i as u64, prompts[i].as_str())
        );
        assert_eq!(p, &d.join(format!("b-{i}.png")));
    }
}

/// `--from-image` restores what changes pixels (dtype, tiling, component files) and finds the
/// same model from another folder; a recorded hub model is never downloaded.
#[test]
fn reruns_restore_dtype_files_and_model() {
    let d = dir("rerun");
    let other = dir("rerun-elsewhere");
    let flux_file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/tiny-dev-bfl/flux.safetensors");
    // a relative --model and --transformer, from the model's parent folder
    let parent = tiny().parent().unwrap().to_path_buf();
    let rel = pathdiff(&flux_file, &parent);
    let o = Command::new(env!("CARGO_BIN_EXE_flux"))
        .current_dir(&parent)
        .args([
            "generate",
            "--model",
            "tiny-dev",
            "--offline",
            "--prompt",
            "a fox",
        ])
        .args([
            "--width", "64", "--height", "64", "--steps", "2", "--seed", "4",
        ])
        .args(["--dtype", "bf16", "--tiled-vae", "--transformer", &rel])
        .arg("--output")
        .arg(d.join("first.png"))
        .output()
        .unwrap();
    let first = ok_in(&parent, &o);
    let p1 = read_png(&first[0]).unwrap();
    let params = p1.params.clone().unwrap();
    assert_eq!(params.dtype, "bf16");
    assert!(params.tiled_vae);
    assert_eq!(
        params.files.get("transformer").map(PathBuf::from),
        Some(flux_file.canonicalize().unwrap())
    );
    assert!(Path::new(&params.model).is_absolute(), "{}", params.model);
    let o = Command::new(env!("CARGO_BIN_EXE_flux"))
        .current_dir(&other)
        .arg("generate")
        .arg("--from-image")
        .arg(&first[0])
        .args(["--output", "again.png"])
        .output()
        .unwrap();
    let again = ok_in(&other, &o);
    let p2 = read_png(&again[0]).unwrap();
    assert_eq!(p2.image, p1.image, "same pixels");
    assert_eq!(p2.params, p1.params);
    // an image recorded with a hub model that is not in the cache: no download, a clear error
    let mut params = params;
    params.model = "someone/absent-model".into();
    params.files.clear();
    flux_pipeline::write_png(&d.join("hub.png"), &p1.image, &params).unwrap();
    let cache = dir("empty-cache");
    let o = Command::new(env!("CARGO_BIN_EXE_flux"))
        .current_dir(&other)
        .env("HF_HOME", &cache)
        .env("HF_ENDPOINT", "http://127.0.0.1:9") // nothing listens: a download would fail loudly
        .arg("generate")
        .arg("--from-image")
        .arg(d.join("hub.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("someone/absent-model") && err.contains("--model"),
        "{err}"
    );
}

/// `to` relative to `from` (both under one root).
fn pathdiff(to: &Path, from: &Path) -> String {
    let to = to.canonicalize().unwrap();
    let from = from.canonicalize().unwrap();
    let mut up = PathBuf::new();
    let mut base = from.as_path();
    while !to.starts_with(base) {
        up.push("..");
        base = base.parent().unwrap();
    }
    up.join(to.strip_prefix(base).unwrap())
        .to_string_lossy()
        .into_owned()
}

/// Ctrl-C in the middle of a batch: the finished images stay (each saved when decoded), no
/// temporary file is left, and the exit status says interrupted (130).
#[cfg(unix)]
#[test]
fn interrupt_keeps_finished_images_and_no_temporary_file() {
    let d = dir("sigint");
    let model = tiny();
    let mut c = Command::new(env!("CARGO_BIN_EXE_flux"))
        .current_dir(&d)
        .args(["generate", "--model", model.to_str().unwrap(), "--offline"])
        .args([
            "--width", "64", "--height", "64", "--steps", "20", "--prompt", "a",
        ])
        .args(["--num-images", "200", "--seed", "1", "-o", "i-{index}.png"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !d.join("i-1.png").exists() {
        assert!(start.elapsed().as_secs() < 120, "no image after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let st = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(c.wait().unwrap().code(), Some(130));
    let left = names(&d);
    assert!(!left.iter().any(|n| n.contains(".partial")), "{left:?}");
    assert!(left.len() >= 2 && left.len() < 200, "{left:?}");
    for n in left {
        read_png(&d.join(&n)).unwrap_or_else(|e| panic!("{n} is not whole: {e}"));
    }
}

/// A re-run warns when the files under the recorded model path have changed since.
#[test]
fn rerun_notices_a_changed_model() {
    let d = dir("changed");
    let model = d.join("model");
    common::copy_dir(&tiny(), &model);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_flux"))
            .current_dir(&d)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&[
        "generate",
        "--model",
        "model",
        "--offline",
        "--prompt",
        "a",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--seed",
        "1",
        "-o",
        "a.png",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = read_png(&d.join("a.png")).unwrap().params.unwrap();
    assert!(p.model_fingerprint.is_some());
    // unchanged: no warning
    let o = run(&["generate", "--from-image", "a.png", "-o", "b.png"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !err.contains("differ from the ones"),
        "{err}"
    );
    // a config edited meanwhile: said so
    let cfg = model.join("transformer/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\n")).unwrap();
    let o = run(&["generate", "--from-image", "a.png", "-o", "c.png"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("differ from the ones that made the image"),
        "{err}"
    );
}
