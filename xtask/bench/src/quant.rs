//! The quantized side of the bench: the per-type matmul table (our decode + f32 GEMM against
//! candle's `QMatMul`), full-size random-block GGUF files with the real checkpoints' names,
//! shapes and types, and loading/running them with peak memory.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::quantized::{QMatMul, QStorage, QTensor};
use candle::{DType, Device, Module, Tensor};
use flux_dit::{bfl_tensor_shapes, img_ids, txt_ids, Config, DitInput, Flux, FluxOptions};
use flux_kernels::gguf::{StreamWriter, TensorSpec, Value};
use flux_kernels::{Encoding, Linear, LinearWeight, PackedWeight, QuantType};

use crate::{peak_rss, random};

/// A fast deterministic byte stream (xorshift64*).
struct Bytes(u64);

impl Bytes {
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545F4914F6CDD1D).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Byte offsets of the f16 scale fields in a block (`d`, and `dmin`/`m` where there is one).
fn scale_fields(ty: QuantType) -> &'static [usize] {
    match ty {
        QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => &[0],
        QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4_K | QuantType::Q5_K => &[0, 2],
        QuantType::Q2_K => &[80, 82],
        QuantType::Q3_K => &[108],
        QuantType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random block bytes of `ty` for `elems` values with every scale set to `scale` (finite, so
/// the decoded weights are finite and small).
fn random_blocks(ty: QuantType, elems: usize, scale: f32, rng: &mut Bytes) -> Vec<u8> {
    let n = elems / ty.block_elems();
    let mut b = vec![0u8; n * ty.block_bytes()];
    if !ty.is_quantized() {
        let v: Vec<f32> = (0..elems)
            .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) * 2e-5)
            .collect();
        return flux_kernels::quantize(ty, &v, elems).unwrap_or(b);
    }
    rng.fill(&mut b);
    let s = half::f16::from_f32(scale).to_bits().to_le_bytes();
    for blk in b.chunks_mut(ty.block_bytes()) {
        for &o in scale_fields(ty) {
            blk[o..o + 2].copy_from_slice(&s);
        }
    }
    b
}

fn ones_or_zeros(name: &str, elems: usize) -> Vec<u8> {
    let v = if name.ends_with(".scale") || name.contains("norm") {
        1f32
    } else {
        0.0
    };
    (0..elems).flat_map(|_| v.to_le_bytes()).collect()
}

/// Writes a GGUF of `specs` with random blocks (1-D tensors: norms 1, biases 0).
fn write_random_gguf(
    path: &Path,
    meta: &[(&str, Value)],
    specs: Vec<TensorSpec>,
    seed: u64,
) -> Result<()> {
    let mut rng = Bytes(seed | 1);
    let mut w = StreamWriter::create(path, meta, specs.clone())?;
    for s in &specs {
        let elems: usize = s.shape.iter().product();
        let data = if s.shape.len() == 1 {
            ones_or_zeros(&s.name, elems)
        } else {
            random_blocks(s.ty, elems, 1e-3, &mut rng)
        };
        w.push(&data)?;
    }
    w.finish()?;
    Ok(())
}

