//! Tiled decode/encode against the untiled result on the tiny golden model: the seam error is
//! measured and bounded here.

use std::path::PathBuf;

use candle::{DType, Device, Tensor};
use flux_vae::*;

fn model() -> AutoEncoder {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny_diffusers");
    AutoEncoder::from_diffusers_folder(dir, DType::F32, &Device::Cpu).unwrap()
}

/// Deterministic uniform values in [−1, 1).
fn uniform(shape: &[usize], seed: u64) -> Tensor {
    flux_golden::uniform(shape, seed)
}

/// Max-abs error and PSNR over the reference's peak-to-peak range (random tiny weights give
/// outputs well outside [−1, 1], so the range is measured, not assumed).
fn stats(a: &Tensor, reference: &Tensor) -> (f32, f64) {
    let d = (a - reference).unwrap();
    let max_abs = d
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mse = d
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let range = (reference.max_all().unwrap().to_scalar::<f32>().unwrap()
        - reference.min_all().unwrap().to_scalar::<f32>().unwrap()) as f64;
    let psnr = 10.0 * (range * range / mse.max(1e-30)).log10();
    (max_abs, psnr)
}

#[test]
fn tiled_decode_seam_error_is_bounded() {
    let m = model();
    let z = uniform(&[1, 16, 24, 32], 7);
    let full = m.decode(&z).unwrap();
    let range = (full.max_all().unwrap().to_scalar::<f32>().unwrap()
        - full.min_all().unwrap().to_scalar::<f32>().unwrap()) as f64;
    let mut psnrs = vec![];
    for (tile, overlap) in [(12, 4), (16, 8), (20, 10)] {
        let tiled = m.decode_tiled(&z, TileOptions { tile, overlap }).unwrap();
        assert_eq!(tiled.dims(), full.dims());
        let (max_abs, psnr) = stats(&tiled, &full);
        eprintln!("tiled decode, 24×32 latent, tile {tile} overlap {overlap}: max-abs {max_abs:.4} ({:.3} of the range {range:.2}), PSNR {psnr:.1} dB", max_abs as f64 / range);
        psnrs.push((psnr, max_abs as f64 / range));
    }
    // Measured on this platform: tile 16/overlap 8 gives PSNR 41.1 dB and max-abs 0.117 of the
    // range (the GroupNorm statistics and the mid attention see one tile at a time).
    let (psnr, rel) = psnrs[1];
    assert!(psnr > 38.0, "PSNR {psnr}");
    assert!(rel < 0.15, "max-abs / range {rel}");
    // More overlap, less seam error.
    assert!(psnrs[2].0 > psnrs[0].0);
    // One tile covering everything is the untiled decode exactly.
    let one = m
        .decode_tiled(
            &z,
            TileOptions {
                tile: 32,
                overlap: 4,
            },
        )
        .unwrap();
    assert_eq!(stats(&one, &full).0, 0.0);
}

#[test]
fn tiled_encode_matches_untiled_closely() {
    let m = model();
    let x = uniform(&[1, 3, 96, 128], 8);
    let full = m.encode(&x).unwrap();
    let tiled = m
        .encode_tiled(
            &x,
            TileOptions {
                tile: 8,
                overlap: 4,
            },
        )
        .unwrap();
    assert_eq!(tiled.dims(), full.dims());
    let (max_abs, psnr) = stats(&tiled, &full);
    eprintln!("tiled encode 96×128 image, tile 8 overlap 4 (latent px): max-abs {max_abs:.4}, PSNR {psnr:.1} dB");
    // Measured: PSNR 33 dB over the latent's range.
    assert!(psnr > 28.0, "PSNR {psnr}");
}
