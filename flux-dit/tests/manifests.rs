//! The loader expects exactly the tensors of the real FLUX.1-dev and FLUX.1-schnell checkpoints,
//! in both layouts. The manifests are written by the reference from diffusers'
//! FluxTransformer2DModel on PyTorch's meta device (`cargo xtask golden gen dit`); the BFL lists
//! are checked through diffusers' own converter there.

use std::collections::BTreeMap;

use flux_dit::{bfl_tensor_shapes, diffusers_tensor_shapes, Config};

fn manifest(name: &str) -> BTreeMap<String, Vec<usize>> {
    let path = format!("{}/tests/manifests/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}; run `cargo xtask golden gen dit`"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect()
}

fn compare(ours: Vec<(String, Vec<usize>)>, name: &str) {
    let want = manifest(name);
    let ours_map: BTreeMap<String, Vec<usize>> = ours.iter().cloned().collect();
    assert_eq!(
        ours.len(),
        ours_map.len(),
        "{name}: our list has duplicate names"
    );
    let missing: Vec<_> = want.keys().filter(|k| !ours_map.contains_key(*k)).collect();
    let extra: Vec<_> = ours_map.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{name}: we miss {missing:?}; we have extra {extra:?}"
    );
    for (k, shape) in &want {
        assert_eq!(&ours_map[k], shape, "{name}: shape of {k}");
    }
}

#[test]
fn dev_bfl_layout() {
    compare(bfl_tensor_shapes(&Config::dev()), "dev_bfl");
}

#[test]
fn dev_diffusers_layout() {
    compare(diffusers_tensor_shapes(&Config::dev()), "dev_diffusers");
}

#[test]
fn schnell_bfl_layout() {
    compare(bfl_tensor_shapes(&Config::schnell()), "schnell_bfl");
}

#[test]
fn schnell_diffusers_layout() {
    compare(
        diffusers_tensor_shapes(&Config::schnell()),
        "schnell_diffusers",
    );
}

#[test]
fn parameter_counts_match_the_spec() {
    // Spec §1.1: schnell 11,891,178,560; dev 11,901,408,320 parameters.
    let count = |c: &Config| {
        bfl_tensor_shapes(c)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    };
    assert_eq!(count(&Config::schnell()), 11_891_178_560);
    assert_eq!(count(&Config::dev()), 11_901_408_320);
}