/// The full-size files: FLUX.1-schnell in Q8_0 and Q4_K with city96's names and per-tensor
/// types (blocks quantized, the 8 embedder/last-layer weights BF16, 1-D F32), and T5-XXL
/// Q8_0 in llama.cpp's names (norms F32, the position bias F16). Existing files are kept.
pub fn write_fullsize(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = Config::schnell();
    for ty in [QuantType::Q8_0, QuantType::Q4_K] {
        let path = dir.join(format!("flux1-schnell-{}.gguf", ty.name()));
        if path.exists() {
            continue;
        }
        let specs = bfl_tensor_shapes(&cfg)
            .into_iter()
            .map(|(name, shape)| {
                let t = flux_dit::gguf_type_for(
                    &name,
                    &shape,
                    Some(flux_kernels::StoredType::Gguf(QuantType::BF16)),
                    ty,
                );
                TensorSpec { name, ty: t, shape }
            })
            .collect();
        let meta = [
            ("general.architecture", Value::Str("flux".into())),
            ("general.quantization_version", Value::U64(2)),
            (
                "general.file_type",
                Value::U64(flux_dit::llama_file_type(ty) as u64),
            ),
        ];
        eprintln!("writing {}", path.display());
        write_random_gguf(&path, &meta, specs, 7)?;
    }
    let t5 = dir.join("t5xxl-Q8_0.gguf");
    if !t5.exists() {
        let cfg = flux_text::T5Config::v1_1_xxl();
        let specs = cfg
            .tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let llama = flux_text::llama_t5_name(&name).unwrap_or(name);
                let ty = if shape.len() == 1 {
                    QuantType::F32
                } else if llama.ends_with("attn_rel_b.weight") {
                    QuantType::F16
                } else {
                    QuantType::Q8_0
                };
                TensorSpec {
                    name: llama,
                    ty,
                    shape,
                }
            })
            .collect();
        let meta = [
            ("general.architecture", Value::Str("t5encoder".into())),
            ("t5encoder.block_count", Value::U64(24)),
            ("t5encoder.embedding_length", Value::U64(4096)),
        ];
        eprintln!("writing {}", t5.display());
        write_random_gguf(&t5, &meta, specs, 9)?;
    }
    // CLIP-L (f16, transformers names) and the autoencoder (f32, BFL names): random dense
    let clip = dir.join("clip_l.safetensors");
    if !clip.exists() {
        let mut m = HashMap::new();
        for (i, (name, shape)) in flux_text::ClipConfig::vit_l_14()
            .tensor_shapes("text_model.")
            .into_iter()
            .enumerate()
        {
            let t = if name.contains("norm") && name.ends_with("weight") {
                Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
            } else {
                random(100 + i as u64, &shape, 0.02)?
            };
            m.insert(name, t.to_dtype(DType::F16)?);
        }
        candle::safetensors::save(&m, &clip)?;
    }
    let ae = dir.join("ae.safetensors");
    if !ae.exists() {
        let mut m = HashMap::new();
        for (i, (name, shape)) in flux_vae::bfl_tensor_shapes(&flux_vae::Config::flux())
            .into_iter()
            .enumerate()
        {
            let t = if name.contains("norm") && name.ends_with("weight") {
                Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu)?
            } else {
                random(200 + i as u64, &shape, 0.02)?
            };
            m.insert(name, t);
        }
        candle::safetensors::save(&m, &ae)?;
    }
    Ok(())
}

/// Loads a full-size transformer file (config detected) and runs one forward at `res`² with
/// 256 text tokens; prints one JSON line (load and forward seconds, peak RSS, file size).
pub fn run_fullsize_dit(file: &Path, res: usize) -> Result<()> {
    let t0 = Instant::now();
    let model = Flux::from_file(file, DType::F32, &Device::Cpu, FluxOptions::default())?;
    let load = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let (h, w) = (res / 16, res / 16);
    let img = random(1, &[1, h * w, cfg.in_channels], 1.0)?;
    let txt = random(2, &[1, 256, cfg.context_in_dim], 1.0)?;
    let y = random(3, &[1, cfg.vec_in_dim], 1.0)?;
    let guidance = Tensor::new(&[3.5f32], &Device::Cpu)?;
    let (iids, tids) = (
        img_ids(1, 2 * h, 2 * w, 0.0, &Device::Cpu)?,
        txt_ids(1, 256, &Device::Cpu)?,
    );
    let timesteps = Tensor::new(&[1f32], &Device::Cpu)?;
    let input = DitInput {
        img: &img,
        img_ids: &iids,
        txt: &txt,
        txt_ids: &tids,
        timesteps: &timesteps,
        y: &y,
        guidance: cfg.guidance_embed.then_some(&guidance),
    };
    let t1 = Instant::now();
    let out = model.forward(&input)?;
    let fwd = t1.elapsed().as_secs_f64();
    let finite = out
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    println!(
        "{}",
        serde_json::json!({"variant": cfg.variant(), "load_secs": load, "forward_secs": fwd, "peak_rss": peak_rss(),
            "file_bytes": std::fs::metadata(file)?.len(), "finite": finite})
    );
    Ok(())
}

