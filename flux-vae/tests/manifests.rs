//! The loader expects exactly the tensors of the real FLUX autoencoder in both layouts
//! (manifests from diffusers' AutoencoderKL on the meta device; the BFL list is checked through
//! diffusers' `convert_ldm_vae_checkpoint`).

use flux_golden::{assert_same_tensors, manifest};
use flux_vae::{bfl_tensor_shapes, diffusers_tensor_shapes, Config};

fn compare(ours: Vec<(String, Vec<usize>)>, name: &str) {
    assert_same_tensors(&ours, &manifest(env!("CARGO_MANIFEST_DIR"), name), name);
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
