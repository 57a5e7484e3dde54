//! The loader expects exactly the tensors of the real FLUX.1-dev and FLUX.1-schnell checkpoints,
//! in both layouts. The manifests are written by the reference from diffusers'
//! FluxTransformer2DModel on PyTorch's meta device (`cargo xtask golden gen dit`); the BFL lists
//! are checked through diffusers' own converter there.

use flux_dit::{bfl_tensor_shapes, diffusers_tensor_shapes, Config};
use flux_golden::{assert_same_tensors, manifest};

fn compare(ours: Vec<(String, Vec<usize>)>, name: &str) {
    assert_same_tensors(&ours, &manifest(env!("CARGO_MANIFEST_DIR"), name), name);
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
