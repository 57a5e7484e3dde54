//! The loader expects exactly the tensors of the real FLUX autoencoder in both layouts
//! (manifests from diffusers' AutoencoderKL on the meta device; the BFL list is checked through
//! diffusers' `convert_ldm_vae_checkpoint`).

use std::collections::BTreeMap;

use flux_vae::{bfl_tensor_shapes, diffusers_tensor_shapes, Config};

fn manifest(name: &str) -> BTreeMap<String, Vec<usize>> {
    let path = format!("{}/tests/manifests/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}; run `cargo xtask golden gen vae`"));
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
    let n = ours.len();
    let ours: BTreeMap<String, Vec<usize>> = ours.into_iter().collect();
    assert_eq!(n, ours.len(), "duplicate names");
    let missing: Vec<_> = want.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{name}: we miss {missing:?}; extra {extra:?}"
    );
    for (k, s) in &want {
        assert_eq!(&ours[k], s, "{name}: shape of {k}");
    }
}

#[test]
fn flux_ae_bfl_layout() {
    compare(bfl_tensor_shapes(&Config::flux()), "ae_bfl");
}

#[test]
fn flux_ae_diffusers_layout() {
    compare(diffusers_tensor_shapes(&Config::flux()), "ae_diffusers");
}

#[test]
fn parameter_counts_match_the_spec() {
    // Spec §4.4: encoder 34,274,208, decoder 49,545,475, total 83,819,683.
    let shapes = bfl_tensor_shapes(&Config::flux());
    let count = |side: &str| {
        shapes
            .iter()
            .filter(|(k, _)| k.starts_with(side))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    };
    assert_eq!(count("encoder."), 34_274_208);
    assert_eq!(count("decoder."), 49_545_475);
}
