//! Bad input for flux-text: tokenizer files, lengths, checkpoints, ids, dtypes.

use flux_kernels::LoadError;
use std::collections::HashMap;
use std::path::PathBuf;

use candle::{DType, Device, Tensor};
use flux_golden::max_abs_diff;
use flux_text::*;

fn path(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(p)
}

fn tmp(name: &str) -> PathBuf {
    flux_golden::scratch(name)
}

#[test]
fn tokenizer_file_errors() {
    assert!(matches!(
        ClipTokenizer::from_dir(tmp("nothing-here")),
        Err(Error::TokenizerFile { .. })
    ));
    let bad = tmp("bad-utf8.json");
    std::fs::write(&bad, b"{\"a\": \"\xff\xfe\"}").unwrap();
    let e = T5Tokenizer::from_file(&bad, 512).unwrap_err();
    assert!(
        matches!(&e, Error::TokenizerFile { reason, .. } if reason.contains("UTF-8")),
        "{e}"
    );
    let not_json = tmp("not.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    assert!(matches!(
        T5Tokenizer::from_file(&not_json, 512),
        Err(Error::TokenizerFile { .. })
    ));
    // A CLIP (BPE) file given as T5.
    let vocab = tmp("vocab.json");
    std::fs::write(&vocab, "[1, 2]").unwrap();
    assert!(matches!(
        ClipTokenizer::from_vocab_merges(&vocab, path("data/clip/merges.txt")),
        Err(Error::TokenizerFile { .. })
    ));
    let merges = tmp("merges.txt");
    std::fs::write(&merges, "#version: 0.2\na b c\n").unwrap();
    assert!(matches!(
        ClipTokenizer::from_vocab_merges(path("data/clip/vocab.json"), &merges),
        Err(Error::TokenizerFile { .. })
    ));
    let only_spiece = tmp("t5-spiece");
    std::fs::create_dir_all(&only_spiece).unwrap();
    std::fs::write(only_spiece.join("spiece.model"), b"\x00").unwrap();
    let e = T5Tokenizer::from_dir(&only_spiece, 512).unwrap_err();
    assert!(
        matches!(&e, Error::TokenizerFile { reason, .. } if reason.contains("spiece.model")),
        "{e}"
    );
}

#[test]
fn lengths_are_checked_and_truncation_reported() {
    let clip = ClipTokenizer::from_dir(path("data/clip")).unwrap();
    assert!(matches!(
        clip.clone().with_max_len(78),
        Err(Error::InvalidMaxLength { .. })
    ));
    assert!(matches!(
        clip.clone().with_max_len(0),
        Err(Error::InvalidMaxLength { .. })
    ));
    let t5 = T5Tokenizer::from_dir(path("data/t5"), 0);
    assert!(matches!(t5, Err(Error::InvalidMaxLength { .. })));
    let long = "word ".repeat(100);
    let t = clip.encode(&long).unwrap();
    assert_eq!((t.ids.len(), t.kept, t.truncated), (77, 75, 25));
    assert_eq!((t.ids[0], t.ids[76]), (CLIP_BOS, CLIP_EOS));
    let t5 = T5Tokenizer::from_dir(path("data/t5"), 16).unwrap();
    let t = t5.encode(&long).unwrap();
    assert_eq!(
        (t.ids.len(), t.kept, t.truncated, t.ids[15]),
        (16, 15, 85, T5_EOS)
    );
    let t = t5.encode("a cat").unwrap();
    assert_eq!(t.truncated, 0);
    assert_eq!(*t.ids.last().unwrap(), T5_PAD);
}

fn clip_files() -> Vec<PathBuf> {
    vec![path("golden/clip_text_encoder/model.safetensors")]
}

