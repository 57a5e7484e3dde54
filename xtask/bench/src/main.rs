//! `flux-bench`, run by `cargo xtask bench`:
//!
//! - `flux-bench weights DIR --depth D --single S --hidden H --heads N --seed K --res R…` writes
//!   seeded random weights (std 0.02) of a full- or reduced-size FLUX transformer as a BFL file
//!   (`flux.safetensors`, for candle-transformers) and a diffusers folder (`transformer/`, for
//!   PyTorch), plus the inputs for each resolution (`inputs_R.safetensors`).
//! - `flux-bench run DIR --res R --iters N --out FILE [--lora FILE --lora-mode merge|runtime]`:
//!   loads our transformer from the BFL file (and applies the LoRA, timed; `merge-once`: not
//!   reversible), runs one warm-up and
//!   N timed forwards, writes the output, prints one JSON line.
//! - `flux-bench attn - --tokens L --heads H --dim D --iters N`: joint attention alone and a
//!   GEMM of the same token count, each in GFLOP/s (one JSON line).
//! - `flux-bench lora-file DIR --rank R`: writes a seeded kohya LoRA of rank R on every linear
//!   layer of the bench model (`lora_rR.safetensors`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::{DType, Device, Tensor};
use flux_dit::{
    bfl_tensor_shapes, diffusers_recipe, diffusers_tensor_shapes, img_ids, txt_ids, Config,
    DitInput, Flux, FluxOptions, Recipe,
};
use flux_sampler::{torch_randn, NoiseOptions};

mod quant;

/// Large activations are reused rather than returned to the system (see `ReuseAlloc`).
#[global_allocator]
static ALLOC: flux_kernels::ReuseAlloc = flux_kernels::ReuseAlloc::new();

/// Text tokens of every bench input (schnell's T5 length).
pub const TXT_LEN: usize = 256;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a value")),
        None => Ok(default),
    }
}

fn config(depth: usize, single: usize, hidden: usize, heads: usize) -> Result<Config> {
    let head = hidden / heads.max(1);
    // FLUX's axes are [16, 56, 56] for head dim 128; scale them for other widths.
    let a0 = (head / 8) & !1;
    let a1 = ((head - a0) / 2) & !1;
    let cfg = Config {
        depth,
        depth_single_blocks: single,
        hidden_size: hidden,
        num_heads: heads,
        axes_dim: vec![a0, a1, head - a0 - a1],
        ..Config::dev()
    };
    cfg.validate()?;
    Ok(cfg)
}

