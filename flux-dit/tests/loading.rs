//! Strict loading and input validation: every bad checkpoint or input is a typed error naming
//! the problem.

use flux_kernels::LoadError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use flux_dit::*;
use flux_golden::max_abs_diff;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    flux_golden::scratch(name)
}

fn dev_cfg() -> Config {
    Config::from_diffusers_json(
        &std::fs::read_to_string(golden("dev_diffusers/config.json")).unwrap(),
    )
    .unwrap()
}

fn bfl_tensors() -> HashMap<String, Tensor> {
    candle::safetensors::load(golden("dev_bfl.safetensors"), &Device::Cpu).unwrap()
}

fn save(tensors: &HashMap<String, Tensor>, name: &str) -> PathBuf {
    let p = tmp(name);
    candle::safetensors::save(tensors, &p).unwrap();
    p
}

fn load(path: &Path, cfg: &Config) -> Result<Flux> {
    Flux::from_bfl_file(path, cfg, DType::F32, &Device::Cpu, FluxOptions::default())
}

#[test]
fn missing_tensor_is_named() {
    let mut t = bfl_tensors();
    t.remove("double_blocks.1.txt_attn.norm.key_norm.scale");
    let err = load(&save(&t, "missing.safetensors"), &dev_cfg()).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::MissingTensor { name, .. }) if name == "double_blocks.1.txt_attn.norm.key_norm.scale"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_both_shapes() {
    let mut t = bfl_tensors();
    t.insert(
        "img_in.weight".into(),
        Tensor::zeros((16, 15), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load(&save(&t, "shape.safetensors"), &dev_cfg()).unwrap_err();
    match err {
        Error::Load(LoadError::TensorShape {
            name,
            expected,
            got,
        }) => {
            assert_eq!(
                (name.as_str(), expected, got),
                ("img_in.weight", vec![16, 16], vec![16, 15])
            );
        }
        e => panic!("{e}"),
    }
}

#[test]
fn unexpected_tensors_are_listed() {
    let mut t = bfl_tensors();
    t.insert(
        "double_blocks.2.img_mod.lin.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load(&save(&t, "extra.safetensors"), &dev_cfg()).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::UnexpectedTensors { names, .. }) if names == &vec!["double_blocks.2.img_mod.lin.weight".to_string()]),
        "{err}"
    );
    // A schnell config on dev weights: the guidance embedder is left over.
    let cfg = Config {
        guidance_embed: false,
        ..dev_cfg()
    };
    let err = load(&golden("dev_bfl.safetensors"), &cfg).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::UnexpectedTensors { names, .. }) if names.iter().all(|n| n.starts_with("guidance_in."))),
        "{err}"
    );
}

#[test]
fn prefixed_single_file_loads() {
    let t: HashMap<String, Tensor> = bfl_tensors()
        .into_iter()
        .map(|(k, v)| (format!("model.diffusion_model.{k}"), v))
        .collect();
    load(&save(&t, "prefixed.safetensors"), &dev_cfg()).unwrap();
}

#[test]
fn truncated_and_corrupt_files_are_checkpoint_errors() {
    let bytes = std::fs::read(golden("dev_bfl.safetensors")).unwrap();
    let p = tmp("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        load(&p, &dev_cfg()),
        Err(Error::Load(LoadError::File { .. }))
    ));
    let p = tmp("garbage.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    assert!(matches!(
        load(&p, &dev_cfg()),
        Err(Error::Load(LoadError::File { .. }))
    ));
    assert!(matches!(
        load(&tmp("absent.safetensors"), &dev_cfg()),
        Err(Error::Load(LoadError::File { .. }))
    ));
}

