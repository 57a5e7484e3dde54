//! The transformer from quantized files against diffusers run on the same weights as the
//! reference decodes them (`cargo xtask golden gen dit`): a city96-style GGUF with a different
//! type in every layer (all 13 GGUF types), and a ComfyUI scaled-fp8 file with the
//! all-in-one prefix. The quantized path adds no error of its own: f32 tolerance.

use std::path::PathBuf;

use candle::{DType, Device, Tensor};
use flux_dit::*;
use flux_golden::{Golden, Tolerance};

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

const DIFFUSERS: FluxOptions = FluxOptions {
    rope: AngleMode::F64,
    composite_attention: false,
    quantize: None,
    fp8_gemm: false,
};

fn forward(model: &Flux, g: &Golden, p: &str, t: f32, guidance: f32) -> Tensor {
    let img = g.tensor(&format!("{p}img"));
    let one = |n: &str| g.tensor(&format!("{p}{n}")).unsqueeze(0).unwrap();
    let dev = Device::Cpu;
    model
        .forward(&DitInput {
            img: &img,
            img_ids: &one("img_ids"),
            txt: &g.tensor(&format!("{p}txt")),
            txt_ids: &one("txt_ids"),
            timesteps: &Tensor::new(&[t], &dev).unwrap(),
            y: &g.tensor(&format!("{p}y")),
            guidance: Some(&Tensor::new(&[guidance], &dev).unwrap()),
        })
        .unwrap()
}

#[test]
fn gguf_every_type_one_file_detected_config() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "quant_dev");
    let model =
        Flux::from_file(path("quant_dev.gguf"), DType::F32, &Device::Cpu, DIFFUSERS).unwrap();
    let cfg = model.config();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.depth,
            cfg.depth_single_blocks
        ),
        (256, 2, 1, 1)
    );
    assert!(cfg.guidance_embed && cfg.in_channels == 64 && cfg.context_in_dim == 32);
    let out = forward(&model, &g, "input/", 0.7, 3.5);
    // guidance 3.5 (t' = 3500): the sinusoid's last-ulp differences dominate, as in golden.rs
    g.check(
        "output/gguf",
        &out,
        &g.tensor("output/gguf"),
        Tolerance::F32_SINUSOID,
    );
}

#[test]
fn scaled_fp8_with_all_in_one_prefix() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "quant_dev");
    let cfg_json = std::fs::read_to_string(path("dev_diffusers/config.json")).unwrap();
    let cfg = Config::from_diffusers_json(&cfg_json).unwrap();
    let model = Flux::from_bfl_file(
        path("tiny_dev_fp8.safetensors"),
        &cfg,
        DType::F32,
        &Device::Cpu,
        DIFFUSERS,
    )
    .unwrap();
    let out = forward(&model, &g, "fp8/", 0.5, 4.0);
    // guidance 4 (t' = 4000): the sinusoid's last-ulp differences dominate, as in golden.rs
    g.check(
        "fp8/output",
        &out,
        &g.tensor("fp8/output"),
        Tolerance::F32_SINUSOID,
    );
    // head size 8 is not FLUX's: detection asks for the config instead of guessing RoPE axes
    let e = Flux::from_file(
        path("tiny_dev_fp8.safetensors"),
        DType::F32,
        &Device::Cpu,
        DIFFUSERS,
    );
    assert!(matches!(e, Err(Error::InvalidConfig(m)) if m.contains("head size 8")));
}