pub(crate) fn random(seed: u64, shape: &[usize], std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = torch_randn(seed, n, NoiseOptions::F32)
        .into_iter()
        .map(|x| x * std)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn write_weights(dir: &Path, cfg: &Config, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir.join("transformer"))?;
    let mut bfl = HashMap::new();
    for (i, (name, shape)) in bfl_tensor_shapes(cfg).into_iter().enumerate() {
        let t = if name.ends_with(".scale") {
            (random(seed + i as u64, &shape, 0.02)? + 1.0)?
        } else {
            random(seed + i as u64, &shape, 0.02)?
        };
        bfl.insert(name, t);
    }
    // the diffusers layout, by the loader's own key mapping
    let parts: HashMap<String, Vec<usize>> = diffusers_tensor_shapes(cfg).into_iter().collect();
    let mut dif = HashMap::new();
    for (name, t) in &bfl {
        match diffusers_recipe(name).with_context(|| format!("no mapping for {name}"))? {
            Recipe::Rename(k) => {
                dif.insert(k, t.clone());
            }
            Recipe::SwapHalves(k) => {
                let h = t.dim(0)? / 2;
                dif.insert(
                    k,
                    Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)?,
                );
            }
            Recipe::Concat(ks) => {
                let mut at = 0;
                for k in ks {
                    let rows = parts[&k][0];
                    dif.insert(k, t.narrow(0, at, rows)?.contiguous()?);
                    at += rows;
                }
            }
        }
    }
    candle::safetensors::save(&bfl, dir.join("flux.safetensors"))?;
    candle::safetensors::save(
        &dif,
        dir.join("transformer/diffusion_pytorch_model.safetensors"),
    )?;
    let json = serde_json::json!({
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim(), "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim, "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed, "axes_dims_rope": cfg.axes_dim,
    });
    std::fs::write(
        dir.join("transformer/config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

fn write_inputs(dir: &Path, cfg: &Config, res: usize, seed: u64) -> Result<()> {
    let (h, w) = (res / 8, res / 8);
    let l_img = (h / 2) * (w / 2);
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    t.insert(
        "img".to_string(),
        random(seed, &[1, l_img, cfg.in_channels], 1.0)?,
    );
    t.insert(
        "txt".to_string(),
        random(seed + 1, &[1, TXT_LEN, cfg.context_in_dim], 1.0)?,
    );
    t.insert(
        "y".to_string(),
        random(seed + 2, &[1, cfg.vec_in_dim], 1.0)?,
    );
    t.insert("img_ids".to_string(), img_ids(1, h, w, 0.0, &dev)?);
    t.insert("txt_ids".to_string(), txt_ids(1, TXT_LEN, &dev)?);
    t.insert("timesteps".to_string(), Tensor::new(&[0.5f32], &dev)?);
    t.insert("guidance".to_string(), Tensor::new(&[3.5f32], &dev)?);
    candle::safetensors::save(&t, dir.join(format!("inputs_{res}.safetensors")))?;
    Ok(())
}

pub(crate) fn peak_rss() -> u64 {
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

/// Times the forward at `res` (median of `iters`), on `batch` copies of the inputs in one batch
/// (2: true CFG's positive and negative rows in one pass).
fn run(
    dir: &Path,
    res: usize,
    iters: usize,
    out: &Path,
    file: &str,
    batch: usize,
    lora: Option<(&Path, (flux_dit::LoraMode, bool))>,
) -> Result<()> {
    let cfg = bench_config(dir)?;
    let start = Instant::now();
    let mut model = Flux::from_bfl_file(
        dir.join(file),
        &cfg,
        DType::F32,
        &Device::Cpu,
        FluxOptions::default(),
    )?;
    let load = start.elapsed().as_secs_f64();
    let mut lora_secs = 0.0;
    let mut set = flux_dit::LoraSet::new();
    let runtime = matches!(lora, Some((_, (flux_dit::LoraMode::Runtime, _))));
    if let Some((path, mode)) = lora {
        set.add(path, 1.0)?;
        let t = Instant::now();
        let (mode, reversible) = mode;
        model.apply_loras(
            &set,
            flux_dit::LoraOptions {
                mode,
                reversible,
                ..Default::default()
            },
        )?;
        lora_secs = t.elapsed().as_secs_f64();
    }
    let mut inp =
        candle::safetensors::load(dir.join(format!("inputs_{res}.safetensors")), &Device::Cpu)?;
    if batch > 1 {
        for t in inp.values_mut() {
            let mut reps = vec![1; t.rank()];
            reps[0] = batch;
            *t = t.repeat(reps.as_slice())?;
        }
    }
    let input = DitInput {
        img: &inp["img"],
        img_ids: &inp["img_ids"],
        txt: &inp["txt"],
        txt_ids: &inp["txt_ids"],
        timesteps: &inp["timesteps"],
        y: &inp["y"],
        guidance: Some(&inp["guidance"]),
    };
    let mut out_t = model.forward(&input)?; // warm-up
    let (mut times, mut plain) = (vec![], vec![]);
    for _ in 0..iters {
        let t = Instant::now();
        out_t = model.forward(&input)?;
        times.push(t.elapsed().as_secs_f64());
        if runtime {
            // a run-time LoRA comes off and back on in no time: the same model without it,
            // timed alternately in this process
            model.remove_loras()?;
            let t = Instant::now();
            model.forward(&input)?;
            plain.push(t.elapsed().as_secs_f64());
            model.apply_loras(
                &set,
                flux_dit::LoraOptions {
                    mode: flux_dit::LoraMode::Runtime,
                    ..Default::default()
                },
            )?;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (median, plain) = (median(&mut times), median(&mut plain));
    let mut o = HashMap::new();
    o.insert("out".to_string(), out_t);
    candle::safetensors::save(&o, out)?;
    println!(
        "{}",
        serde_json::json!({"secs": median, "all": times, "secs_without_lora": plain, "load_secs": load, "lora_secs": lora_secs, "peak_rss": peak_rss()})
    );
    Ok(())
}

fn bench_config(dir: &Path) -> Result<Config> {
    let cfg_text = std::fs::read_to_string(dir.join("transformer/config.json"))?;
    Ok(Config::from_diffusers_json(&cfg_text)?)
}

/// A kohya-layout LoRA of `rank` on every linear layer of the bench model (factors std 0.01,
/// alpha = rank), seeded.
fn write_lora(dir: &Path, rank: usize) -> Result<PathBuf> {
    let path = dir.join(format!("lora_r{rank}.safetensors"));
    if path.exists() {
        return Ok(path);
    }
    let cfg = bench_config(dir)?;
    let mut t = HashMap::new();
    for (i, (key, shape)) in bfl_tensor_shapes(&cfg).into_iter().enumerate() {
        let Some(stem) = key.strip_suffix(".weight").filter(|_| shape.len() == 2) else {
            continue;
        };
        let k = format!("lora_unet_{}", stem.replace('.', "_"));
        let seed = 7_000_000 + 2 * i as u64;
        t.insert(
            format!("{k}.lora_down.weight"),
            random(seed, &[rank, shape[1]], 0.01)?,
        );
        t.insert(
            format!("{k}.lora_up.weight"),
            random(seed + 1, &[shape[0], rank], 0.01)?,
        );
        t.insert(
            format!("{k}.alpha"),
            Tensor::new(rank as f32, &Device::Cpu)?,
        );
    }
    candle::safetensors::save(&t, &path)?;
    Ok(path)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--integer") {
        flux_kernels::set_quant_matmul(flux_kernels::QuantMatmul::Integer);
    }
    let (cmd, dir) = match (args.first(), args.get(1)) {
        (Some(c), Some(d)) => (c.as_str(), PathBuf::from(d)),
        _ => bail!("usage: flux-bench weights|run DIR [options]"),
    };
    match cmd {
        "weights" => {
            let cfg = config(
                arg(&args, "--depth", 1)?,
                arg(&args, "--single", 2)?,
                arg(&args, "--hidden", 3072)?,
                arg(&args, "--heads", 24)?,
            )?;
            let seed: u64 = arg(&args, "--seed", 0)?;
            if !dir.join("flux.safetensors").exists() {
                write_weights(&dir, &cfg, seed)?;
            }
            for r in args
                .iter()
                .skip_while(|a| *a != "--res")
                .skip(1)
                .take_while(|a| !a.starts_with("--"))
            {
                let res: usize = r.parse()?;
                if !res.is_multiple_of(16) {
                    bail!("--res {res} is not a multiple of 16");
                }
                write_inputs(&dir, &cfg, res, seed + 1_000_000)?;
            }
            Ok(())
        }
        "run" => run(
            &dir,
            arg(&args, "--res", 256)?,
            arg(&args, "--iters", 5)?,
            &PathBuf::from(arg::<String>(&args, "--out", "ours.safetensors".into())?),
            &arg::<String>(&args, "--file", "flux.safetensors".into())?,
            arg(&args, "--batch", 1)?,
            match arg::<String>(&args, "--lora", String::new())?.as_str() {
                "" => None,
                f => Some((
                    Path::new(f),
                    match arg::<String>(&args, "--lora-mode", "runtime".into())?.as_str() {
                        "merge" => (flux_dit::LoraMode::Merge, true),
                        "merge-once" => (flux_dit::LoraMode::Merge, false),
                        "runtime" => (flux_dit::LoraMode::Runtime, true),
                        m => bail!("--lora-mode {m}: merge, merge-once or runtime"),
                    },
                )),
            },
        ),
        "lora-file" => {
            println!("{}", write_lora(&dir, arg(&args, "--rank", 16)?)?.display());
            Ok(())
        }
        "quantize" => {
            let to: String = arg(&args, "--to", "q8_0".to_string())?;
            let ty = flux_kernels::QuantType::parse(&to)
                .with_context(|| format!("unknown type {to}"))?;
            println!("{}", quant::quantize_bench_weights(&dir, ty)?.display());
            Ok(())
        }
        "fullsize-write" => quant::write_fullsize(&dir),
        "fullsize-dit" => quant::run_fullsize_dit(&dir, arg(&args, "--res", 256)?),
        "fullsize-t5" => quant::run_fullsize_t5(&dir),
        "qmm" => {
            // flux-bench qmm - [--types q8_0,q4_k] [--rows 1280,4608] [--iters 3]
            let list = |name: &str, d: &str| -> Vec<String> {
                arg::<String>(&args, name, d.into())
                    .unwrap_or_default()
                    .split(',')
                    .map(String::from)
                    .collect()
            };
            let types = list("--types", "q8_0,q6_k,q5_k,q4_k,q4_0")
                .iter()
                .map(|t| {
                    flux_kernels::QuantType::parse(t).with_context(|| format!("unknown type {t}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let rows = list("--rows", "1280,4608")
                .iter()
                .map(|r| Ok(r.parse()?))
                .collect::<Result<Vec<usize>>>()?;
            quant::matmul_table(&types, &rows, arg(&args, "--iters", 3)?)
        }
        "compare" => {
            // flux-bench compare A B: max |a − b| / max |b| of the `out` tensors.
            let a = candle::safetensors::load(&dir, &Device::Cpu)?;
            let b = candle::safetensors::load(args.get(2).context("compare A B")?, &Device::Cpu)?;
            let (a, b) = (&a["out"], &b["out"]);
            if a.dims() != b.dims() {
                bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
            }
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            println!("{}", diff / scale.max(f32::MIN_POSITIVE));
            Ok(())
        }
        "attn" => {
            // flux-bench attn - [--tokens 4608] [--heads 24] [--dim 128] [--iters 3]: joint
            // attention alone and, in the same process, a GEMM of the same token count (the
            // projection after it), both in GFLOP/s; one JSON line
            let l: usize = arg(&args, "--tokens", 4608)?;
            let h: usize = arg(&args, "--heads", 24)?;
            let d: usize = arg(&args, "--dim", 128)?;
            let iters: usize = arg(&args, "--iters", 3)?;
            let (q, k, v) = (
                random(1, &[1, h, l, d], 1.0)?,
                random(2, &[1, h, l, d], 1.0)?,
                random(3, &[1, h, l, d], 1.0)?,
            );
            let x = random(4, &[l, h * d], 1.0)?;
            let w = random(5, &[h * d, h * d], 0.02)?.t()?;
            let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
                f()?;
                let mut t = vec![];
                for _ in 0..iters {
                    let s = Instant::now();
                    f()?;
                    t.push(s.elapsed().as_secs_f64());
                }
                t.sort_by(f64::total_cmp);
                Ok(t[t.len() / 2])
            };
            let attn = time(&|| {
                flux_kernels::attention_tokens(&q, &k, &v, Default::default())?;
                Ok(())
            })?;
            let gemm = time(&|| {
                x.matmul(&w)?;
                Ok(())
            })?;
            let attn_flop = 4.0 * (h * l * l * d) as f64;
            let gemm_flop = 2.0 * (l * h * d * h * d) as f64;
            println!(
                "{{\"attn_secs\": {attn}, \"attn_gflops\": {}, \"gemm_gflops\": {}}}",
                attn_flop / attn / 1e9,
                gemm_flop / gemm / 1e9
            );
            Ok(())
        }
        "mm" => {
            let m: usize = arg(&args, "--m", 512)?;
            let k: usize = arg(&args, "--k", 3072)?;
            let n: usize = arg(&args, "--n", 12288)?;
            let x = random(1, &[m, k], 1.0)?;
            let w = random(2, &[n, k], 0.02)?;
            let wt = w.t()?.contiguous()?;
            for (name, rhs) in [("w.t() view", w.t()?), ("pre-transposed", wt.clone())] {
                let _ = x.matmul(&rhs)?;
                let t = Instant::now();
                for _ in 0..5 {
                    let _ = x.matmul(&rhs)?;
                }
                let s = t.elapsed().as_secs_f64() / 5.0;
                println!(
                    "{name}: {:.3} s, {:.1} GFLOP/s",
                    s,
                    2.0 * (m * k * n) as f64 / s / 1e9
                );
            }
            Ok(())
        }
        other => bail!("unknown command {other}"),
    }
}