#[test]
fn a_file_of_another_model_is_recognised() {
    let mut t = HashMap::new();
    t.insert(
        "encoder.conv_in.weight".to_string(),
        Tensor::zeros((8, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load(&save(&t, "vae.safetensors"), &dev_cfg()).unwrap_err();
    assert!(matches!(err, Error::NotAFluxTransformer { .. }), "{err}");
    // The BFL file read as a diffusers checkpoint is caught the same way.
    let w = Weights::open(
        &[golden("dev_bfl.safetensors")],
        Layout::Diffusers,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(matches!(
        Flux::load(&dev_cfg(), &w, FluxOptions::default()),
        Err(Error::NotAFluxTransformer { .. })
    ));
}

#[test]
fn unsupported_dtype_and_missing_folder() {
    let e = Flux::from_bfl_file(
        golden("dev_bfl.safetensors"),
        &dev_cfg(),
        DType::U8,
        &Device::Cpu,
        FluxOptions::default(),
    );
    assert!(matches!(e, Err(Error::UnsupportedDtype { .. })));
    let e = Flux::from_diffusers_folder(
        tmp("no-such-folder"),
        DType::F32,
        &Device::Cpu,
        FluxOptions::default(),
    );
    assert!(matches!(e, Err(Error::Load(LoadError::File { .. }))));
}

struct Inp {
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    t: Tensor,
    y: Tensor,
    g: Tensor,
}

fn inputs(cfg: &Config) -> Inp {
    let d = Device::Cpu;
    Inp {
        img: Tensor::ones((1, 6, cfg.in_channels), DType::F32, &d).unwrap(),
        img_ids: img_ids(1, 4, 6, 0.0, &d).unwrap(),
        txt: Tensor::ones((1, 3, cfg.context_in_dim), DType::F32, &d).unwrap(),
        txt_ids: txt_ids(1, 3, &d).unwrap(),
        t: Tensor::new(&[0.5f32], &d).unwrap(),
        y: Tensor::ones((1, cfg.vec_in_dim), DType::F32, &d).unwrap(),
        g: Tensor::new(&[3.5f32], &d).unwrap(),
    }
}

fn input<'a>(i: &'a Inp) -> DitInput<'a> {
    DitInput {
        img: &i.img,
        img_ids: &i.img_ids,
        txt: &i.txt,
        txt_ids: &i.txt_ids,
        timesteps: &i.t,
        y: &i.y,
        guidance: Some(&i.g),
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let cfg = dev_cfg();
    let model = load(&golden("dev_bfl.safetensors"), &cfg).unwrap();
    let i = inputs(&cfg);
    model.forward(&input(&i)).unwrap();
    let d = Device::Cpu;
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &d).unwrap();
    let wrong_channels = z(&[1, 6, cfg.in_channels + 1]);
    let short_txt_ids = z(&[1, 2, 3]);
    let rank2_img = z(&[6, cfg.in_channels]);
    let bad_y = z(&[1, cfg.vec_in_dim + 2]);
    let bad_t = z(&[2]);
    let bad_img_ids = z(&[1, 5, 3]);
    let bad_txt = z(&[1, 3, cfg.context_in_dim - 1]);
    let checks: Vec<(&str, DitInput)> = vec![
        (
            "img",
            DitInput {
                img: &wrong_channels,
                ..input(&i)
            },
        ),
        (
            "img",
            DitInput {
                img: &rank2_img,
                ..input(&i)
            },
        ),
        (
            "txt_ids",
            DitInput {
                txt_ids: &short_txt_ids,
                ..input(&i)
            },
        ),
        (
            "y",
            DitInput {
                y: &bad_y,
                ..input(&i)
            },
        ),
        (
            "timesteps",
            DitInput {
                timesteps: &bad_t,
                ..input(&i)
            },
        ),
        (
            "img_ids",
            DitInput {
                img_ids: &bad_img_ids,
                ..input(&i)
            },
        ),
        (
            "txt",
            DitInput {
                txt: &bad_txt,
                ..input(&i)
            },
        ),
        (
            "guidance",
            DitInput {
                guidance: Some(&bad_t),
                ..input(&i)
            },
        ),
    ];
    for (field, inp) in checks {
        match model.forward(&inp) {
            Err(Error::InputShape { name, .. }) => assert_eq!(name, field),
            other => panic!("{field}: expected InputShape, got {other:?}"),
        }
    }
    assert!(matches!(
        model.forward(&DitInput {
            guidance: None,
            ..input(&i)
        }),
        Err(Error::MissingGuidance)
    ));
}

#[test]
fn guidance_is_ignored_by_models_without_an_embedder() {
    // As in BFL: schnell builds no guidance embedder and never reads the guidance it is given.
    let model = Flux::from_diffusers_folder(
        golden("schnell_diffusers"),
        DType::F32,
        &Device::Cpu,
        FluxOptions::default(),
    )
    .unwrap();
    let i = inputs(model.config());
    let with = model.forward(&input(&i)).unwrap();
    let without = model
        .forward(&DitInput {
            guidance: None,
            ..input(&i)
        })
        .unwrap();
    let diff = max_abs_diff(&with, &without);
    assert_eq!(diff, 0.0);
}
