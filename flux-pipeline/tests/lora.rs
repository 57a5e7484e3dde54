//! LoRAs through the pipeline and the CLI: a BFL control LoRA turns the base model into a
//! Canny/Depth one (checked against diffusers' FluxControlPipeline golden), `--lora` flags,
//! the PNG record, `--from-image` re-runs, switching without reloading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use flux_dit::{AngleMode, Flux, FluxOptions};
use flux_golden::{max_abs_diff, Golden, Tolerance};
use flux_pipeline::*;

mod common;

fn dir(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(p)
}

fn tmp(name: &str) -> PathBuf {
    flux_golden::scratch_dir(&format!("lora-{name}"))
}

fn transformer(name: &str) -> Flux {
    let opts = FluxOptions {
        rope: AngleMode::F64,
        ..Default::default()
    };
    Flux::from_diffusers_folder(dir(name), DType::F32, &Device::Cpu, opts).unwrap()
}

fn eye(n: usize) -> Tensor {
    Tensor::eye(n, DType::F32, &Device::Cpu).unwrap()
}

/// A full-rank BFL control LoRA (`lora_A`/`lora_B`/`lora_B.bias` on every layer, the QK-norm
/// scales replaced, `img_in` taking twice the channels) whose strength-1 merge turns the tiny
/// base transformer into the tiny Canny/Depth one: `B·A = W_control − [W_base, 0]` with one
/// factor the identity.
fn control_lora(path: &Path) {
    let (base, ctl) = (
        transformer("tiny-dev/transformer"),
        transformer("tiny-control/transformer"),
    );
    let base_layers: HashMap<String, flux_kernels::Linear> = base.linears().into_iter().collect();
    let mut t = HashMap::new();
    for (name, lin) in ctl.linears() {
        let wc = lin.weight().unwrap();
        let (out, inp) = wc.dims2().unwrap();
        let b = &base_layers[&name];
        let mut wb = b.weight().unwrap();
        if wb.dim(1).unwrap() < inp {
            let z = Tensor::zeros((out, inp - wb.dim(1).unwrap()), DType::F32, &Device::Cpu);
            wb = Tensor::cat(&[wb, z.unwrap()], 1).unwrap();
        }
        let d = (wc - wb).unwrap();
        let (a, up) = if inp <= out {
            (eye(inp), d)
        } else {
            (d, eye(out))
        };
        t.insert(format!("{name}.lora_A.weight"), a);
        t.insert(format!("{name}.lora_B.weight"), up);
        let db = (lin.bias().unwrap() - b.bias().unwrap()).unwrap();
        t.insert(format!("{name}.lora_B.bias"), db);
    }
    for (k, v) in ctl.norm_scales() {
        t.insert(k, v);
    }
    candle::safetensors::save(&t, path).unwrap();
}

