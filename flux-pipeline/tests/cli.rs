//! The `flux` binary on the committed tiny model: PNG size and metadata, re-running from the
//! metadata, and errors that stop before any work.

use std::path::{Path, PathBuf};
use std::process::Command;

use flux_pipeline::{read_png, ModelSource, PARAMS_KEY};

mod common;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev")
}

fn tmp(name: &str) -> PathBuf {
    flux_golden::scratch(name)
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
        "no such folder",
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

#[test]
fn offline_hub_source_reads_the_cache_and_names_missing_files() {
    // A Hugging Face cache laid out as hf-hub writes it: refs/main → snapshot folder.
    let cache = tmp("hf-cache/hub");
    let repo = cache.join("models--tiny--flux");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    common::copy_dir(&tiny(), &snap);
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

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(rel)
}

/// Generates a 64×64 image of the tiny model with `extra` flags; returns its pixels.
fn tiny_image(name: &str, extra: &[&str]) -> Vec<u8> {
    let out = tmp(name);
    let model = tiny();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a lighthouse at dusk",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "7",
        "--output",
        out.to_str().unwrap(),
        "--offline",
    ];
    args.extend_from_slice(extra);
    let o = flux(&args);
    assert!(
        o.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    read_png(&written(&o)[0]).unwrap().image.data
}

/// The image paths a run printed on stdout (`PATH (seed N)`).
fn written(o: &std::process::Output) -> Vec<PathBuf> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.rsplit_once(" (seed ").map(|(p, _)| PathBuf::from(p)))
        .collect()
}

/// An all-in-one file as ComfyUI writes them: the four components under their prefixes.
fn all_in_one(path: &Path) {
    use candle::Device;
    let mut all = std::collections::HashMap::new();
    let mut add = |prefix: &str, file: PathBuf| {
        for (k, v) in candle::safetensors::load(&file, &Device::Cpu).unwrap() {
            all.insert(format!("{prefix}{k}"), v);
        }
    };
    add(
        "model.diffusion_model.",
        golden("tiny-dev-bfl/flux.safetensors"),
    );
    add("vae.", golden("tiny-dev-bfl/ae.safetensors"));
    add(
        "text_encoders.clip_l.transformer.",
        tiny().join("text_encoder/model.safetensors"),
    );
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        add(
            "text_encoders.t5xxl.transformer.",
            tiny().join("text_encoder_2").join(shard),
        );
    }
    candle::safetensors::save(&all, path).unwrap();
}

#[test]
fn component_files_and_all_in_one_give_the_same_image() {
    let base = tiny_image("base.png", &[]);
    // each component from its own single file (BFL transformer and ae, CLIP and T5 files)
    let t5 = tmp("t5.safetensors");
    let mut t5_all = std::collections::HashMap::new();
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        t5_all.extend(
            candle::safetensors::load(
                tiny().join("text_encoder_2").join(shard),
                &candle::Device::Cpu,
            )
            .unwrap(),
        );
    }
    candle::safetensors::save(&t5_all, &t5).unwrap();
    let parts = tiny_image(
        "parts.png",
        &[
            "--transformer",
            golden("tiny-dev-bfl/flux.safetensors").to_str().unwrap(),
            "--vae",
            golden("tiny-dev-bfl/ae.safetensors").to_str().unwrap(),
            "--clip",
            tiny()
                .join("text_encoder/model.safetensors")
                .to_str()
                .unwrap(),
            "--t5",
            t5.to_str().unwrap(),
        ],
    );
    assert_eq!(parts, base, "component files");
    let aio = tmp("aio.safetensors");
    all_in_one(&aio);
    let one = tiny_image("aio.png", &["--checkpoint", aio.to_str().unwrap()]);
    assert_eq!(one, base, "all-in-one file");
}

#[test]
fn convert_writes_gguf_that_generates_and_never_overwrites() {
    let out = tmp("tiny-q8_0.gguf");
    let _ = std::fs::remove_file(&out);
    let src = golden("tiny-dev-bfl/flux.safetensors");
    let cfg = tiny().join("transformer/config.json");
    let cfg = cfg.to_str().unwrap();
    // head size 8: the shapes cannot tell the RoPE axes, so the config is given
    let o = flux(&[
        "convert",
        "--to",
        "q8_0",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("head size 8"));
    let o = flux(&[
        "convert",
        "--to",
        "q8_0",
        "--config",
        cfg,
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the tiny model's rows (16 wide) are not whole Q8_0 blocks: city96's rule keeps them F16
    let h = flux_kernels::gguf::parse(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(h.metadata["general.architecture"].as_str(), Some("flux"));
    assert_eq!(h.metadata["general.file_type"].as_u64(), Some(7));
    assert!(h
        .tensors
        .iter()
        .all(|t| t.shape.len() == 2 || t.ty == flux_kernels::QuantType::F32));
    let img = tiny_image("q8.png", &["--transformer", out.to_str().unwrap()]);
    assert_eq!(img.len(), 64 * 64 * 3);
    let again = flux(&[
        "convert",
        "--to",
        "q8_0",
        "--config",
        cfg,
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let bad = flux(&[
        "convert",
        "--to",
        "iq2_xs",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
}

/// `--fp8-gemm`: the image is recorded as made so and re-runs identically from its metadata; it
/// is close to the one without (the transformer's products only lose fp8's precision) but not
/// equal; with a GGUF `--quantize` it is refused before anything loads.
#[test]
fn fp8_gemm_generates_records_and_reruns() {
    let plain = tiny_image("fp8-off.png", &[]);
    let fp8 = tiny_image("fp8-on.png", &["--fp8-gemm"]);
    assert_eq!(plain.len(), fp8.len());
    let diff: f64 = plain
        .iter()
        .zip(&fp8)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
        .sum::<f64>()
        / plain.len() as f64;
    assert!(diff > 0.0 && diff < 8.0, "mean pixel difference {diff}");
    let first = tmp("fp8-on.png");
    let p = read_png(&first).unwrap().params.expect("parameters");
    assert!(p.fp8_gemm);
    let again = tmp("fp8-again.png");
    let o = flux(&[
        "generate",
        "--from-image",
        first.to_str().unwrap(),
        "--output",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_png(&again).unwrap().image.data, fp8);
    let m = tiny();
    fails_with(
        &[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "x",
            "--fp8-gemm",
            "--quantize",
            "q8_0",
            "--offline",
        ],
        "--fp8-gemm",
    );
}
