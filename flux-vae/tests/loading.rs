//! Strict loading and input validation of the autoencoder.

use flux_kernels::LoadError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use flux_golden::max_abs_diff;
use flux_vae::*;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    flux_golden::scratch(name)
}

fn cfg() -> Config {
    Config::from_diffusers_json(
        &std::fs::read_to_string(golden("tiny_diffusers/config.json")).unwrap(),
    )
    .unwrap()
}

fn tensors() -> HashMap<String, Tensor> {
    candle::safetensors::load(golden("tiny_bfl.safetensors"), &Device::Cpu).unwrap()
}

fn save(t: &HashMap<String, Tensor>, name: &str) -> PathBuf {
    let p = tmp(name);
    candle::safetensors::save(t, &p).unwrap();
    p
}

fn load(p: &Path) -> Result<AutoEncoder> {
    AutoEncoder::from_bfl_file(p, &cfg(), DType::F32, &Device::Cpu)
}

fn model() -> AutoEncoder {
    load(&golden("tiny_bfl.safetensors")).unwrap()
}

#[test]
fn checkpoint_errors_are_typed() {
    let mut t = tensors();
    t.remove("decoder.up.3.upsample.conv.bias");
    assert!(
        matches!(load(&save(&t, "missing.safetensors")), Err(Error::Load(LoadError::MissingTensor { name, .. })) if name == "decoder.up.3.upsample.conv.bias")
    );
    let mut t = tensors();
    t.insert(
        "encoder.conv_in.weight".into(),
        Tensor::zeros((4, 3, 3, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(load(&save(&t, "shape.safetensors")), Err(Error::Load(LoadError::TensorShape { name, .. })) if name == "encoder.conv_in.weight")
    );
    let mut t = tensors();
    t.insert(
        "encoder.quant_conv.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        matches!(load(&save(&t, "extra.safetensors")), Err(Error::Load(LoadError::UnexpectedTensors { names, .. })) if names == ["encoder.quant_conv.weight"])
    );
    let bytes = std::fs::read(golden("tiny_bfl.safetensors")).unwrap();
    let p = tmp("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(load(&p), Err(Error::Load(LoadError::File { .. }))));
    // A transformer file is not an autoencoder.
    let mut t = HashMap::new();
    t.insert(
        "img_in.weight".to_string(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        load(&save(&t, "dit.safetensors")),
        Err(Error::NotAnAutoencoder { .. })
    ));
    assert!(matches!(
        AutoEncoder::from_diffusers_folder(tmp("nowhere"), DType::F32, &Device::Cpu),
        Err(Error::Load(LoadError::File { .. }))
    ));
}

#[test]
fn bad_configs_are_typed() {
    assert!(matches!(
        Config {
            norm_groups: 3,
            ..Config::flux()
        }
        .validate(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        Config {
            ch_mult: vec![],
            ..Config::flux()
        }
        .validate(),
        Err(Error::InvalidConfig(_))
    ));
    let quant = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}"#;
    assert!(
        matches!(
            Config::from_diffusers_json(quant),
            Err(Error::InvalidConfig(_))
        ),
        "quant convs default to on"
    );
    let flux = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16, "scaling_factor": 0.3611,
                   "shift_factor": 0.1159, "use_quant_conv": false, "use_post_quant_conv": false, "norm_num_groups": 32}"#;
    assert_eq!(Config::from_diffusers_json(flux).unwrap(), Config::flux());
}

#[test]
fn bad_images_and_latents_are_typed() {
    let m = model();
    let d = Device::Cpu;
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &d).unwrap();
    for (shape, what) in [
        (vec![1, 3, 60, 64], "height not a multiple of 8"),
        (vec![1, 3, 64, 36], "width not a multiple of 8"),
        (vec![1, 4, 64, 64], "four channels"),
        (vec![3, 64, 64], "rank 3"),
    ] {
        assert!(
            matches!(m.encode(&z(&shape)), Err(Error::InputShape { .. })),
            "{what}"
        );
    }
    assert!(matches!(
        m.decode(&z(&[1, 4, 8, 8])),
        Err(Error::InputShape { .. })
    ));
    assert!(matches!(
        m.decode(&z(&[16, 8, 8])),
        Err(Error::InputShape { .. })
    ));
    let mut v = vec![0f32; 3 * 16 * 16];
    v[5] = f32::NAN;
    v[7] = f32::INFINITY;
    let img = Tensor::from_vec(v, (1, 3, 16, 16), &d).unwrap();
    assert!(matches!(
        m.encode(&img),
        Err(Error::NonFinite {
            what: "image",
            nan: 1,
            inf: 1
        })
    ));
    let mut v = vec![0f32; 16 * 4];
    v[0] = f32::NEG_INFINITY;
    let lat = Tensor::from_vec(v, (1, 16, 2, 2), &d).unwrap();
    assert!(matches!(
        m.decode(&lat),
        Err(Error::NonFinite {
            what: "latent",
            nan: 0,
            inf: 1
        })
    ));
    let eps = z(&[1, 16, 3, 2]);
    assert!(matches!(
        m.encode_sample(&z(&[1, 3, 16, 16]), &eps),
        Err(Error::InputShape { .. })
    ));
    assert!(matches!(
        m.decode_tiled(
            &z(&[1, 16, 8, 8]),
            TileOptions {
                tile: 4,
                overlap: 4
            }
        ),
        Err(Error::InvalidOption(_))
    ));
}

#[test]
fn encode_sample_is_mean_plus_scaled_noise() {
    let m = model();
    let d = Device::Cpu;
    let img = Tensor::arange(0f32, 768f32, &d)
        .unwrap()
        .reshape((1, 3, 16, 16))
        .unwrap()
        .affine(1.0 / 384.0, -1.0)
        .unwrap();
    let mean = m.encode(&img).unwrap();
    let zero = Tensor::zeros(mean.dims(), DType::F32, &d).unwrap();
    let same = m.encode_sample(&img, &zero).unwrap();
    assert_eq!(max_abs_diff(&same, &mean), 0.0);
    let ones = Tensor::ones(mean.dims(), DType::F32, &d).unwrap();
    let (_, logvar) = m.encode_moments(&img).unwrap();
    let want = (&mean
        + (logvar.clamp(-30f32, 20f32).unwrap() * 0.5)
            .unwrap()
            .exp()
            .unwrap()
            * m.config().scale_factor)
        .unwrap();
    let got = m.encode_sample(&img, &ones).unwrap();
    let err = max_abs_diff(&got, &want);
    assert!(err < 1e-5, "{err}");
}