/// diffusers' FluxControlPipeline golden (tiny Canny/Depth transformer), reproduced by the base
/// model with the control LoRA, merged and at run time.
#[test]
fn control_lora_on_the_base_model_matches_the_control_model() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "tasks");
    let d = tmp("control");
    let file = d.join("control-lora.safetensors");
    control_lora(&file);
    let req = common::task_request(&g, "control");
    for mode in [LoraMode::Merge, LoraMode::Runtime] {
        let mut loras = LoraSet::new();
        loras.add(&file, 1.0).unwrap();
        assert_eq!(loras.entries()[0].0.format(), LoraFormat::BflControl);
        let opts = PipelineOptions {
            loras,
            lora: LoraOptions {
                mode,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut p = FluxPipeline::from_source(&ModelSource::Folder(dir("tiny-dev")), opts).unwrap();
        assert_eq!(p.config().in_channels, 128, "the LoRA widens the input");
        let out = p.generate(&req, |_, _| {}).unwrap();
        // the merge rounds W_base + (W_control − W_base) once: a few ulps from the control model
        let tol = Tolerance::new(2e-4, 0.0);
        g.check(
            &format!("control via LoRA ({mode:?})/latents_out"),
            &out.images[0].latents,
            &g.tensor("control/latents_out"),
            tol,
        );
        assert_eq!(out.images[0].params.loras.len(), 1);
    }
}

fn flux(cwd: &Path, args: &[&str]) -> std::process::Output {
    common::flux_in(cwd, args)
}

/// A kohya LoRA for the tiny base model (random factors on a few layers).
fn style_lora(path: &Path) {
    let base = transformer("tiny-dev/transformer");
    let mut t = HashMap::new();
    for (name, lin) in base
        .linears()
        .into_iter()
        .filter(|(n, _)| n.contains("blocks.0"))
    {
        let (inp, out) = lin.dims();
        let k = format!("lora_unet_{}", name.replace('.', "_"));
        let r = 2;
        let down = Tensor::randn(0f32, 0.5, (r, inp), &Device::Cpu).unwrap();
        let up = Tensor::randn(0f32, 0.5, (out, r), &Device::Cpu).unwrap();
        t.insert(format!("{k}.lora_down.weight"), down);
        t.insert(format!("{k}.lora_up.weight"), up);
        t.insert(
            format!("{k}.alpha"),
            Tensor::new(1f32, &Device::Cpu).unwrap(),
        );
    }
    candle::safetensors::save(&t, path).unwrap();
}

#[test]
fn lora_flags_record_and_rerun() {
    let d = tmp("cli");
    common::copy_dir(&dir("tiny-dev"), &d.join("m"));
    style_lora(&d.join("style.safetensors"));
    let run = |extra: &[&str], out: &str| {
        let mut a = vec![
            "generate",
            "--model",
            "m",
            "--offline",
            "--prompt",
            "a cat",
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "2",
            "--seed",
            "3",
            "-o",
            out,
        ];
        a.extend_from_slice(extra);
        let o = flux(&d, &a);
        assert!(
            o.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        read_png(&d.join(out)).unwrap()
    };
    let plain = run(&[], "plain.png");
    let styled = run(&["--lora", "style.safetensors:0.7"], "styled.png");
    assert_ne!(plain.image, styled.image, "the LoRA changes the picture");
    let p = styled.params.clone().unwrap();
    let file = d.join("style.safetensors").canonicalize().unwrap();
    assert_eq!(
        p.loras,
        vec![LoraParam {
            file: file.display().to_string(),
            sha256: file_sha256(&file).unwrap(),
            strength: 0.7,
        }]
    );
    // strength 0 is the base model exactly; run time gives the merged picture's pixels
    assert_eq!(
        run(&["--lora", "style.safetensors:0"], "zero.png").image,
        plain.image
    );
    let rt = run(
        &["--lora", "style.safetensors:0.7", "--lora-mode", "runtime"],
        "rt.png",
    );
    let diff = rt
        .image
        .data
        .iter()
        .zip(&styled.image.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(diff <= 1, "run time vs merged: {diff} levels");
    // a re-run applies the recorded LoRA; --no-lora leaves it out
    let o = flux(
        &d,
        &["generate", "--from-image", "styled.png", "-o", "again.png"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_png(&d.join("again.png")).unwrap().image, styled.image);
    let o = flux(
        &d,
        &[
            "generate",
            "--from-image",
            "styled.png",
            "--no-lora",
            "-o",
            "none.png",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_png(&d.join("none.png")).unwrap().image, plain.image);
    // a changed file warns; a missing one is an error that says what to do
    style_lora(&d.join("style.safetensors"));
    let o = flux(
        &d,
        &[
            "generate",
            "--from-image",
            "styled.png",
            "-o",
            "changed.png",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("changed since the image was made"),
        "{err}"
    );
    std::fs::remove_file(d.join("style.safetensors")).unwrap();
    let o = flux(
        &d,
        &["generate", "--from-image", "styled.png", "-o", "gone.png"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--no-lora"), "{err}");
    assert!(!d.join("gone.png").exists());
    // bad flags and files are refused before any model loads
    for (args, want) in [
        (vec!["--lora", "nope.safetensors"], "no such file"),
        (vec!["--lora", "plain.png:0.5"], "not a safetensors"),
        (vec!["--lora", ":0.5"], "no file"),
        (vec!["--lora", "x.safetensors:inf"], "finite"),
    ] {
        let mut a = vec![
            "generate",
            "--model",
            "m",
            "--offline",
            "--prompt",
            "a",
            "-o",
            "bad.png",
        ];
        a.extend_from_slice(&args);
        let o = flux(&d, &a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn switching_loras_without_reloading() {
    let d = tmp("switch");
    style_lora(&d.join("a.safetensors"));
    let mut p = FluxPipeline::from_source(
        &ModelSource::Folder(dir("tiny-dev")),
        PipelineOptions {
            keep_loaded: true,
            ..Default::default()
        },
    )
    .unwrap();
    let req = GenerateRequest {
        prompts: vec!["a".into()],
        width: 64,
        height: 48,
        steps: Some(2),
        seeds: vec![1],
        ..Default::default()
    };
    let base = p.generate(&req, |_, _| {}).unwrap().images[0]
        .latents
        .clone();
    let mut set = LoraSet::new();
    set.add(d.join("a.safetensors"), 1.0).unwrap();
    p.set_loras(set.clone(), LoraOptions::default()).unwrap();
    let with = p.generate(&req, |_, _| {}).unwrap().images[0]
        .latents
        .clone();
    assert!(max_abs_diff(&with, &base) > 1e-3);
    p.set_loras(LoraSet::new(), LoraOptions::default()).unwrap();
    let back = p.generate(&req, |_, _| {}).unwrap().images[0]
        .latents
        .clone();
    assert_eq!(
        max_abs_diff(&back, &base),
        0.0,
        "removing restores the model bit for bit"
    );
    assert!(p.loras().is_empty());
}

/// A LoRA of CLIP modules only (kohya's `lora_te1_`): the text encoder takes it.
fn clip_lora(path: &Path) {
    let mut t = HashMap::new();
    for i in 0..2 {
        for (m, o, inp) in [
            ("self_attn_q_proj", 8, 8),
            ("mlp_fc1", 37, 8),
            ("mlp_fc2", 8, 37),
        ] {
            let k = format!("lora_te1_text_model_encoder_layers_{i}_{m}");
            let down = Tensor::randn(0f32, 0.5, (2, inp), &Device::Cpu).unwrap();
            let up = Tensor::randn(0f32, 0.5, (o, 2), &Device::Cpu).unwrap();
            t.insert(format!("{k}.lora_down.weight"), down);
            t.insert(format!("{k}.lora_up.weight"), up);
        }
    }
    candle::safetensors::save(&t, path).unwrap();
}

#[test]
fn clip_loras_reach_the_text_encoder() {
    let d = tmp("clip");
    clip_lora(&d.join("te.safetensors"));
    let req = GenerateRequest {
        prompts: vec!["a".into()],
        width: 64,
        height: 48,
        steps: Some(1),
        seeds: vec![1],
        ..Default::default()
    };
    let run = |m: Option<f32>, keep: bool| {
        let mut loras = LoraSet::new();
        if let Some(m) = m {
            loras.add(d.join("te.safetensors"), m).unwrap();
        }
        let opts = PipelineOptions {
            loras,
            keep_loaded: keep,
            ..Default::default()
        };
        let mut p = FluxPipeline::from_source(&ModelSource::Folder(dir("tiny-dev")), opts).unwrap();
        let y = p.generate(&req, |_, _| {}).unwrap().images[0]
            .latents
            .clone();
        (p, y)
    };
    let (_, base) = run(None, false);
    let (_, zero) = run(Some(0.0), false);
    assert_eq!(max_abs_diff(&zero, &base), 0.0);
    let (mut p, with) = run(Some(1.0), true);
    assert!(
        max_abs_diff(&with, &base) > 1e-4,
        "the CLIP LoRA changes the embedding"
    );
    // switching on the loaded encoders
    p.set_loras(LoraSet::new(), LoraOptions::default()).unwrap();
    let back = p.generate(&req, |_, _| {}).unwrap().images[0]
        .latents
        .clone();
    assert_eq!(max_abs_diff(&back, &base), 0.0);
}
