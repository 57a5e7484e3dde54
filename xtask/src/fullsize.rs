//! `cargo xtask fullsize`: the quantized loaders at real size, without real weights.
//!
//! Writes (once, into `target/fullsize`, never committed) a FLUX.1-schnell transformer in Q8_0
//! and in Q4_K with city96's exact names, shapes and per-tensor types, a T5-XXL Q8_0 GGUF in
//! llama.cpp's names, CLIP-L and the autoencoder, all random; loads each transformer and runs
//! one 256² forward, loads T5 and encodes 256 tokens, each in its own process, and checks
//! peak memory against the file size (≤ +25 %); then runs the whole pipeline at full size
//! (Q4_K transformer + Q8_0 T5 + CLIP + VAE, 256², one step) and checks it stays inside 24 GB.

use anyhow::{bail, Context, Result};
use std::process::Command;

use crate::root;

fn json(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON line")?;
    Ok(serde_json::from_str(line)?)
}

fn gb(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0) / 1e9
}

/// `cargo xtask fullsize [--threads T]`.
pub fn fullsize(args: &[&str]) -> Result<()> {
    let threads = match args {
        ["--threads", t] => t.to_string(),
        [] => "2".into(),
        other => bail!("usage: cargo xtask fullsize [--threads T] (got {other:?})"),
    };
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args([
            "build",
            "--release",
            "-p",
            "flux-bench",
            "-p",
            "flux-pipeline",
            "--bin",
            "flux-bench",
            "--bin",
            "flux",
        ])
        .status()?;
    if !st.success() {
        bail!("building flux-bench and flux failed");
    }
    let bench = root().join("target/release/flux-bench");
    let dir = root().join("target/fullsize");
    let env = |c: &mut Command| {
        c.env("RAYON_NUM_THREADS", &threads);
    };
    let mut w = Command::new(&bench);
    w.arg("fullsize-write").arg(&dir);
    if !w.status()?.success() {
        bail!("writing the full-size files failed");
    }
    let mut failed = vec![];
    for ty in ["Q8_0", "Q4_K"] {
        let f = dir.join(format!("flux1-schnell-{ty}.gguf"));
        let mut c = Command::new(&bench);
        c.arg("fullsize-dit").arg(&f).args(["--res", "256"]);
        env(&mut c);
        let v = json(&mut c)?;
        let (rss, size) = (gb(&v, "peak_rss"), gb(&v, "file_bytes"));
        let ok = rss <= size * 1.25 && v["finite"].as_bool() == Some(true);
        println!(
            "fullsize: dit schnell {ty} file={size:.2} GB peak_rss={rss:.2} GB ({:+.0} %) load={:.1} s forward_256={:.1} s {}",
            (rss / size - 1.0) * 100.0,
            v["load_secs"].as_f64().unwrap_or(0.0),
            v["forward_secs"].as_f64().unwrap_or(0.0),
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failed.push(format!("dit {ty}"));
        }
    }
    let t5 = dir.join("t5xxl-Q8_0.gguf");
    let mut c = Command::new(&bench);
    c.arg("fullsize-t5").arg(&t5);
    env(&mut c);
    let v = json(&mut c)?;
    let (rss, size) = (gb(&v, "peak_rss"), gb(&v, "file_bytes"));
    let ok = rss <= size * 1.25;
    println!(
        "fullsize: t5xxl Q8_0 file={size:.2} GB peak_rss={rss:.2} GB ({:+.0} %) load={:.1} s encode_256={:.1} s {}",
        (rss / size - 1.0) * 100.0,
        v["load_secs"].as_f64().unwrap_or(0.0),
        v["encode_secs"].as_f64().unwrap_or(0.0),
        if ok { "PASS" } else { "FAIL" }
    );
    if !ok {
        failed.push("t5".into());
    }
    // the whole pipeline: tokenizers from the committed tiny model, every weight full size
    let out = std::env::temp_dir().join("flux-fullsize-{seed}.png");
    let mut c = Command::new(root().join("target/release/flux"));
    c.current_dir(root())
        .args([
            "generate",
            "--model",
            "flux-pipeline/tests/golden/tiny-dev",
            "--offline",
        ])
        .arg("--transformer")
        .arg(dir.join("flux1-schnell-Q4_K.gguf"))
        .arg("--t5")
        .arg(&t5)
        .arg("--clip")
        .arg(dir.join("clip_l.safetensors"))
        .arg("--vae")
        .arg(dir.join("ae.safetensors"))
        .args([
            "--prompt",
            "a lighthouse at dusk",
            "--width",
            "256",
            "--height",
            "256",
        ])
        .args(["--steps", "1", "--seed", "1", "--output"])
        .arg(&out);
    env(&mut c);
    let o = c.output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        bail!("the full-size pipeline failed: {err}");
    }
    let line = err.lines().find(|l| l.starts_with("encode")).unwrap_or("");
    let mib: f64 = line
        .split("peak memory ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::INFINITY);
    let ok = mib * 1048576.0 < 24e9;
    println!(
        "fullsize: pipeline Q4_K+T5 Q8_0+CLIP+VAE 256² 1 step: {line} {}",
        if ok { "PASS (< 24 GB)" } else { "FAIL" }
    );
    if !ok {
        failed.push("pipeline".into());
    }
    if !failed.is_empty() {
        bail!("fullsize checks failed: {failed:?}");
    }
    Ok(())
}
