//! T5 from a llama.cpp-layout GGUF (city96's T5 files: `token_embd`, `enc.blk.N.*`, a different
//! type per linear) against transformers on the weights as the `gguf` package decodes them
//! (`cargo xtask golden gen text`).

use candle::{DType, Device};
use flux_golden::{Golden, Tolerance};
use flux_text::{T5Config, T5Encoder};

#[test]
fn t5_from_llama_cpp_gguf() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "t5_quant");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/t5_quant.gguf");
    let model = T5Encoder::from_file(&path, DType::F32, &Device::Cpu).unwrap();
    let want = T5Config {
        vocab_size: 256,
        d_model: 256,
        d_kv: 64,
        d_ff: 256,
        num_layers: 2,
        num_heads: 4,
        ..T5Config::v1_1_xxl()
    };
    assert_eq!(model.config(), &want);
    let out = model.forward(&g.tensor("ids")).unwrap();
    g.check(
        "last_hidden_state",
        &out,
        &g.tensor("last_hidden_state"),
        Tolerance::F32,
    );
}

/// `--quantize` reaches T5: the GGUF's weights decoded to a dense file, loaded with Q8_0 / Q4_K
/// encoding, stay close to the reference (and are really re-encoded: not equal to it).
#[test]
fn t5_quantize_while_loading() {
    use flux_kernels::{Checkpoint, Encoding, QuantType};
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "t5_quant");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/t5_quant.gguf");
    let ck = Checkpoint::open(&[src], DType::F32, &Device::Cpu).unwrap();
    let dense: std::collections::HashMap<String, candle::Tensor> = ck
        .names()
        .into_iter()
        .map(|k| {
            let t = ck.get(&k, None).unwrap();
            (k, t)
        })
        .collect();
    let file = flux_golden::scratch("t5-dense.safetensors");
    candle::safetensors::save(&dense, &file).unwrap();
    let want = g.tensor("last_hidden_state");
    for (ty, min_cos) in [(QuantType::Q8_0, 0.9995), (QuantType::Q4_K, 0.975)] {
        let model = T5Encoder::from_path(&file, DType::F32, &Device::Cpu, Some(Encoding::Gguf(ty)))
            .unwrap();
        let out = model.forward(&g.tensor("ids")).unwrap();
        let tol = Tolerance::new(f64::INFINITY, 0.0).with_min_cosine(min_cos);
        let c = g.check(&format!("quantize_{ty}"), &out, &want, tol);
        assert!(
            c.max_abs > 1e-5,
            "{ty}: output equals the dense model's: not quantized"
        );
        eprintln!(
            "t5 quantize {ty}: cosine {:.6}, max abs {:.3e}",
            c.cosine, c.max_abs
        );
    }
    let _ = std::fs::remove_file(&file);
}
