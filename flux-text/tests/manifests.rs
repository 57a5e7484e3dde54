//! The loaders expect exactly the tensors of the real CLIP-L text model and T5-XXL encoder
//! (manifests from transformers on the meta device, `cargo xtask golden gen text`).

use std::collections::BTreeMap;

use flux_golden::{assert_same_tensors, manifest as read_manifest};
use flux_text::{ClipConfig, T5Config};

fn manifest(name: &str) -> BTreeMap<String, Vec<usize>> {
    read_manifest(env!("CARGO_MANIFEST_DIR"), name)
}

fn same(ours: Vec<(String, Vec<usize>)>, want: &BTreeMap<String, Vec<usize>>, name: &str) {
    assert_same_tensors(&ours, want, name);
}

#[test]
fn clip_l_text_model() {
    // transformers 5 names the text tower without the `text_model.` prefix that released
    // checkpoints carry; the loader accepts both, and the list is the same under either.
    same(
        ClipConfig::vit_l_14().tensor_shapes(""),
        &manifest("clip_l"),
        "clip_l",
    );
    let prefixed: BTreeMap<String, Vec<usize>> = manifest("clip_l")
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect();
    same(
        ClipConfig::vit_l_14().tensor_shapes("text_model."),
        &prefixed,
        "clip_l (text_model.)",
    );
}

#[test]
fn t5_xxl_encoder() {
    // The module tree holds the tied embedding twice (shared, encoder.embed_tokens); files keep
    // one of them and the loader accepts either.
    let mut want = manifest("t5_xxl");
    assert_eq!(
        want.remove("encoder.embed_tokens.weight"),
        want.get("shared.weight").cloned()
    );
    same(T5Config::v1_1_xxl().tensor_shapes(), &want, "t5_xxl");
}

#[test]
fn parameter_counts_match_the_spec() {
    let count = |v: Vec<(String, Vec<usize>)>| {
        v.iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    };
    assert_eq!(count(ClipConfig::vit_l_14().tensor_shapes("")), 123_060_480);
    assert_eq!(count(T5Config::v1_1_xxl().tensor_shapes()), 4_762_310_656);
}
