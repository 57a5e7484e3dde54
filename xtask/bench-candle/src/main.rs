//! candle-transformers' FLUX as the peer of `cargo xtask bench`:
//! `flux-bench-candle DIR --res R --iters N --out FILE` loads `DIR/flux.safetensors` (BFL layout)
//! with `candle_transformers::models::flux`, runs one warm-up and N timed forwards on
//! `DIR/inputs_R.safetensors`, writes the output and prints one JSON line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle::{DType, Device};
use candle_transformers::models::flux::model::{Config, Flux};
use candle_transformers::models::flux::WithForward;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .context("usage: flux-bench-candle DIR --res R --iters N --out FILE")?,
    );
    let res: usize = arg(&args, "--res").unwrap_or("256".into()).parse()?;
    let iters: usize = arg(&args, "--iters").unwrap_or("5".into()).parse()?;
    let out = PathBuf::from(arg(&args, "--out").unwrap_or("candle.safetensors".into()));
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.join("transformer/config.json"),
    )?)?;
    let n = |k: &str| -> Result<usize> {
        c[k].as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("config.json: {k}"))
    };
    let cfg = Config {
        in_channels: n("in_channels")?,
        vec_in_dim: n("pooled_projection_dim")?,
        context_in_dim: n("joint_attention_dim")?,
        hidden_size: n("attention_head_dim")? * n("num_attention_heads")?,
        mlp_ratio: 4.0,
        num_heads: n("num_attention_heads")?,
        depth: n("num_layers")?,
        depth_single_blocks: n("num_single_layers")?,
        axes_dim: c["axes_dims_rope"]
            .as_array()
            .context("axes_dims_rope")?
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as usize)
            .collect(),
        theta: 10_000,
        qkv_bias: true,
        guidance_embed: true,
    };
    let dev = Device::Cpu;
    let start = Instant::now();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("flux.safetensors")],
            DType::F32,
            &dev,
        )?
    };
    let model = Flux::new(&cfg, vb)?;
    let load = start.elapsed().as_secs_f64();
    let t = candle::safetensors::load(dir.join(format!("inputs_{res}.safetensors")), &dev)?;
    let fwd = || {
        model.forward(
            &t["img"],
            &t["img_ids"],
            &t["txt"],
            &t["txt_ids"],
            &t["timesteps"],
            &t["y"],
            Some(&t["guidance"]),
        )
    };
    let mut o = fwd()?;
    let mut times = vec![];
    for _ in 0..iters {
        let s = Instant::now();
        o = fwd()?;
        times.push(s.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let mut m = HashMap::new();
    m.insert("out".to_string(), o);
    candle::safetensors::save(&m, &out)?;
    println!(
        "{{\"secs\": {}, \"load_secs\": {load}, \"peak_rss\": {}, \"all\": {:?}}}",
        times[times.len() / 2],
        peak_rss(),
        times
    );
    Ok(())
}
