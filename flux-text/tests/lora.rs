//! LoRAs on the CLIP text encoder against diffusers' fused weights
//! (`cargo xtask golden gen lora-text`): kohya's `lora_te1_` and diffusers' `text_encoder.`
//! layouts, merged and at run time, removal, and modules that match nothing.

use std::path::PathBuf;

use candle::{DType, Device, Tensor};
use flux_golden::{max_abs_diff, Golden};
use flux_kernels::lora::{AdapterFile, LoraMode, LoraOptions};
use flux_text::ClipTextModel;

fn dir(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(p)
}

fn clip() -> ClipTextModel {
    ClipTextModel::from_dir(dir("clip_text_encoder"), DType::F32, &Device::Cpu).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(&[[0u32, 5, 17, 300, 2, 1, 1]], &Device::Cpu).unwrap()
}

#[test]
fn clip_loras_match_diffusers_fused_weights() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "lora/expected");
    let mut m = clip();
    let base: Vec<(String, Tensor)> = m
        .linears()
        .into_iter()
        .map(|(n, l)| (n, l.weight().unwrap()))
        .collect();
    let y0 = m.forward(&ids()).unwrap().last_hidden_state;
    for fmt in ["kohya_te", "diffusers_te"] {
        let file = AdapterFile::open(&dir(&format!("lora/{fmt}.safetensors"))).unwrap();
        let mut outputs = vec![];
        for mode in [LoraMode::Merge, LoraMode::Runtime] {
            let opts = LoraOptions {
                mode,
                ..Default::default()
            };
            // the file's transformer module is not CLIP's: left alone
            let n = m.apply_loras(&[(&file, 0.8)], &opts).unwrap();
            assert_eq!(n, 12, "{fmt}");
            if mode == LoraMode::Merge {
                for (name, lin) in m.linears() {
                    let want = g.tensor(&format!("{fmt}/{name}.weight"));
                    let d = max_abs_diff(&lin.weight().unwrap(), &want);
                    assert!(d <= 2e-6, "{fmt}: {name} {d} from diffusers' fused weight");
                }
            }
            outputs.push(m.forward(&ids()).unwrap().last_hidden_state);
            m.remove_loras().unwrap();
        }
        assert!(
            max_abs_diff(&outputs[0], &outputs[1]) <= 1e-5,
            "{fmt}: run time vs merged"
        );
        assert!(max_abs_diff(&outputs[0], &y0) > 1e-3, "{fmt}: no change");
    }
    for ((n, w), (_, l)) in base.iter().zip(m.linears()) {
        assert_eq!(
            max_abs_diff(w, &l.weight().unwrap()),
            0.0,
            "{n} after removal"
        );
    }
    assert_eq!(
        max_abs_diff(&m.forward(&ids()).unwrap().last_hidden_state, &y0),
        0.0
    );
}

#[test]
fn clip_modules_that_match_nothing() {
    let tmp = flux_golden::scratch_dir("text-lora");
    let path = tmp.join("bad.safetensors");
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let t: std::collections::HashMap<String, Tensor> = [
        (
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            z(&[2, 8]),
        ),
        (
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
            z(&[37, 2]),
        ),
        (
            "lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_down.weight",
            z(&[2, 8]),
        ),
        (
            "lora_te1_text_model_encoder_layers_9_mlp_fc1.lora_up.weight",
            z(&[37, 2]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle::safetensors::save(&t, &path).unwrap();
    let file = AdapterFile::open(&path).unwrap();
    let mut m = clip();
    let e = m
        .apply_loras(&[(&file, 1.0)], &LoraOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers_9"), "{e}");
    let lenient = LoraOptions {
        lenient: true,
        ..Default::default()
    };
    assert_eq!(m.apply_loras(&[(&file, 1.0)], &lenient).unwrap(), 1);
    let r = ClipTextModel::check_loras(m.config(), &[(&file, 1.0)], &lenient).unwrap();
    assert_eq!(r[0].1.len(), 1);
}
