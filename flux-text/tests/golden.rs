//! flux-text against transformers (`cargo xtask golden gen text`): tokenizer ids for every
//! prompt, CLIP and T5 outputs on real token ids, the T5 bucket table.

use std::path::PathBuf;

use candle::{DType, Device, Tensor};
use flux_golden::{Golden, Tolerance};
use flux_text::*;

fn path(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(p)
}

fn clip_tok() -> ClipTokenizer {
    ClipTokenizer::from_dir(path("data/clip")).unwrap()
}

fn prompts(g: &Golden) -> Vec<String> {
    g.meta()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_vec2::<i64>().unwrap()
}

/// Compares every prompt's ids; one report row per tokenizer and length.
fn check_ids(g: &Golden, case: &str, encode: impl Fn(&str) -> Tokenized, key: &str) {
    let want = rows(&g.tensor(&format!("{key}/ids")));
    let lens = g
        .tensor(&format!("{key}/untruncated_len"))
        .to_vec1::<i64>()
        .unwrap();
    let ps = prompts(g);
    assert!(ps.len() >= 30);
    let mut ours = vec![];
    let mut theirs = vec![];
    for (i, p) in ps.iter().enumerate() {
        let t = encode(p);
        let max = want[i].len();
        // transformers' untruncated length includes the special tokens.
        let specials = if key == "clip" { 2 } else { 1 };
        assert_eq!(
            t.kept + t.truncated + specials,
            lens[i] as usize,
            "{case}: untruncated length of prompt {i} {p:?}"
        );
        assert_eq!(
            t.truncated > 0,
            lens[i] as usize > max,
            "{case}: truncation flag of prompt {i}"
        );
        ours.extend(t.ids.iter().map(|&x| x as f64));
        theirs.extend(want[i].iter().map(|&x| x as f64));
        assert_eq!(
            t.ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            want[i],
            "{case}: ids of prompt {i} {p:?}"
        );
    }
    g.check_values(case, "u32", &ours, &theirs, Tolerance::EXACT);
}

#[test]
fn clip_ids_for_every_prompt_from_vocab_and_merges() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "tokenizers");
    let tok = clip_tok();
    check_ids(
        &g,
        "clip/77 (vocab.json + merges.txt)",
        |p| tok.encode(p).unwrap(),
        "clip",
    );
}

#[test]
fn clip_ids_for_every_prompt_from_a_tokenizer_json() {
    // The single-file form, as written from the vocab.json + merges.txt form.
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "tokenizers");
    let dir = flux_golden::scratch_dir("clip-json");
    std::fs::write(dir.join("tokenizer.json"), clip_tok().to_json().unwrap()).unwrap();
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    check_ids(
        &g,
        "clip/77 (tokenizer.json)",
        |p| tok.encode(p).unwrap(),
        "clip",
    );
}

#[test]
fn t5_ids_for_every_prompt_both_file_forms_and_lengths() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "tokenizers");
    for form in ["t5", "t5_resaved"] {
        for n in [16, 256, 512] {
            let tok = T5Tokenizer::from_dir(path(&format!("data/{form}")), n).unwrap();
            check_ids(
                &g,
                &format!("{form}/{n}"),
                |p| tok.encode(p).unwrap(),
                &format!("t5_{n}"),
            );
        }
    }
}

fn ids(g: &Golden, key: &str) -> Tensor {
    g.tensor(key).to_dtype(DType::U32).unwrap()
}

#[test]
fn clip_last_hidden_state_and_pooled() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "models");
    let model = ClipTextModel::from_dir(path("golden/clip_text_encoder"), DType::F32, &Device::Cpu)
        .unwrap();
    let out = model.forward(&ids(&g, "clip/ids")).unwrap();
    g.check(
        "clip/last_hidden_state",
        &out.last_hidden_state,
        &g.tensor("clip/last_hidden_state"),
        Tolerance::F32,
    );
    g.check(
        "clip/pooled",
        &out.pooled,
        &g.tensor("clip/pooled"),
        Tolerance::F32,
    );
    // Our tokenizer gives the very ids the golden model saw.
    let ps: Vec<String> = g.meta()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().into())
        .collect();
    let tok = clip_tok();
    let want = rows(&g.tensor("clip/ids"));
    for (p, w) in ps.iter().zip(want) {
        assert_eq!(
            tok.encode(p)
                .unwrap()
                .ids
                .iter()
                .map(|&x| x as i64)
                .collect::<Vec<_>>(),
            w
        );
    }
}

#[test]
fn clip_bf16() {
    // Bound: cosine ≥ 0.999, max-abs ≤ 0.05 on pooled values of magnitude ~2.
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "models");
    let model =
        ClipTextModel::from_dir(path("golden/clip_text_encoder"), DType::BF16, &Device::Cpu)
            .unwrap();
    let out = model.forward(&ids(&g, "clip/ids")).unwrap();
    g.check(
        "clip/pooled_bf16",
        &out.pooled,
        &g.tensor("clip/pooled_bf16"),
        Tolerance::new(0.05, 0.0).with_min_cosine(0.999),
    );
}

#[test]
fn t5_last_hidden_state_at_16_77_256() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "models");
    let model =
        T5Encoder::from_dir(path("golden/t5_text_encoder_2"), DType::F32, &Device::Cpu).unwrap();
    let c = model.config();
    assert_ne!(
        c.num_heads * c.d_kv,
        c.d_model,
        "the golden model must have an inner dim ≠ d_model"
    );
    for n in [16, 77, 256] {
        let out = model.forward(&ids(&g, &format!("t5_{n}/ids"))).unwrap();
        // T5 attention is unscaled, so its softmax is peaky: at L = 256 the summation order of the
        // 256-term products (gemm vs PyTorch's BLAS) moves 2 of 6144 values by ≤ 2.4e-5.
        let tol = if n == 256 {
            Tolerance::new(5e-5, 1e-5)
        } else {
            Tolerance::F32
        };
        g.check(
            &format!("t5_{n}/last_hidden_state"),
            &out,
            &g.tensor(&format!("t5_{n}/last_hidden_state")),
            tol,
        );
    }
}

#[test]
fn t5_bf16() {
    // transformers evaluates gelu_new op by op in bf16 (several roundings); we evaluate it fused
    // in f32. Bound: cosine ≥ 0.999, max-abs ≤ 0.1 on outputs of magnitude ~3.
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "models");
    let model =
        T5Encoder::from_dir(path("golden/t5_text_encoder_2"), DType::BF16, &Device::Cpu).unwrap();
    let out = model.forward(&ids(&g, "t5_77/ids")).unwrap();
    g.check(
        "t5_77/last_hidden_state_bf16",
        &out,
        &g.tensor("t5_77/last_hidden_state_bf16"),
        Tolerance::new(0.1, 0.0).with_min_cosine(0.999),
    );
}

#[test]
fn t5_relative_bucket_table_512() {
    let g = Golden::open(env!("CARGO_MANIFEST_DIR"), "models");
    let want = g.tensor("t5/buckets_512").to_dtype(DType::F32).unwrap();
    let ours: Vec<f32> = (0..512i64)
        .flat_map(|i| (0..512i64).map(move |j| relative_position_bucket(j - i, 32, 128) as f32))
        .collect();
    let ours = Tensor::from_vec(ours, (512, 512), &Device::Cpu).unwrap();
    g.check("t5/buckets_512", &ours, &want, Tolerance::EXACT);
}
