//! flux-vae against diffusers' AutoencoderKL with the FLUX block structure and tiny widths,
//! loaded from the diffusers folder and from the BFL file (`cargo xtask golden gen vae`).

use std::path::PathBuf;

use candle::{DType, Device, Tensor};
use flux_golden::{Golden, Tolerance};
use flux_vae::*;

fn golden() -> Golden {
    Golden::open(env!("CARGO_MANIFEST_DIR"), "tiny")
}

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(name)
}

fn models(dtype: DType) -> (AutoEncoder, AutoEncoder) {
    let a = AutoEncoder::from_diffusers_folder(dir("tiny_diffusers"), dtype, &Device::Cpu).unwrap();
    let b =
        AutoEncoder::from_bfl_file(dir("tiny_bfl.safetensors"), a.config(), dtype, &Device::Cpu)
            .unwrap();
    (a, b)
}

#[test]
fn encode_moments_and_latent_64_batch2_and_48x80() {
    let g = golden();
    let (a, b) = models(DType::F32);
    for size in ["64", "48x80"] {
        let x = g.tensor(&format!("input/image_{size}"));
        let (mean, logvar) = a.encode_moments(&x).unwrap();
        let moments = Tensor::cat(&[mean, logvar], 1).unwrap();
        g.check(
            &format!("encode/{size}/moments"),
            &moments,
            &g.tensor(&format!("encode/{size}/moments")),
            Tolerance::F32,
        );
        let za = a.encode(&x).unwrap();
        let zb = b.encode(&x).unwrap();
        g.check(
            &format!("encode/{size}/latent"),
            &za,
            &g.tensor(&format!("encode/{size}/latent")),
            Tolerance::F32,
        );
        g.check(
            &format!("encode/{size}/latent BFL vs diffusers layout"),
            &zb,
            &za,
            Tolerance::EXACT,
        );
    }
}

#[test]
fn decode_8_batch2_and_6x10() {
    let g = golden();
    let (a, b) = models(DType::F32);
    for size in ["8", "6x10"] {
        let z = g.tensor(&format!("input/latent_{size}"));
        let xa = a.decode(&z).unwrap();
        let xb = b.decode(&z).unwrap();
        g.check(
            &format!("decode/{size}"),
            &xa,
            &g.tensor(&format!("decode/{size}")),
            Tolerance::F32,
        );
        g.check(
            &format!("decode/{size} BFL vs diffusers layout"),
            &xb,
            &xa,
            Tolerance::EXACT,
        );
    }
}

#[test]
fn decode_bf16() {
    // diffusers runs the whole decode in bf16; so do we (GroupNorm statistics in f32 in both).
    // Bound: cosine ≥ 0.999 and max-abs ≤ 0.15 on outputs of magnitude up to ~2 (bf16 ulp there
    // is 0.0078; measured: cosine 0.99985, max-abs 0.086 after ~30 bf16 layers).
    let g = golden();
    let (a, _) = models(DType::BF16);
    let x = a
        .decode(&g.tensor("input/latent_8").to_dtype(DType::BF16).unwrap())
        .unwrap();
    g.check(
        "decode/8/bf16",
        &x,
        &g.tensor("decode/8/bf16"),
        Tolerance::new(0.15, 0.0).with_min_cosine(0.999),
    );
}

#[test]
fn blocks() {
    let g = golden();
    let (a, _) = models(DType::F32);
    let enc = a.encoder();
    let case = |name: &str, out: Tensor| {
        g.check(
            &format!("block/{name}/out"),
            &out,
            &g.tensor(&format!("block/{name}/out")),
            Tolerance::F32,
        )
    };
    let input = |name: &str| g.tensor(&format!("block/{name}/in"));
    case(
        "resnet_shortcut",
        enc.block(1, 0)
            .unwrap()
            .forward(&input("resnet_shortcut"))
            .unwrap(),
    );
    case(
        "resnet_plain",
        enc.block(1, 1)
            .unwrap()
            .forward(&input("resnet_plain"))
            .unwrap(),
    );
    case(
        "mid_attention",
        enc.mid_attention()
            .forward(&input("mid_attention"))
            .unwrap(),
    );
    case(
        "downsample",
        enc.downsample(0)
            .unwrap()
            .forward(&input("downsample"))
            .unwrap(),
    );
    // diffusers up_blocks[0] is BFL decoder.up.3
    case(
        "upsample",
        a.decoder()
            .upsample(3)
            .unwrap()
            .forward(&input("upsample"))
            .unwrap(),
    );
}
