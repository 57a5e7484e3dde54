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
