//! Bad requests and bad model sources are typed errors, found before any expensive work.

use std::path::PathBuf;

use flux_pipeline::*;

mod common;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev")
}

fn pipe() -> FluxPipeline {
    FluxPipeline::from_source(&ModelSource::Folder(tiny()), PipelineOptions::default()).unwrap()
}

fn req() -> GenerateRequest {
    GenerateRequest {
        prompts: vec!["a cat".into()],
        width: 64,
        height: 64,
        ..Default::default()
    }
}

#[test]
fn bad_requests() {
    let mut p = pipe();
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                prompts: vec![],
                ..req()
            },
            "no prompt",
        ),
        (
            GenerateRequest {
                prompts: vec!["a cat".into(), "a\0dog".into()],
                ..req()
            },
            "prompt 2 contains a NUL",
        ),
        (
            GenerateRequest {
                width: 100,
                ..req()
            },
            "multiple of 16",
        ),
        (GenerateRequest { height: 0, ..req() }, "multiple of 16"),
        (
            GenerateRequest {
                width: 16384,
                ..req()
            },
            "larger than",
        ),
        (
            GenerateRequest {
                steps: Some(0),
                ..req()
            },
            "steps",
        ),
        (
            GenerateRequest {
                steps: Some(100_000),
                ..req()
            },
            "steps",
        ),
        (
            GenerateRequest {
                num_images: 0,
                ..req()
            },
            "num_images",
        ),
        (
            GenerateRequest {
                seeds: vec![1, 2, 3],
                num_images: 2,
                ..req()
            },
            "seeds",
        ),
        (
            GenerateRequest {
                prompts_2: Some(vec![]),
                ..req()
            },
            "T5 prompts",
        ),
        (
            GenerateRequest {
                max_sequence_length: Some(0),
                ..req()
            },
            "max_sequence_length",
        ),
        (
            GenerateRequest {
                guidance: Some(f32::NAN),
                ..req()
            },
            "guidance",
        ),
        (
            GenerateRequest {
                latents: Some(
                    candle::Tensor::zeros((1, 15, 64), candle::DType::F32, &candle::Device::Cpu)
                        .unwrap(),
                ),
                ..req()
            },
            "latents",
        ),
    ];
    for (r, needle) in cases {
        match p.generate(&r, |_, _| panic!("no step may run for a bad request")) {
            Err(Error::InvalidRequest(m)) => assert!(m.contains(needle), "{m} (wanted {needle})"),
            other => panic!("expected InvalidRequest({needle}), got {other:?}"),
        }
    }
    let e = p
        .generate(
            &GenerateRequest {
                width: 100,
                ..req()
            },
            |_, _| {},
        )
        .unwrap_err();
    assert!(e.hint().unwrap().contains("1024x1024"));
}

#[test]
fn defaults_follow_the_model() {
    let p = pipe();
    assert!(p.is_dev());
    assert_eq!(
        (p.default_steps(), p.default_max_sequence_length()),
        (28, 512)
    );
}

#[test]
fn wrong_variant_and_missing_files() {
    // The dev transformer file read with a schnell config: its guidance weights are left over.
    let mut f = ModelSource::Folder(tiny()).resolve().unwrap();
    let mut cfg = flux_dit::Config::from_diffusers_json(
        &std::fs::read_to_string(tiny().join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    cfg.guidance_embed = false;
    f.transformer = TransformerFiles::Bfl {
        file: tiny()
            .parent()
            .unwrap()
            .join("tiny-dev-bfl/flux.safetensors"),
        config: cfg,
    };
    let mut p = FluxPipeline::new(f, PipelineOptions::default()).unwrap();
    let e = p.generate(&req(), |_, _| {}).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Dit(flux_dit::Error::Load(
                flux_kernels::LoadError::UnexpectedTensors { .. }
            ))
        ),
        "{e}"
    );
    assert!(e.hint().unwrap().contains("dev vs schnell"));
    // A folder without its transformer config.
    let dir = flux_golden::scratch_dir("req");
    std::fs::create_dir_all(dir.join("transformer")).unwrap();
    std::fs::write(dir.join("model_index.json"), "{}").unwrap();
    let e = ModelSource::Folder(dir.clone()).resolve().unwrap_err();
    assert!(
        matches!(&e, Error::ModelSource { what, .. } if what.contains("missing")),
        "{e}"
    );
    assert!(matches!(
        ModelSource::parse("a/b/c", false),
        Err(Error::ModelSource { .. })
    ));
    assert_eq!(
        ModelSource::parse("schnell", true).unwrap(),
        ModelSource::Hub {
            repo: SCHNELL_REPO.into(),
            offline: true,
            cache_dir: None
        }
    );
    assert!(matches!(
        FluxPipeline::new(
            ModelSource::Folder(tiny()).resolve().unwrap(),
            PipelineOptions {
                dtype: candle::DType::F16,
                ..Default::default()
            }
        ),
        Err(Error::InvalidRequest(_))
    ));
}