/// Loads a full-size T5 file (config detected) and encodes 256 tokens; prints one JSON line.
pub fn run_fullsize_t5(file: &Path) -> Result<()> {
    let t0 = Instant::now();
    let model = flux_text::T5Encoder::from_file(file, DType::F32, &Device::Cpu)?;
    let load = t0.elapsed().as_secs_f64();
    let ids: Vec<u32> = (0..256u32).map(|i| (i * 37 + 5) % 32000).collect();
    let ids = Tensor::from_vec(ids, (1, 256), &Device::Cpu)?;
    let t1 = Instant::now();
    let out = model.forward(&ids)?;
    let enc = t1.elapsed().as_secs_f64();
    if out.dims() != [1, 256, 4096] {
        bail!("T5 output {:?}", out.dims());
    }
    println!(
        "{}",
        serde_json::json!({"load_secs": load, "encode_secs": enc, "peak_rss": peak_rss(),
            "file_bytes": std::fs::metadata(file)?.len()})
    );
    Ok(())
}

/// The per-type matmul table at FLUX's shapes: for each (tokens, in → out) and type, our
/// packed `Linear` (parallel decode into f32 + gemm), candle's `QMatMul` (integer dot products
/// on quantized activations), and the dense f32 `Linear` for scale. Best of `iters`.
pub fn matmul_table(types: &[QuantType], rows: &[usize], iters: usize) -> Result<()> {
    let shapes = [
        (3072, 9216),
        (3072, 12288),
        (3072, 21504),
        (12288, 3072),
        (15360, 3072),
    ];
    println!(
        "type   tokens  in→out         f32 dense  ours (decode+gemm)  candle QMatMul  decode alone"
    );
    for &m in rows {
        for &(k, n) in &shapes {
            let w = random(11, &[n, k], 0.02)?;
            let x = random(12, &[m, k], 1.0)?;
            let best = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
                f()?;
                let mut b = f64::INFINITY;
                for _ in 0..iters {
                    let t = Instant::now();
                    f()?;
                    b = b.min(t.elapsed().as_secs_f64());
                }
                Ok(b)
            };
            let dense = Linear::new(w.clone(), None)?;
            let t_dense = best(&|| Ok(dense.forward(&x)?))?;
            let wv = w.flatten_all()?.to_vec1::<f32>()?;
            for &ty in types {
                let p = PackedWeight::encode(Encoding::Gguf(ty), &wv, n, k)?;
                let ours = Linear::from_weight(
                    LinearWeight::Packed(p.clone()),
                    None,
                    &Device::Cpu,
                    DType::F32,
                )?;
                let t_ours = best(&|| Ok(ours.forward(&x)?))?;
                let q = QTensor::new(
                    QStorage::from_data(
                        std::borrow::Cow::Borrowed(p.bytes()),
                        &Device::Cpu,
                        ty.to_candle(),
                    )?,
                    (n, k),
                )?;
                let qmm = QMatMul::from_qtensor(q)?;
                let t_q = best(&|| Ok(qmm.forward(&x)?))?;
                let mut scratch = vec![0f32; n * k];
                let t0 = Instant::now();
                p.dequantize_into(&mut scratch)?;
                let t_dec = t0.elapsed().as_secs_f64();
                println!(
                    "{:<6} {m:>6}  {k:>5}→{n:<6}   {t_dense:>8.3} s  {t_ours:>8.3} s ({:>4.2}×)   {t_q:>8.3} s ({:>4.2}×)  {t_dec:>6.3} s",
                    ty.name(),
                    t_ours / t_dense,
                    t_q / t_dense,
                );
            }
        }
    }
    Ok(())
}

/// `flux-bench quantize DIR --to TYPE`: the bench's transformer as GGUF (city96's policy).
pub fn quantize_bench_weights(dir: &Path, ty: QuantType) -> Result<std::path::PathBuf> {
    let cfg = Config::from_diffusers_json(&std::fs::read_to_string(
        dir.join("transformer/config.json"),
    )?)?;
    let out = dir.join(format!("flux-{}.gguf", ty.name()));
    if !out.exists() {
        flux_dit::convert_to_gguf(
            &dir.join("flux.safetensors"),
            Some(&cfg),
            &out,
            ty,
            |_, _| {},
        )
        .context("converting the bench weights")?;
    }
    Ok(out)
}
