//! The whole pipeline against diffusers' FluxPipeline on the committed tiny models
//! (`cargo xtask golden gen pipeline`): final latents and the decoded image (pre-clamp f32).

use std::path::PathBuf;

use flux_golden::{Golden, Tolerance};
use flux_pipeline::*;

fn dir(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(p)
}

fn golden() -> Golden {
    Golden::open(env!("CARGO_MANIFEST_DIR"), "pipeline")
}

/// The bound for the end-to-end comparison.
const TOL: Tolerance = Tolerance::new(1e-4, 0.0);

fn request(g: &Golden, case: &str) -> GenerateRequest {
    let m = g.case_meta(case);
    let prompts = match m["prompts"].as_array() {
        Some(v) => v.iter().map(|p| p.as_str().unwrap().to_string()).collect(),
        None => vec![m["prompt"].as_str().unwrap().to_string()],
    };
    GenerateRequest {
        prompts,
        width: m["width"].as_u64().unwrap() as usize,
        height: m["height"].as_u64().unwrap() as usize,
        steps: Some(m["steps"].as_u64().unwrap() as usize),
        guidance: Some(m["guidance"].as_f64().unwrap() as f32).filter(|g| *g > 0.0),
        seeds: m["seed"].as_u64().into_iter().collect(),
        max_sequence_length: Some(m["max_sequence_length"].as_u64().unwrap() as usize),
        ..Default::default()
    }
}

fn check(g: &Golden, case: &str, out: &GenerateOutput) {
    let lat: Vec<_> = out.images.iter().map(|i| i.latents.clone()).collect();
    let img: Vec<_> = out.images.iter().map(|i| i.image.clone()).collect();
    let lat = candle::Tensor::cat(&lat, 0).unwrap();
    let img = candle::Tensor::cat(&img, 0).unwrap();
    g.check(
        &format!("{case}/latents_out"),
        &lat,
        &g.tensor(&format!("{case}/latents_out")),
        TOL,
    );
    g.check(
        &format!("{case}/image"),
        &img,
        &g.tensor(&format!("{case}/image")),
        TOL,
    );
}

fn dev_files_bfl() -> ModelFiles {
    let mut f = ModelSource::Folder(dir("tiny-dev")).resolve().unwrap();
    let cfg = flux_dit::Config::from_diffusers_json(
        &std::fs::read_to_string(dir("tiny-dev/transformer/config.json")).unwrap(),
    )
    .unwrap();
    let vcfg = flux_vae::Config::from_diffusers_json(
        &std::fs::read_to_string(dir("tiny-dev/vae/config.json")).unwrap(),
    )
    .unwrap();
    f.transformer = TransformerFiles::Bfl {
        file: dir("tiny-dev-bfl/flux.safetensors"),
        config: cfg,
    };
    f.vae = VaeFiles::Bfl {
        file: dir("tiny-dev-bfl/ae.safetensors"),
        config: vcfg,
    };
    f
}

#[test]
fn dev_like_6_steps_guidance_non_square_from_folder_and_bfl_files() {
    let g = golden();
    let mut req = request(&g, "dev");
    req.latents = Some(g.tensor("dev/latents_in"));
    let mut pipe = FluxPipeline::from_source(
        &ModelSource::Folder(dir("tiny-dev")),
        PipelineOptions::default(),
    )
    .unwrap();
    assert!(pipe.is_dev());
    let mut steps = 0;
    let out = pipe.generate(&req, |_, _| steps += 1).unwrap();
    assert_eq!(steps, 6);
    check(&g, "dev", &out);
    // The same model as BFL single files (transformer and VAE) gives the same result.
    let mut bfl = FluxPipeline::new(dev_files_bfl(), PipelineOptions::default()).unwrap();
    let again = bfl.generate(&req, |_, _| {}).unwrap();
    g.check(
        "dev/image BFL files vs folder",
        &again.images[0].image,
        &out.images[0].image,
        Tolerance::EXACT,
    );
}

#[test]
fn dev_like_noise_from_seed_equals_torch_generator() {
    // diffusers drew the starting noise with torch.Generator("cpu").manual_seed(42) in f32.
    let g = golden();
    let req = request(&g, "dev_seed");
    assert_eq!(req.seeds, vec![42]);
    let mut pipe = FluxPipeline::from_source(
        &ModelSource::Folder(dir("tiny-dev")),
        PipelineOptions::default(),
    )
    .unwrap();
    let out = pipe.generate(&req, |_, _| {}).unwrap();
    assert_eq!(out.images[0].params.seed, 42);
    check(&g, "dev_seed", &out);
}

#[test]
fn schnell_like_4_steps_batch_2_from_individual_files() {
    let g = golden();
    let mut req = request(&g, "schnell");
    req.latents = Some(g.tensor("schnell/latents_in"));
    req.guidance = Some(3.5); // accepted and ignored, with a warning
    let mut files = ModelSource::Folder(dir("tiny-dev")).resolve().unwrap();
    files.name = "tiny-schnell".into();
    files.transformer = TransformerFiles::Diffusers(dir("tiny-schnell/transformer"));
    files.shift = scheduler_shift(&dir("tiny-schnell/scheduler/scheduler_config.json")).unwrap();
    assert_eq!(files.shift, None);
    let mut pipe = FluxPipeline::new(files, PipelineOptions::default()).unwrap();
    assert!(!pipe.is_dev());
    let out = pipe.generate(&req, |_, _| {}).unwrap();
    assert!(
        out.warnings.iter().any(|w| w.contains("ignored")),
        "{:?}",
        out.warnings
    );
    assert_eq!(out.images.len(), 2);
    check(&g, "schnell", &out);
}
