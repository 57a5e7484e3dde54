//! Peak memory and time of a full-size FLUX autoencoder decode, untiled vs tiled, with random
//! weights (no download needed).
//!
//! `cargo run --release -p flux-vae --example vae_memory -- full 1024`
//! `cargo run --release -p flux-vae --example vae_memory -- tiled 1024`
//!
//! Run each mode in its own process: the peak (VmHWM) is per process. Linux only (reads
//! `/proc/self/status`).

use std::collections::HashMap;
use std::time::Instant;

use candle::{DType, Device, Tensor};
use flux_vae::{bfl_tensor_shapes, AutoEncoder, Config, TileOptions};

fn status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".into())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("tiled");
    let size: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let cfg = Config::flux();
    let dev = Device::Cpu;
    // Random weights with the real names and shapes, written once to a temporary file.
    let path = std::env::temp_dir().join("flux-vae-random-ae.safetensors");
    if !path.exists() {
        let mut t = HashMap::new();
        for (name, shape) in bfl_tensor_shapes(&cfg) {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let std = if shape.len() == 1 {
                0.05
            } else {
                1.0 / (fan_in as f64).sqrt()
            };
            let x = Tensor::randn(0f32, std as f32, shape.as_slice(), &dev)?;
            let x = if name.contains("norm") && name.ends_with("weight") {
                (x + 1.0)?
            } else {
                x
            };
            t.insert(name, x);
        }
        candle::safetensors::save(&t, &path)?;
    }
    let ae = AutoEncoder::from_bfl_file(&path, &cfg, DType::F32, &dev)?;
    println!("loaded: VmRSS {}", status("VmRSS:"));
    let latent = Tensor::randn(0f32, 1f32, (1, 16, size / 8, size / 8), &dev)?;
    let start = Instant::now();
    let out = match mode {
        "full" => ae.decode(&latent)?,
        _ => ae.decode_tiled(&latent, TileOptions::default())?,
    };
    println!(
        "{mode} decode {size}x{size}: {:.1} s, output {:?}, peak VmHWM {}",
        start.elapsed().as_secs_f64(),
        out.dims(),
        status("VmHWM:")
    );
    Ok(())
}