fn clip_cfg() -> ClipConfig {
    ClipConfig::from_json(
        &std::fs::read_to_string(path("golden/clip_text_encoder/config.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn full_clip_model_file_ignores_vision_keys_and_prefix() {
    // Text tower with the released `text_model.` prefix plus a real CLIPModel's other keys.
    let mut t: HashMap<String, Tensor> = candle::safetensors::load(&clip_files()[0], &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    t.extend(
        candle::safetensors::load(
            path("golden/clip_full_model_extra.safetensors"),
            &Device::Cpu,
        )
        .unwrap(),
    );
    t.insert(
        "text_model.embeddings.position_ids".into(),
        Tensor::arange(0i64, 77, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    let full = tmp("clip_full.safetensors");
    candle::safetensors::save(&t, &full).unwrap();
    let a = ClipTextModel::load(&clip_cfg(), &[full], DType::F32, &Device::Cpu).unwrap();
    let b = ClipTextModel::load(&clip_cfg(), &clip_files(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[49406u32, 320, 2368, 49407, 49407]], &Device::Cpu).unwrap();
    let d = max_abs_diff(
        &a.forward(&ids).unwrap().pooled,
        &b.forward(&ids).unwrap().pooled,
    );
    assert_eq!(d, 0.0);
}

#[test]
fn checkpoint_and_id_errors() {
    let mut t: HashMap<String, Tensor> =
        candle::safetensors::load(&clip_files()[0], &Device::Cpu).unwrap();
    t.remove("encoder.layers.1.mlp.fc2.bias");
    t.insert(
        "encoder.layers.9.mlp.fc2.bias".into(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = tmp("clip_missing.safetensors");
    candle::safetensors::save(&t, &p).unwrap();
    let e = ClipTextModel::load(&clip_cfg(), &[p], DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, Error::Load(LoadError::MissingTensor { name, .. }) if name == "encoder.layers.1.mlp.fc2.bias"),
        "{e}"
    );
    t.insert(
        "encoder.layers.1.mlp.fc2.bias".into(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = tmp("clip_extra.safetensors");
    candle::safetensors::save(&t, &p).unwrap();
    let e = ClipTextModel::load(&clip_cfg(), &[p], DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, Error::Load(LoadError::UnexpectedTensors { names, .. }) if names == &["encoder.layers.9.mlp.fc2.bias"]),
        "{e}"
    );
    let model = ClipTextModel::load(&clip_cfg(), &clip_files(), DType::F32, &Device::Cpu).unwrap();
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&too_long),
        Err(Error::InvalidIds(_))
    ));
    let out_of_vocab = Tensor::new(&[[49408u32]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&out_of_vocab),
        Err(Error::InvalidIds(_))
    ));
    assert!(matches!(
        T5Encoder::from_dir(path("golden/t5_text_encoder_2"), DType::F16, &Device::Cpu),
        Err(Error::UnsupportedDtype { .. })
    ));
    let truncated = tmp("truncated.safetensors");
    let bytes = std::fs::read(&clip_files()[0]).unwrap();
    std::fs::write(&truncated, &bytes[..1000]).unwrap();
    assert!(matches!(
        ClipTextModel::load(&clip_cfg(), &[truncated], DType::F32, &Device::Cpu),
        Err(Error::Load(LoadError::File { .. }))
    ));
}

#[test]
fn t5_accepts_either_embedding_name() {
    let dir = path("golden/t5_text_encoder_2");
    let files = flux_kernels::sharded_files(&dir, "model").unwrap();
    let cfg =
        T5Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut t = HashMap::new();
    for f in &files {
        t.extend(candle::safetensors::load(f, &Device::Cpu).unwrap());
    }
    let emb = t.remove("shared.weight").unwrap();
    t.insert("encoder.embed_tokens.weight".into(), emb.clone());
    let renamed = tmp("t5_embed_tokens.safetensors");
    candle::safetensors::save(&t, &renamed).unwrap();
    t.insert("shared.weight".into(), emb);
    let both = tmp("t5_both.safetensors");
    candle::safetensors::save(&t, &both).unwrap();
    let ids = Tensor::new(&[[71u32, 1202, 1, 0]], &Device::Cpu).unwrap();
    let reference = T5Encoder::load(&cfg, &files, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&ids)
        .unwrap();
    for f in [renamed, both] {
        let out = T5Encoder::load(&cfg, &[f], DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&ids)
            .unwrap();
        assert_eq!(max_abs_diff(&out, &reference), 0.0);
    }
}

#[test]
fn prompt_encoder_batches_reports_and_unloads() {
    let d = Device::Cpu;
    let clip_tok = ClipTokenizer::from_dir(path("data/clip")).unwrap();
    let t5_tok = T5Tokenizer::from_dir(path("data/t5"), 16).unwrap();
    let clip = ClipTextModel::from_dir(path("golden/clip_text_encoder"), DType::F32, &d).unwrap();
    let t5 = T5Encoder::from_dir(path("golden/t5_text_encoder_2"), DType::F32, &d).unwrap();
    let mut enc = PromptEncoder::new(
        clip_tok.clone(),
        t5_tok.clone(),
        clip.clone(),
        t5.clone(),
        &d,
    );
    let long = "word ".repeat(30);
    let out = enc.encode(&["a cat", &long], None).unwrap();
    assert_eq!(out.t5.dims(), &[2, 16, 8]);
    assert_eq!(out.pooled.dims(), &[2, 8]);
    assert_eq!(out.clip_truncated, vec![0, 0]);
    assert_eq!(out.t5_truncated, vec![0, 15]);
    // Each row equals encoding that prompt alone with the models directly.
    let ids = Tensor::new(clip_tok.encode("a cat").unwrap().ids.as_slice(), &d)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let pooled = clip.forward(&ids).unwrap().pooled;
    let diff = max_abs_diff(&out.pooled.get(0).unwrap(), &pooled.get(0).unwrap());
    assert_eq!(diff, 0.0);
    // prompt_2 goes to T5 only.
    let two = enc.encode(&["a cat"], Some(&["a dog"])).unwrap();
    let one = enc.encode(&["a cat"], None).unwrap();
    assert_eq!(max_abs_diff(&two.pooled, &one.pooled), 0.0);
    assert!(max_abs_diff(&two.t5, &one.t5) > 0.0);
    assert!(matches!(
        enc.encode(&["a", "b"], Some(&["c"])),
        Err(Error::InvalidIds(_))
    ));
    enc.unload();
    assert!(!enc.is_loaded());
    assert!(matches!(
        enc.encode(&["a cat"], None),
        Err(Error::Unloaded(_))
    ));
    assert_eq!(enc.tokenize(&["a cat"], None).unwrap().0[0].ids.len(), 77);
}

/// A prompt of megabytes is tokenised only as far as the encoders can use (bounded time and
/// memory), with the same ids as the whole text and the unread part reported.
#[test]
fn huge_prompts_are_read_only_as_far_as_needed() {
    let clip = ClipTokenizer::from_dir(path("data/clip")).unwrap();
    let t5 = T5Tokenizer::from_dir(path("data/t5"), 512).unwrap();
    let short = "a red fox jumps ".repeat(200);
    let huge = "a red fox jumps ".repeat(1 << 19); // 8 MiB
    for (name, a, b) in [
        (
            "clip",
            clip.encode(&short).unwrap(),
            clip.encode(&huge).unwrap(),
        ),
        ("t5", t5.encode(&short).unwrap(), t5.encode(&huge).unwrap()),
    ] {
        assert_eq!(a.ids, b.ids, "{name}");
        assert_eq!(a.unread_bytes, 0, "{name}");
        assert!(
            b.unread_bytes > huge.len() - (1 << 17),
            "{name}: {}",
            b.unread_bytes
        );
        assert!(b.truncated > 0, "{name}");
    }
    // whitespace first: the doubling reads on until there are tokens to keep
    let spaced = format!("{}cat", " ".repeat(200_000));
    assert_eq!(
        t5.encode(&spaced).unwrap().ids,
        t5.encode("cat").unwrap().ids
    );
    // one enormous "word" (no whitespace at all) is cut inside, still bounded
    let word = "x".repeat(4 << 20);
    let t = clip.encode(&word).unwrap();
    assert_eq!(t.kept, 75);
    assert!(t.unread_bytes > 0);
}