#[test]
fn memory_policy_drops_and_reloads() {
    // Two runs with the default policy (everything dropped after use) give identical images.
    let mut p = pipe();
    let r = GenerateRequest {
        seeds: vec![5],
        steps: Some(2),
        ..req()
    };
    let a = p.generate(&r, |_, _| {}).unwrap();
    let b = p.generate(&r, |_, _| {}).unwrap();
    assert_eq!(a.images[0].rgb, b.images[0].rgb);
    let mut keep = FluxPipeline::from_source(
        &ModelSource::Folder(tiny()),
        PipelineOptions {
            keep_loaded: true,
            ..Default::default()
        },
    )
    .unwrap();
    let c = keep.generate(&r, |_, _| {}).unwrap();
    assert_eq!(a.images[0].rgb, c.images[0].rgb);
}

/// Each image reaches `on_image` as soon as it is decoded, before the next one is denoised
/// (so the CLI saves it at once), and an error there stops the run with that error.
#[test]
fn images_are_handed_over_as_soon_as_decoded() {
    let mut p = pipe();
    let r = GenerateRequest {
        num_images: 3,
        seeds: vec![10],
        steps: Some(2),
        ..req()
    };
    let events = std::cell::RefCell::new(vec![]);
    let out = p
        .generate_each(
            &r,
            |pr, _| {
                events
                    .borrow_mut()
                    .push(format!("step {} {}", pr.image, pr.step))
            },
            |g| {
                events.borrow_mut().push(format!("image {}", g.params.seed));
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(out.images.len(), 3);
    assert_eq!(
        events.into_inner(),
        [
            "step 0 0", "step 0 1", "image 10", "step 1 0", "step 1 1", "image 11", "step 2 0",
            "step 2 1", "image 12"
        ]
    );
    let mut seen = 0;
    let e = p
        .generate_each(
            &r,
            |_, _| {},
            |_| {
                seen += 1;
                Err(Error::InvalidRequest("disk full".into()))
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("disk full") && seen == 1, "{e}");
}

/// Same seed → the same bytes with 1, 2 or 3 threads, in f32 and bf16, tiled VAE or not.
#[test]
fn same_seed_same_bytes_across_threads_dtypes_and_tiling() {
    let tiles = flux_vae::TileOptions {
        tile: 4,
        overlap: 1,
    };
    for dtype in [candle::DType::F32, candle::DType::BF16] {
        for tiled in [None, Some(tiles)] {
            let mut first: Option<Vec<u8>> = None;
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let rgb = pool.install(|| {
                    let opts = PipelineOptions {
                        dtype,
                        tiled_vae: tiled,
                        ..Default::default()
                    };
                    let mut p =
                        FluxPipeline::from_source(&ModelSource::Folder(tiny()), opts).unwrap();
                    let r = GenerateRequest {
                        seeds: vec![77],
                        steps: Some(2),
                        width: 96,
                        height: 64,
                        ..req()
                    };
                    p.generate(&r, |_, _| {}).unwrap().images[0]
                        .rgb
                        .data
                        .clone()
                });
                match &first {
                    None => first = Some(rgb),
                    Some(f) => assert!(
                        f == &rgb,
                        "{dtype:?} tiled={} differs with {threads} threads",
                        tiled.is_some()
                    ),
                }
            }
        }
    }
}

/// A copy of the tiny model (files copied, so they can be altered).
fn tiny_copy(name: &str) -> PathBuf {
    let d = flux_golden::scratch_dir(&format!("req-{name}"));
    common::copy_dir(&tiny(), &d);
    d
}

/// Fills tensor `key` of a safetensors file with NaN.
fn poison(file: &std::path::Path, key: &str) {
    let mut t = candle::safetensors::load(file, &candle::Device::Cpu).unwrap();
    let w = t.get(key).unwrap_or_else(|| panic!("{key}"));
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    t.insert(key.to_string(), nan);
    candle::safetensors::save(&t, file).unwrap();
}

/// NaN is attributed to the stage that produced it.
#[test]
fn non_finite_values_name_their_stage() {
    for (stage, file, key) in [
        (
            "T5 text encoder",
            "text_encoder_2/model-00002-of-00002.safetensors",
            "encoder.final_layer_norm.weight",
        ),
        (
            "transformer",
            "transformer/diffusion_pytorch_model.safetensors",
            "proj_out.bias",
        ),
        (
            "autoencoder",
            "vae/diffusion_pytorch_model.safetensors",
            "decoder.conv_out.bias",
        ),
    ] {
        let d = tiny_copy("nan");
        let f = d.join(file);
        let names = candle::safetensors::load(&f, &candle::Device::Cpu).unwrap();
        let key = if names.contains_key(key) {
            key.to_string()
        } else {
            // the shard that holds it
            panic!(
                "{key} not in {file}: {:?}",
                names.keys().take(5).collect::<Vec<_>>()
            )
        };
        poison(&f, &key);
        let mut p =
            FluxPipeline::from_source(&ModelSource::Folder(d), PipelineOptions::default()).unwrap();
        let e = p.generate(&req(), |_, _| {}).unwrap_err();
        if stage == "autoencoder" {
            // the autoencoder checks its own output
            assert!(
                matches!(&e, Error::Vae(_)) && e.to_string().contains("NaN"),
                "{e}"
            );
            continue;
        }
        assert!(
            matches!(&e, Error::NonFinite { stage: s } if *s == stage),
            "{stage}: {e}"
        );
        assert!(e.to_string().contains(stage) && e.hint().unwrap().contains("f32"));
    }
}

/// model_index.json is parsed and checked; shard names cannot leave the model folder; a file
/// given as a model or an unreadable path is named as what it is.
#[test]
fn model_folders_are_checked() {
    let d = tiny_copy("index");
    std::fs::write(d.join("model_index.json"), "{ not json").unwrap();
    let e = ModelSource::Folder(d.clone()).resolve().unwrap_err();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
    std::fs::write(
        d.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline"}"#,
    )
    .unwrap();
    let e = ModelSource::Folder(d.clone()).resolve().unwrap_err();
    assert!(e.to_string().contains("not a FLUX pipeline"), "{e}");
    std::fs::copy(tiny().join("model_index.json"), d.join("model_index.json")).unwrap();
    let index = d.join("text_encoder_2/model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("model-00002-of-00002", "../../escape");
    std::fs::write(&index, text).unwrap();
    let e = ModelSource::Folder(d.clone()).resolve().unwrap_err();
    assert!(e.to_string().contains("plain file names"), "{e}");
    let e = flux_kernels::sharded_files(&d.join("text_encoder_2"), "model").unwrap_err();
    assert!(e.to_string().contains("plain file names"), "{e}");
    // a bad config anywhere fails when the pipeline is made, not when its stage comes
    let d = tiny_copy("configs");
    for (file, from, to) in [
        (
            "vae/config.json",
            "\"layers_per_block\": 2",
            "\"layers_per_block\": 100000",
        ),
        (
            "text_encoder_2/config.json",
            "\"num_heads\": 2",
            "\"num_heads\": 0",
        ),
        ("text_encoder/config.json", "\"quick_gelu\"", "\"relu\""),
    ] {
        let path = d.join(file);
        let orig = std::fs::read_to_string(&path).unwrap();
        assert!(orig.contains(from), "{file}: {orig}");
        std::fs::write(&path, orig.replace(from, to)).unwrap();
        let e =
            FluxPipeline::from_source(&ModelSource::Folder(d.clone()), PipelineOptions::default())
                .unwrap_err();
        assert!(
            e.to_string().contains("config") || e.to_string().contains("larger"),
            "{file}: {e}"
        );
        std::fs::write(&path, orig).unwrap();
    }
    // a file is not a hub id
    let file = tiny().join("model_index.json");
    let e = ModelSource::parse(file.to_str().unwrap(), false).unwrap_err();
    assert!(e.to_string().contains("is a file"), "{e}");
    assert!(e.hint().unwrap().contains("--transformer"));
    // a symlink loop is not "missing" and not a hub id
    #[cfg(unix)]
    {
        let l = d.join("loop");
        std::os::unix::fs::symlink(&l, &l).unwrap();
        let e = ModelSource::parse(l.to_str().unwrap(), false).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.hint().is_none(), "a read error is not about writability");
    }
}

#[test]
fn what_stays_loaded_between_calls() {
    let all = Resident {
        text: true,
        transformer: true,
        vae: true,
    };
    for (keep_loaded, release_text, want) in [
        (
            false,
            false,
            Resident {
                text: false,
                transformer: false,
                vae: false,
            },
        ),
        (true, false, all),
        (true, true, Resident { text: false, ..all }),
    ] {
        let opts = PipelineOptions {
            keep_loaded,
            release_text,
            ..Default::default()
        };
        let mut p = FluxPipeline::from_source(&ModelSource::Folder(tiny()), opts).unwrap();
        let r = GenerateRequest {
            steps: Some(1),
            ..req()
        };
        p.generate(&r, |_, _| {}).unwrap();
        assert_eq!(
            p.resident(),
            want,
            "keep_loaded {keep_loaded}, release_text {release_text}"
        );
        // a second call loads what was released and gives the same image
        let a = p.generate(&r, |_, _| {}).unwrap();
        assert_eq!(p.resident(), want);
        assert!(!a.images.is_empty());
    }
}

#[test]
fn memory_estimate_reads_the_headers() {
    let dir = flux_golden::scratch_dir("estimate");
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    // a safetensors file: bf16 (4, 8) and fp8 (16,) tensors
    let write = |path: &std::path::Path, tensors: &[(&str, &str, &[usize])]| {
        let mut head = serde_json::Map::new();
        let mut off = 0;
        for (name, dtype, shape) in tensors {
            let size = match *dtype {
                "BF16" => 2,
                "F32" => 4,
                _ => 1,
            };
            let n = shape.iter().product::<usize>() * size;
            head.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
            );
            off += n;
        }
        head.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let head = serde_json::to_vec(&head).unwrap();
        let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
        bytes.extend(head);
        bytes.resize(bytes.len() + off, 0);
        std::fs::write(path, bytes).unwrap();
    };
    let all_in_one = dir.join("all.safetensors");
    write(
        &all_in_one,
        &[("a", "BF16", &[4, 8]), ("b", "F8_E4M3", &[16])],
    );
    write(&dir.join("vae/model.safetensors"), &[("c", "F32", &[10])]);
    std::fs::write(dir.join("vae/config.json"), "{}").unwrap();
    // a GGUF file: Q8_0 (2, 64) (4 blocks of 34 bytes, kept packed) and F32 (32,) (dense)
    let clip = dir.join("clip.gguf");
    let ones = vec![1f32; 128];
    let q = flux_kernels::quantize(flux_kernels::QuantType::Q8_0, &ones, 64).unwrap();
    let dense: Vec<u8> = ones[..32].iter().flat_map(|x| x.to_le_bytes()).collect();
    use flux_kernels::gguf::TensorOut;
    flux_kernels::gguf::write(
        &clip,
        &[],
        &[
            TensorOut {
                name: "w",
                ty: flux_kernels::QuantType::Q8_0,
                shape: &[2, 64],
                data: &q,
            },
            TensorOut {
                name: "b",
                ty: flux_kernels::QuantType::F32,
                shape: &[32],
                data: &dense,
            },
        ],
    )
    .unwrap();
    let files = ModelFiles {
        name: "test".into(),
        tokenizer: dir.clone(),
        tokenizer_2: dir.clone(),
        text_encoder: clip,
        text_encoder_2: all_in_one.clone(),
        text_encoder_config: None,
        transformer: TransformerFiles::File(all_in_one),
        vae: VaeFiles::Diffusers(dir.join("vae")),
        shift: None,
    };
    use candle::DType;
    let q8 = flux_kernels::Encoding::Gguf(flux_kernels::QuantType::Q8_0);
    for (dtype, quantize, text) in [
        (DType::F32, None, 32 * 4 + 16 + 136 + 32 * 4),
        (DType::BF16, None, 32 * 2 + 16 + 136 + 32 * 2),
        // Q8_0: 34 bytes a block of 32 in T5; CLIP is never quantized
        (DType::F32, Some(q8), 34 + 16 + 136 + 32 * 4),
    ] {
        let e = files.memory_estimate(dtype, quantize);
        // the all-in-one file counts once, in the text encoders; the VAE is never quantized
        let vae = 10 * dtype.size_in_bytes() as u64;
        assert_eq!(
            (e.text, e.transformer, e.vae),
            (text, 0, vae),
            "{dtype:?} {quantize:?}"
        );
        assert_eq!(e.total(), text + vae);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