/// `--quantize` on a dense checkpoint: the same wide model, decoded to dense f32 and quantized
/// again while loading, against the reference output of the dense weights. This records each
/// type's own error (the table in the README; measured: cosine Q8_0 0.99998, Q6_K 0.99971,
/// Q5_K 0.99837, Q4_K 0.99527, Q4_0 0.99128, fp8 e4m3 0.99901, fp8 GEMMs (activations rounded
/// too) 0.99838 on these random-block weights);
/// the bounds are loose guards, not targets.
#[test]
fn quantize_while_loading_error_per_type() {
    use flux_kernels::{Checkpoint, Encoding, Fp8Kind, QuantType};
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "quant_dev");
    let file = Checkpoint::open(&[path("quant_dev.gguf")], DType::F32, &Device::Cpu).unwrap();
    let probe = Weights::open(
        &[path("quant_dev.gguf")],
        Layout::Bfl,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = probe.detect_config().unwrap();
    let dense: std::collections::HashMap<String, Tensor> = bfl_tensor_shapes(&cfg)
        .into_iter()
        .map(|(k, s)| (k.clone(), file.get(&k, Some(&s)).unwrap()))
        .collect();
    let want = g.tensor("output/gguf");
    let e4m3 = Encoding::Fp8(Fp8Kind::E4M3);
    for (enc, fp8_gemm, min_cos) in [
        (Encoding::Gguf(QuantType::Q8_0), false, 0.9999),
        (Encoding::Gguf(QuantType::Q6_K), false, 0.999),
        (Encoding::Gguf(QuantType::Q5_K), false, 0.997),
        (Encoding::Gguf(QuantType::Q4_K), false, 0.99),
        (Encoding::Gguf(QuantType::Q4_0), false, 0.98),
        (e4m3, false, 0.998),
        // fp8 GEMMs: the activations of every block product rounded to e4m3 per tensor too
        (e4m3, true, 0.995),
    ] {
        let ck =
            Checkpoint::from_tensors(dense.clone(), DType::F32, &Device::Cpu, "decoded").unwrap();
        let w = Weights::from_checkpoint(ck, Layout::Bfl);
        let opts = FluxOptions {
            quantize: (!fp8_gemm).then_some(enc),
            fp8_gemm,
            ..DIFFUSERS
        };
        let model = Flux::load(&cfg, &w, opts).unwrap();
        let out = forward(&model, &g, "input/", 0.7, 3.5);
        let tol = Tolerance::new(f64::INFINITY, 0.0).with_min_cosine(min_cos);
        let label = if fp8_gemm {
            "fp8 GEMM".into()
        } else {
            enc.to_string()
        };
        let c = g.check(&format!("quantize_{label}_vs_dense"), &out, &want, tol);
        eprintln!(
            "quantize {label}: cosine {:.6}, max abs {:.3e}",
            c.cosine, c.max_abs
        );
        if fp8_gemm {
            // the wide model's block linears multiply in fp8, the embedders do not
            let layers = model.linears();
            let n = layers.iter().filter(|(_, l)| l.is_fp8_gemm()).count();
            assert!(n >= 6, "{n} fp8 layers");
            assert!(layers.iter().any(|(_, l)| !l.is_fp8_gemm()));
        }
    }
    // fp8 GEMMs take e4m3 weights only
    let ck = Checkpoint::from_tensors(dense, DType::F32, &Device::Cpu, "decoded").unwrap();
    let w = Weights::from_checkpoint(ck, Layout::Bfl);
    let opts = FluxOptions {
        quantize: Some(Encoding::Gguf(QuantType::Q8_0)),
        fp8_gemm: true,
        ..DIFFUSERS
    };
    let e = Flux::load(&cfg, &w, opts);
    assert!(matches!(e, Err(Error::InvalidConfig(m)) if m.contains("fp8")));
}

/// `flux convert`: the wide model rewritten as Q4_K / Q8_0 GGUF, city96's type policy, read back
/// by candle's GGUF reader (another implementation) and by ours.
#[test]
fn convert_to_gguf_round_trip() {
    use flux_kernels::QuantType;
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "quant_dev");
    let dir = flux_golden::scratch_dir("convert");
    let src = flux_kernels::Checkpoint::open(&[path("quant_dev.gguf")], DType::F32, &Device::Cpu)
        .unwrap();
    for (ty, min_cos) in [(QuantType::Q8_0, 0.9999), (QuantType::Q4_K, 0.99)] {
        let out = dir.join(format!("wide-{ty}.gguf"));
        let mut calls = 0;
        let report =
            convert_to_gguf(&path("quant_dev.gguf"), None, &out, ty, |_, _| calls += 1).unwrap();
        assert_eq!(calls, 52);
        assert_eq!(report.types[ty.name()], 13, "{:?}", report.types); // every block linear
                                                                       // candle's reader: same names, shapes (torch order) and types
        let mut f = std::fs::File::open(&out).unwrap();
        let c = candle::quantized::gguf_file::Content::read(&mut f).unwrap();
        let ours = flux_kernels::gguf::parse(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(c.tensor_infos.len(), ours.tensors.len());
        for t in &ours.tensors {
            let ci = &c.tensor_infos[&t.name];
            assert_eq!(ci.shape.dims(), t.shape.as_slice(), "{}", t.name);
            assert_eq!(ci.ggml_dtype, t.ty.to_candle(), "{}", t.name);
            let want = gguf_type_for(&t.name, &t.shape, src.stored_type(&t.name), ty);
            assert_eq!(t.ty, want, "{}", t.name);
        }
        assert_eq!(
            c.metadata["general.architecture"].to_string().unwrap(),
            "flux"
        );
        let model = Flux::from_file(&out, DType::F32, &Device::Cpu, DIFFUSERS).unwrap();
        let o = forward(&model, &g, "input/", 0.7, 3.5);
        let tol = Tolerance::new(f64::INFINITY, 0.0).with_min_cosine(min_cos);
        g.check(
            &format!("convert_{ty}_vs_dense"),
            &o,
            &g.tensor("output/gguf"),
            tol,
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
