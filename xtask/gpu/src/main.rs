//! `flux-gpu-check`: the CUDA path checked and timed on a GPU machine, from the repository root.
//!
//! ```text
//! flux-gpu-check [all|smoke|ops|goldens|attn|gemm|dit|profile]...
//! ```
//! The parts run in the order given (`all`: ops, goldens, attn, gemm, dit); a part that stops
//! with an error is a failed row and the next one still runs.
//! - `smoke` (not in `all`): the default attention kernel (the Hopper kernel on an H100/H200)
//!   once on a small and a FLUX-sized case; `run.sh` runs it alone first, under a time limit;
//! - `ops`: every CUDA op against its CPU twin on fresh random inputs of several shapes (FLUX's
//!   B=1, H=24, L=4608/4352, D=128, odd lengths, strided views), relative error
//!   ‖gpu − cpu‖/‖cpu‖ against the bound for the dtype;
//!   fp8 GEMMs: the activations' rounding and the weight's device encoding bit for bit
//!   against the CPU's, fp8 layers against the CPU's emulation (and that cuBLASLt's fp8 ran);
//! - `goldens`: the tiny flux-dit, flux-vae and pipeline goldens on CUDA, f32 and bf16; the
//!   dit golden with fp8 GEMMs against the reference (quality) and the CPU's emulation;
//! - `attn`: our attention kernels (the Hopper kernel with and without ping-pong, the mma.sync
//!   kernel) vs the composite matmul+softmax path, B=1, H=24, D=128, L from 1024 to 16384
//!   (TFLOP/s);
//! - `gemm`: every GEMM shape of a FLUX.1-dev step: fp8 (quantization + cuBLASLt fp8), bf16
//!   cuBLASLt with bias/GELU epilogues, cuBLAS plus separate passes (TFLOP/s, sum per step);
//! - `profile` (not in `all`): the DiT's ops one by one at the 1024² shapes, to see where a
//!   step's time goes;
//! - `dit`: one full-width DiT step (19 + 38 blocks, bf16, 1024² + 512 text tokens, random
//!   weights made on the device) with our kernels, with the composite attention, with
//!   fp8 GEMMs (their cosine and max error against the bf16 step), and with GGUF Q8_0 and
//!   Q4_K transformers (against the same weights decoded once).
//!
//! Prints a table last; exits non-zero if a check failed. Timings: CUDA events around batches
//! of calls (warm-up first), median over batches.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, D};
use flux_golden::{compare, Golden, Tolerance};
use flux_kernels as fk;

/// One line of the summary table.
struct Row {
    what: String,
    value: String,
    ok: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn check(&mut self, what: String, value: String, ok: bool) {
        println!("{} {what}: {value}", if ok { "PASS" } else { "FAIL" });
        self.rows.push(Row {
            what,
            value,
            ok: Some(ok),
        });
    }
    fn info(&mut self, what: String, value: String) {
        println!("     {what}: {value}");
        self.rows.push(Row {
            what,
            value,
            ok: None,
        });
    }
    fn failed(&self) -> usize {
        self.rows.iter().filter(|r| r.ok == Some(false)).count()
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parts: Vec<&str> = if args.is_empty() {
        vec!["all"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    if !cfg!(feature = "cuda") {
        bail!("flux-gpu-check was built without `--features cuda`; build it with `cargo xtask gpu build`");
    }
    let dev = Device::new_cuda(0)?;
    let mut r = Report::default();
    let t0 = Instant::now();
    // the parts in the order given (`all`: the usual order); a part that stops with an error
    // is a failed row, and the next part still runs
    let mut order = vec![];
    const PARTS: [&str; 7] = ["smoke", "ops", "goldens", "attn", "gemm", "dit", "profile"];
    for p in parts {
        match p {
            "all" => order.extend(["ops", "goldens", "attn", "gemm", "dit"]),
            p if PARTS.contains(&p) => order.push(p),
            other => bail!("unknown part {other:?} (all|{})", PARTS.join("|")),
        }
    }
    for part in order {
        let ran = match part {
            "smoke" => smoke(&dev, &mut r),
            "ops" => ops(&dev, &mut r),
            "goldens" => goldens(&dev, &mut r),
            "attn" => bench_attention(&dev, &mut r),
            "gemm" => bench_gemm(&dev, &mut r),
            "dit" => bench_dit(&dev, &mut r),
            _ => profile(&dev, &mut r),
        };
        if let Err(e) = ran {
            r.check(format!("part {part}"), format!("stopped: {e:#}"), false);
            // leave the defaults selected for the next part
            let _ = select_default(&dev);
            fk::set_cuda_linear(fk::CudaLinear::CublasLt);
        }
        println!("     (after {part}: {:.0} s)", t0.elapsed().as_secs_f64());
    }
    println!(
        "\n=== flux-gpu-check summary ({:.0} s) ===",
        t0.elapsed().as_secs_f64()
    );
    let w = r.rows.iter().map(|x| x.what.len()).max().unwrap_or(10);
    for row in &r.rows {
        let tag = match row.ok {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "    ",
        };
        println!("{tag} {:w$}  {}", row.what, row.value);
    }
    let failed = r.failed();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// ‖a − b‖ / ‖b‖ (flux-golden's comparison, in f64), and whether every difference is finite.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<(f64, bool)> {
    let c = compare(
        &a.to_device(&Device::Cpu)?,
        &b.to_device(&Device::Cpu)?,
        Tolerance::new(f64::INFINITY, 0.0),
    )
    .map_err(anyhow::Error::msg)?;
    Ok((c.rel_l2, c.rel_l2.is_finite()))
}

/// The bound on relative error for results in `dtype` (METHOD: f32 far under 1e-3, bf16
/// operands up to 1e-2).
fn bound(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        _ => 1e-2,
    }
}

/// Random normal tensor made on the CPU in f32, rounded to `dtype` (both paths see the same values).
fn randn(shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "?",
    }
}

/// The default attention kernel once on a small and a FLUX-sized case against the CPU: run
/// alone first by `run.sh`, under a time limit, so that a kernel that hangs or faults cannot take
/// the rest of the device check with it.
fn smoke(dev: &Device, r: &mut Report) -> Result<()> {
    println!(
        "== smoke: the default attention kernel ({})",
        kernels(dev, 128)[0].label()
    );
    r.info(
        "device".into(),
        format!(
            "Hopper kernel {}",
            if hopper(dev) {
                "in use"
            } else {
                "not in use (not a 9.x device, not built, or FLUX_CUDA_ATTENTION=mma.sync)"
            }
        ),
    );
    for (b, h, lq, lk) in [(1usize, 2usize, 300usize, 200usize), (1, 24, 4608, 4608)] {
        let q = randn(&[b, h, lq, 128], DType::BF16)?;
        let k = randn(&[b, h, lk, 128], DType::BF16)?;
        let v = randn(&[b, h, lk, 128], DType::BF16)?;
        let hn = h.min(2);
        let f = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, 0, hn)?.to_dtype(DType::F32)?) };
        let cpu = fk::attention_composite(&f(&q)?, &f(&k)?, &f(&v)?, Default::default())?;
        let kern = kernels(dev, 128)[0];
        kern.select()?;
        let gpu = fk::attention(
            &q.to_device(dev)?,
            &k.to_device(dev)?,
            &v.to_device(dev)?,
            Default::default(),
        )?;
        dev.synchronize()?;
        let ran = kern.ran();
        let (e, finite) = rel_err(&gpu.narrow(1, 0, hn)?, &cpu)?;
        r.check(
            format!(
                "smoke attention bf16 B{b} H{h} Lq{lq} Lk{lk} D128 ({})",
                kern.label()
            ),
            format!(
                "rel err {e:.2e}{}",
                if ran { "" } else { ", another kernel ran" }
            ),
            finite && e < bound(DType::BF16) && ran,
        );
    }
    Ok(())
}

fn ops(dev: &Device, r: &mut Report) -> Result<()> {
    println!("== CUDA ops vs their CPU twins");
    // attention: (B, H, Lq, Lk, D); the big FLUX shapes compare 4 heads to keep the CPU side short
    let shapes: [(usize, usize, usize, usize, usize); 12] = [
        (1, 24, 4608, 4608, 128),
        (1, 24, 4352, 4352, 128),
        (2, 4, 4608, 4608, 128),
        (1, 3, 1000, 1000, 128),
        (2, 3, 77, 77, 128),
        (1, 2, 129, 255, 128),
        (1, 2, 300, 64, 128),
        (1, 1, 1, 1, 128),
        (2, 4, 77, 77, 64),
        (1, 2, 33, 200, 32),
        (2, 2, 130, 7, 128),
        (1, 1, 1, 1, 64),
    ];
    for dtype in [DType::BF16, DType::F16] {
        for &(b, h, lq, lk, d) in &shapes {
            let q = randn(&[b, h, lq, d], dtype)?;
            let k = randn(&[b, h, lk, d], dtype)?;
            let v = randn(&[b, h, lk, d], dtype)?;
            let (hs, hn) = if h > 4 { (h - 4, 4) } else { (0, h) };
            let f =
                |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, hs, hn)?.to_dtype(DType::F32)?) };
            let cpu = fk::attention_composite(&f(&q)?, &f(&k)?, &f(&v)?, Default::default())?;
            let (qg, kg, vg) = (q.to_device(dev)?, k.to_device(dev)?, v.to_device(dev)?);
            for kern in kernels(dev, d) {
                kern.select()?;
                let gpu = fk::attention(&qg, &kg, &vg, Default::default())?;
                let ran = kern.ran();
                let (e, finite) = rel_err(&gpu.narrow(1, hs, hn)?, &cpu)?;
                r.check(
                    format!(
                        "attention {} B{b} H{h} Lq{lq} Lk{lk} D{d} ({})",
                        name(dtype),
                        kern.label()
                    ),
                    format!(
                        "rel err {e:.2e} (bound {:.0e}){}",
                        bound(dtype),
                        if ran { "" } else { ", another kernel ran" }
                    ),
                    finite && e < bound(dtype) && ran,
                );
            }
            select_default(dev)?;
        }
    }
    // token-major output, from strided q/k/v (views of one qkv projection, as the DiT passes
    // them) and from contiguous (B, H, L, D) inputs
    for (b, l, h, d) in [
        (2usize, 300usize, 4usize, 128usize),
        (1, 4608, 3, 128),
        (1, 77, 2, 64),
    ] {
        let qkv = randn(&[b, l, 3 * h, d], DType::BF16)?;
        let part = |t: &Tensor, i: usize| -> Result<Tensor> {
            Ok(t.narrow(2, i * h, h)?.transpose(1, 2)?)
        };
        let c = qkv.to_dtype(DType::F32)?;
        let cpu = fk::attention_tokens(
            &part(&c, 0)?,
            &part(&c, 1)?,
            &part(&c, 2)?,
            Default::default(),
        )?;
        let g = qkv.to_device(dev)?;
        for kern in kernels(dev, d) {
            kern.select()?;
            for contiguous in [false, true] {
                let view = |i: usize| -> Result<Tensor> {
                    let t = part(&g, i)?;
                    Ok(if contiguous { t.contiguous()? } else { t })
                };
                let gpu =
                    fk::attention_tokens(&view(0)?, &view(1)?, &view(2)?, Default::default())?;
                let ran = kern.ran();
                let (e, finite) = rel_err(&gpu, &cpu)?;
                r.check(
                    format!(
                        "attention_tokens bf16 B{b} L{l} H{h} D{d} {} → (B, L, H·D) ({})",
                        if contiguous {
                            "contiguous (B, H, L, D)"
                        } else {
                            "strided qkv views"
                        },
                        kern.label()
                    ),
                    format!(
                        "rel err {e:.2e}{}",
                        if ran { "" } else { ", another kernel ran" }
                    ),
                    finite && e < bound(DType::BF16) && gpu.dims() == [b, l, h * d] && ran,
                );
            }
        }
        select_default(dev)?;
    }
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Linear (cuBLAS product + our bias kernel, vector and scalar paths)
        for &(rows, inp, out) in &[(4608usize, 3072usize, 512usize), (77, 40, 37), (5, 16, 24)] {
            let w = (randn(&[out, inp], dtype)? * 0.05)?;
            let bias = randn(&[out], dtype)?;
            let x = randn(&[rows, inp], dtype)?;
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let xg = x.to_device(dev)?;
            for with_bias in [true, false] {
                let b = with_bias.then_some(&bias);
                let lin =
                    fk::Linear::new(w.to_device(dev)?, b.map(|b| b.to_device(dev)).transpose()?)?;
                let cpu_lin = fk::Linear::new(f(&w)?, b.map(f).transpose()?)?;
                let cpu = cpu_lin.forward(&f(&x)?)?;
                let cpu_gelu = cpu_lin.forward_gelu(&f(&x)?)?;
                for mode in [
                    fk::CudaLinear::CublasLt,
                    fk::CudaLinear::CublasLtTuned,
                    fk::CudaLinear::Cublas,
                ] {
                    fk::set_cuda_linear(mode);
                    let what = format!(
                        "Linear {} rows{rows} {inp}→{out}{} ({mode:?})",
                        name(dtype),
                        if with_bias { "" } else { " no bias" }
                    );
                    let (e, finite) = rel_err(&lin.forward(&xg)?, &cpu)?;
                    r.check(
                        what.clone(),
                        format!("rel err {e:.2e}"),
                        finite && e < bound(dtype),
                    );
                    let (e, finite) = rel_err(&lin.forward_gelu(&xg)?, &cpu_gelu)?;
                    r.check(
                        format!("{what} + GELU-tanh"),
                        format!("rel err {e:.2e}"),
                        finite && e < bound(dtype),
                    );
                }
                fk::set_cuda_linear(fk::CudaLinear::CublasLt);
            }
        }
        // QK-norm + RoPE, from a strided qkv view, tables of random angles
        for &(b, h, l, d) in &[
            (1usize, 24usize, 4608usize, 128usize),
            (2, 3, 77, 64),
            (1, 2, 33, 8),
        ] {
            let qkv = randn(&[b, l, 3 * h, d], dtype)?;
            let x = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, h, h)?.transpose(1, 2)?) };
            let scale = (randn(&[d], dtype)? * 0.5)?;
            let ang =
                (Tensor::rand(0f32, 6.3, (1, 1, l, d / 2), &Device::Cpu)?).to_dtype(DType::F32)?;
            let pe = fk::RopeTable {
                cos: ang.cos()?,
                sin: ang.sin()?,
            };
            let pe_g = fk::RopeTable {
                cos: pe.cos.to_device(dev)?,
                sin: pe.sin.to_device(dev)?,
            };
            let gpu = fk::qk_norm_rope(
                &x(&qkv.to_device(dev)?)?,
                &scale.to_device(dev)?,
                1e-6,
                &pe_g,
            )?;
            let cpu = fk::qk_norm_rope(&x(&qkv)?, &scale, 1e-6, &pe)?;
            let (e, finite) = rel_err(&gpu, &cpu)?;
            r.check(
                format!("qk_norm_rope {} B{b} H{h} L{l} D{d} (strided)", name(dtype)),
                format!("rel err {e:.2e}"),
                finite && e < bound(dtype),
            );
        }
        // LayerNorm + modulate and gated residual, modulation chunks as strided views
        for &(b, l, c) in &[(1usize, 4608usize, 3072usize), (2, 77, 96), (1, 5, 40)] {
            let x = randn(&[b, l, c], dtype)?;
            let y = randn(&[b, l, c], dtype)?;
            let m = (randn(&[b, 1, 3 * c], dtype)? * 0.5)?;
            let chunk =
                |t: &Tensor, i: usize| -> Result<Tensor> { Ok(t.narrow(D::Minus1, i * c, c)?) };
            let (xg, yg, mg) = (x.to_device(dev)?, y.to_device(dev)?, m.to_device(dev)?);
            let gpu = fk::layer_norm_modulate(&xg, &chunk(&mg, 0)?, &chunk(&mg, 1)?, 1e-6)?;
            let cpu = fk::layer_norm_modulate(&x, &chunk(&m, 0)?, &chunk(&m, 1)?, 1e-6)?;
            let (e, finite) = rel_err(&gpu, &cpu)?;
            r.check(
                format!("layer_norm_modulate {} B{b} L{l} C{c}", name(dtype)),
                format!("rel err {e:.2e}"),
                finite && e < bound(dtype),
            );
            let gpu = fk::gelu_tanh(&(&xg * 3.0)?)?;
            let cpu = fk::gelu_tanh(&(&x * 3.0)?)?;
            let (e, finite) = rel_err(&gpu, &cpu)?;
            r.check(
                format!("gelu_tanh {} B{b} L{l} C{c}", name(dtype)),
                format!("rel err {e:.2e}"),
                finite && e < bound(dtype),
            );
            // [a, gelu(m)] with m a strided view, as the single block passes it
            let h = randn(&[b, l, 2 * c], dtype)?;
            let hg = h.to_device(dev)?;
            let gpu = fk::cat_gelu_tanh(&xg, &hg.narrow(D::Minus1, c, c)?)?;
            let cpu = fk::cat_gelu_tanh(&x, &h.narrow(D::Minus1, c, c)?)?;
            let (e, finite) = rel_err(&gpu, &cpu)?;
            r.check(
                format!(
                    "cat_gelu_tanh {} B{b} L{l} C{c}+{c} (strided m)",
                    name(dtype)
                ),
                format!("rel err {e:.2e}"),
                finite && e < bound(dtype),
            );
            let gpu = fk::gated_residual(&xg, &chunk(&mg, 2)?, &yg)?;
            let cpu = fk::gated_residual(&x, &chunk(&m, 2)?, &y)?;
            let (e, finite) = rel_err(&gpu, &cpu)?;
            r.check(
                format!("gated_residual {} B{b} L{l} C{c}", name(dtype)),
                format!("rel err {e:.2e}"),
                finite && e < bound(dtype),
            );
        }
    }
    ops_fp8(dev, r)
}

/// The fp8 GEMM path against its CPU twin: the activations' rounding (bit for bit), the
/// weight's encoding on the device (bit for bit with the host's), and fp8 layers (cuBLASLt fp8
/// with fast accumulation) against the CPU's emulation, with a proof that cuBLASLt's fp8 path
/// ran where it should.
fn ops_fp8(dev: &Device, r: &mut Report) -> Result<()> {
    use fk::{Linear, LinearWeight};
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for n in [1usize, 1000, 4608 * 3072] {
            let x = (randn(&[n], dtype)? * 3.0)?;
            let gpu = fk::fp8_round_tensor(&x.to_device(dev)?)?;
            let cpu = fk::fp8_round_tensor(&x)?;
            let d = (gpu.to_device(&Device::Cpu)?.to_dtype(DType::F32)?
                - cpu.to_dtype(DType::F32)?)?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()?;
            r.check(
                format!("fp8 rounding {} n={n}", name(dtype)),
                format!("max |gpu − cpu| {d:e}"),
                d == 0.0,
            );
        }
    }
    let zeros = Tensor::zeros(777, DType::BF16, dev)?;
    let z = fk::fp8_round_tensor(&zeros)?
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    r.check("fp8 rounding of zeros".into(), format!("sum {z}"), z == 0.0);
    // packed weights decoded by our CUDA kernels equal the host's decoding bit for bit
    {
        let v = (randn(&[256, 3072], DType::F32)? * 0.05)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let fp8 = |k| fk::Encoding::Fp8(k);
        let mut packed = vec![];
        for ty in [
            fk::QuantType::Q8_0,
            fk::QuantType::Q4_K,
            fk::QuantType::Q6_K,
        ] {
            packed.push(fk::PackedWeight::quantize(ty, &v, 256, 3072)?);
        }
        packed.push(fk::PackedWeight::encode(
            fp8(fk::Fp8Kind::E4M3),
            &v,
            256,
            3072,
        )?);
        let e5 = fk::PackedWeight::encode(fp8(fk::Fp8Kind::E5M2), &v, 256, 3072)?;
        let rows: Vec<f32> = (0..256).map(|i| 0.5 + i as f32 / 256.0).collect();
        packed.push(fk::PackedWeight::new(
            e5.encoding(),
            e5.bytes().to_vec(),
            256,
            3072,
            rows,
        )?);
        for p in packed {
            let want = p.dequantize()?;
            for dtype in [DType::F32, DType::BF16] {
                let lin = Linear::from_weight(LinearWeight::Packed(p.clone()), None, dev, dtype)?;
                let got = lin
                    .weight()?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let want = Tensor::from_slice(&want, want.len(), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                let same = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() == b.to_bits())
                    .count();
                r.check(
                    format!(
                        "decode {} ({} scales) on CUDA → {} vs the CPU",
                        p.encoding(),
                        p.scale().len(),
                        name(dtype)
                    ),
                    format!(
                        "{same} of {} values bit-equal ({})",
                        want.len(),
                        lin.encoding()
                    ),
                    same == want.len(),
                );
            }
        }
    }
    // the weight encoded on the device equals the host's encoding
    let w = (randn(&[512, 3072], DType::F32)? * 0.05)?;
    let on_gpu = Linear::from_weight_fp8(
        LinearWeight::Dense(w.to_device(dev)?),
        None,
        dev,
        DType::F32,
    )?;
    let on_cpu = Linear::from_weight_fp8(
        LinearWeight::Dense(w.clone()),
        None,
        &Device::Cpu,
        DType::F32,
    )?;
    let d = (on_gpu.weight()?.to_device(&Device::Cpu)? - on_cpu.weight()?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    r.check(
        "fp8 weight encoded on the device vs the host (512×3072)".into(),
        format!("max diff {d:e}"),
        d == 0.0 && on_gpu.is_fp8_gemm() && on_cpu.is_fp8_gemm(),
    );
    for dtype in [DType::BF16, DType::F16] {
        for &(rows, inp, out, must) in &[
            (4608usize, 3072usize, 512usize, true),
            (512, 3072, 1024, true),
            (77, 64, 96, false),
            (1, 3072, 2048, false),
            (5, 16, 24, false),
        ] {
            let w = (randn(&[out, inp], dtype)? * 0.05)?;
            let bias = randn(&[out], dtype)?;
            let x = randn(&[rows, inp], dtype)?;
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let xg = x.to_device(dev)?;
            for with_bias in [true, false] {
                let b = with_bias.then_some(&bias);
                let lin = Linear::from_weight_fp8(
                    LinearWeight::Dense(w.to_device(dev)?),
                    b.map(|b| b.to_device(dev)).transpose()?,
                    dev,
                    dtype,
                )?;
                let cpu_lin = Linear::from_weight_fp8(
                    LinearWeight::Dense(f(&w)?),
                    b.map(f).transpose()?,
                    &Device::Cpu,
                    DType::F32,
                )?;
                let cpu = cpu_lin.forward(&f(&x)?)?;
                let cpu_gelu = cpu_lin.forward_gelu(&f(&x)?)?;
                let what = format!(
                    "fp8 Linear {} rows{rows} {inp}→{out}{}",
                    name(dtype),
                    if with_bias { "" } else { " no bias" }
                );
                for gelu in [false, true] {
                    let before = fk::fp8_gemm_calls();
                    let y = if gelu {
                        lin.forward_gelu(&xg)?
                    } else {
                        lin.forward(&xg)?
                    };
                    let ran = fk::fp8_gemm_calls() > before;
                    let (e, finite) = rel_err(&y, if gelu { &cpu_gelu } else { &cpu })?;
                    r.check(
                        format!("{what}{}", if gelu { " + GELU-tanh" } else { "" }),
                        format!(
                            "rel err {e:.2e} vs the CPU's emulation, {}",
                            if ran {
                                "cuBLASLt fp8"
                            } else {
                                "emulated (no fp8 algorithm)"
                            }
                        ),
                        finite && e < bound(dtype) && (ran || !must),
                    );
                }
            }
        }
    }
    Ok(())
}

/// The mma.sync kernel's (rows per block, blocks per SM) configurations compared (see
/// `flux_kernels::set_flash_config`); the first is the default.
const FLASH_CONFIGS: [(usize, usize); 3] = [(64, 3), (64, 2), (128, 1)];

/// One CUDA attention kernel as the checks and timings select it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kern {
    /// The Hopper kernel (TMA + wgmma, ping-pong between its consumer warpgroups): the default
    /// on compute capability 9.x for head dim 128.
    Hopper,
    /// The Hopper kernel without the ping-pong.
    HopperNoPingPong,
    /// The mma.sync kernel with a (rows per block, blocks per SM) configuration.
    Mma((usize, usize)),
}

impl Kern {
    fn label(self) -> String {
        match self {
            Kern::Hopper => "hopper".into(),
            Kern::HopperNoPingPong => "hopper-no-pingpong".into(),
            Kern::Mma(cfg) => format!("mma.sync {cfg:?}"),
        }
    }

    /// Selects this kernel for the following attention calls.
    fn select(self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            let (kernel, cfg) = match self {
                Kern::Hopper => (fk::FlashKernel::Auto, FLASH_CONFIGS[0]),
                Kern::HopperNoPingPong => (fk::FlashKernel::HopperNoPingPong, FLASH_CONFIGS[0]),
                Kern::Mma(cfg) => (fk::FlashKernel::MmaSync, cfg),
            };
            fk::set_flash_kernel(kernel);
            fk::set_flash_config(cfg.0, cfg.1)?;
        }
        Ok(())
    }

    /// Whether the last attention call ran this kernel (the name `last_flash_kernel` reports).
    fn ran(self) -> bool {
        #[cfg(feature = "cuda")]
        {
            let want = match self {
                Kern::Hopper => "hopper",
                Kern::HopperNoPingPong => "hopper-no-pingpong",
                Kern::Mma(_) => "mma.sync",
            };
            fk::last_flash_kernel() == want
        }
        #[cfg(not(feature = "cuda"))]
        false
    }
}

/// The kernels that take head dim `d` on this device: both Hopper variants first where the
/// device is compute capability 9.x and the build has the kernel, then every mma.sync
/// configuration. The first is the default.
fn kernels(dev: &Device, d: usize) -> Vec<Kern> {
    let mut v = vec![];
    if d == 128 && hopper(dev) {
        v.extend([Kern::Hopper, Kern::HopperNoPingPong]);
    }
    v.extend(FLASH_CONFIGS.map(Kern::Mma));
    v
}

/// Whether the device is a Hopper (compute capability 9.x), this build carries the Hopper
/// attention kernel and `FLUX_CUDA_ATTENTION` does not opt out of it (`run.sh` sets
/// `mma.sync` when the smoke run of the Hopper kernel failed).
fn hopper(dev: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        use candle::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let major = cuda
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .unwrap_or(0);
        let opted_out = std::env::var(fk::FlashKernel::ENV).is_ok_and(|v| v.trim() == "mma.sync");
        return major == 9 && fk::has_hopper_kernel() && !opted_out;
    }
    let _ = dev;
    false
}

/// The default kernel again (after a check or timing chose others).
fn select_default(dev: &Device) -> Result<()> {
    kernels(dev, 128)[0].select()
}

/// Compares against a golden tensor and records the row.
fn golden_row(
    r: &mut Report,
    what: String,
    actual: &Tensor,
    expected: &Tensor,
    tol: Tolerance,
) -> Result<()> {
    match compare(&actual.to_device(&Device::Cpu)?, expected, tol) {
        Ok(c) => r.check(
            what,
            format!("max-abs {:.2e}, cosine {:.6}", c.max_abs, c.cosine),
            c.passed,
        ),
        Err(e) => r.check(what, e, false),
    }
    Ok(())
}

fn goldens(dev: &Device, r: &mut Report) -> Result<()> {
    use flux_dit::{DitInput, Flux, FluxOptions};
    println!("== tiny goldens on CUDA");
    let opts = FluxOptions {
        rope: flux_dit::AngleMode::F64,
        ..Default::default()
    };
    for (case, dtype, fp8_gemm) in [
        ("dev", DType::F32, false),
        ("schnell", DType::F32, false),
        ("dev", DType::BF16, false),
        ("dev", DType::F32, true),
        ("dev", DType::BF16, true),
    ] {
        let g = Golden::open("flux-dit", case);
        let run_on = |dev: &Device, dtype: DType| -> Result<Tensor> {
            let opts = FluxOptions { fp8_gemm, ..opts };
            let model = Flux::from_diffusers_folder(
                format!("flux-dit/tests/golden/{case}_diffusers"),
                dtype,
                dev,
                opts,
            )?;
            let img = g.tensor("input/img");
            let b = img.dim(0)?;
            let expand = |t: Tensor| -> Result<Tensor> {
                Ok(t.unsqueeze(0)?.repeat((b, 1, 1))?.to_device(dev)?)
            };
            let on = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(dev)?) };
            let guidance = g
                .names()
                .iter()
                .any(|n| n == "input/guidance")
                .then(|| g.tensor("input/guidance").to_device(dev))
                .transpose()?;
            Ok(model.forward(&DitInput {
                img: &on(img)?,
                img_ids: &expand(g.tensor("input/img_ids"))?,
                txt: &on(g.tensor("input/txt"))?,
                txt_ids: &expand(g.tensor("input/txt_ids"))?,
                timesteps: &on(g.tensor("input/timesteps"))?,
                y: &on(g.tensor("input/y"))?,
                guidance: guidance.as_ref(),
            })?)
        };
        let calls = fk::fp8_gemm_calls();
        let out = run_on(dev, dtype)?;
        if fp8_gemm {
            // quality: fp8 products against the reference's f32 output; and the CUDA path
            // against the CPU's emulation of the same rounding (f32 on the GPU is emulated too;
            // bf16 runs cuBLASLt's fp8 GEMMs where it has an algorithm for the tiny shapes)
            let lt = fk::fp8_gemm_calls() - calls;
            golden_row(
                r,
                format!("flux-dit {case} fp8 GEMMs {} on CUDA vs reference f32 ({lt} cuBLASLt fp8 calls)", name(dtype)),
                &out,
                &g.tensor("output/f32"),
                Tolerance::new(f64::INFINITY, 0.0).with_min_cosine(0.99),
            )?;
            let emulated = run_on(&Device::Cpu, DType::F32)?;
            let tol = if dtype == DType::F32 {
                Tolerance::new(1e-3, 1e-3)
            } else {
                Tolerance::new(f64::INFINITY, 0.0).with_min_cosine(0.999)
            };
            golden_row(
                r,
                format!(
                    "flux-dit {case} fp8 GEMMs {} on CUDA vs the CPU's emulation",
                    name(dtype)
                ),
                &out,
                &emulated,
                tol,
            )?;
            continue;
        }
        let (key, tol) = if dtype == DType::F32 {
            ("output/f32", Tolerance::F32_SINUSOID)
        } else {
            (
                "output/bf16",
                Tolerance::new(0.1, 0.0).with_min_cosine(0.999),
            )
        };
        golden_row(
            r,
            format!("flux-dit {case} {} on CUDA", name(dtype)),
            &out,
            &g.tensor(key),
            tol,
        )?;
    }
    {
        let g = Golden::open("flux-vae", "tiny");
        for dtype in [DType::F32, DType::BF16] {
            let ae = flux_vae::AutoEncoder::from_diffusers_folder(
                "flux-vae/tests/golden/tiny_diffusers",
                dtype,
                dev,
            )?;
            let z = g.tensor("input/latent_8").to_dtype(dtype)?.to_device(dev)?;
            let x = ae.decode(&z)?;
            let (key, tol) = if dtype == DType::F32 {
                ("decode/8", Tolerance::F32)
            } else {
                (
                    "decode/8/bf16",
                    Tolerance::new(0.15, 0.0).with_min_cosine(0.999),
                )
            };
            golden_row(
                r,
                format!("flux-vae decode {} on CUDA", name(dtype)),
                &x,
                &g.tensor(key),
                tol,
            )?;
        }
        let ae = flux_vae::AutoEncoder::from_diffusers_folder(
            "flux-vae/tests/golden/tiny_diffusers",
            DType::F32,
            dev,
        )?;
        let x = g.tensor("input/image_64").to_device(dev)?;
        let z = ae.encode(&x)?;
        golden_row(
            r,
            "flux-vae encode f32 on CUDA".into(),
            &z,
            &g.tensor("encode/64/latent"),
            Tolerance::F32,
        )?;
    }
    {
        use flux_pipeline::{FluxPipeline, GenerateRequest, ModelSource, PipelineOptions};
        let g = Golden::open("flux-pipeline", "pipeline");
        let m = g.case_meta("dev");
        for dtype in [DType::F32, DType::BF16] {
            let req = GenerateRequest {
                prompts: vec![m["prompt"].as_str().unwrap_or_default().to_string()],
                width: m["width"].as_u64().unwrap_or(0) as usize,
                height: m["height"].as_u64().unwrap_or(0) as usize,
                steps: m["steps"].as_u64().map(|s| s as usize),
                guidance: m["guidance"].as_f64().map(|g| g as f32),
                max_sequence_length: m["max_sequence_length"].as_u64().map(|s| s as usize),
                latents: Some(g.tensor("dev/latents_in")),
                ..Default::default()
            };
            let run = |device: &Device| -> Result<Tensor> {
                let opts = PipelineOptions {
                    dtype,
                    device: device.clone(),
                    ..Default::default()
                };
                let mut pipe = FluxPipeline::from_source(
                    &ModelSource::Folder("flux-pipeline/tests/golden/tiny-dev".into()),
                    opts,
                )?;
                let out = pipe.generate(&req, |_, _| {})?;
                Ok(out.images[0].image.clone())
            };
            let image = run(dev)?;
            if dtype == DType::F32 {
                golden_row(
                    r,
                    "pipeline tiny-dev 6 steps f32 on CUDA".into(),
                    &image,
                    &g.tensor("dev/image"),
                    Tolerance::new(1e-4, 0.0),
                )?;
            } else {
                // No bf16 golden: the CPU bf16 run is the twin; the f32 golden gives the scale.
                let cpu = run(&Device::Cpu)?;
                golden_row(
                    r,
                    "pipeline tiny-dev 6 steps bf16 on CUDA vs on CPU".into(),
                    &image,
                    &cpu,
                    Tolerance::new(0.25, 0.0).with_min_cosine(0.99),
                )?;
                let c = compare(
                    &cpu,
                    &g.tensor("dev/image"),
                    Tolerance::new(f64::INFINITY, 0.0),
                )
                .map_err(anyhow::Error::msg)?;
                r.info(
                    "pipeline tiny-dev bf16 on CPU vs f32 golden (bf16's own drift)".into(),
                    format!("max-abs {:.2e}, cosine {:.6}", c.max_abs, c.cosine),
                );
            }
        }
    }
    Ok(())
}

/// Median seconds of one call: `batches` batches of `per` calls, each timed with CUDA events
/// on the device's stream (host clock around a device sync elsewhere), after a warm-up batch.
fn time(
    dev: &Device,
    batches: usize,
    per: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..per.min(3) {
        f()?;
    }
    dev.synchronize()?;
    let mut v = Vec::with_capacity(batches);
    for _ in 0..batches {
        // CUDA events around the batch on the device's stream; the host clock elsewhere
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = dev {
            use candle::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let stream = cuda.cuda_stream();
            let ev = |e| anyhow::anyhow!("CUDA event: {e:?}");
            let start = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(ev)?;
            for _ in 0..per {
                f()?;
            }
            let end = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(ev)?;
            let ms = start.elapsed_ms(&end).map_err(ev)?;
            v.push(f64::from(ms) / 1e3 / per as f64);
            continue;
        }
        let t = Instant::now();
        for _ in 0..per {
            f()?;
        }
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() / per as f64);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn bench_attention(dev: &Device, r: &mut Report) -> Result<()> {
    println!("== attention timings (bf16, B=1, H=24, D=128; CUDA events, median of batches)");
    for l in [1024usize, 4096, 4352, 4608, 8192, 16384] {
        // three input sets, rotated, so repeated calls do not run from L2
        let sets: Vec<[Tensor; 3]> = (0..3)
            .map(|_| -> Result<[Tensor; 3]> {
                let t = || -> Result<Tensor> {
                    Ok(Tensor::randn(0f32, 1., (1, 24, l, 128), dev)?.to_dtype(DType::BF16)?)
                };
                Ok([t()?, t()?, t()?])
            })
            .collect::<Result<_>>()?;
        let flops = 4.0 * 24.0 * (l * l) as f64 * 128.0;
        // about 25 ms of calls per batch, at least 3
        let per = ((0.025 / (flops / 400e12)) as usize).clamp(3, 50);
        let mut i = 0;
        let mut kerns = kernels(dev, 128);
        kerns.truncate(if hopper(dev) { 3 } else { 1 }); // the Hopper kernels and today's default
        for kern in kerns {
            kern.select()?;
            let ours = time(dev, 9, per, || {
                let [q, k, v] = &sets[i % 3];
                i += 1;
                fk::attention(q, k, v, Default::default())?;
                Ok(())
            })?;
            r.info(
                format!("attention L={l} {}", kern.label()),
                format!("{:.3} ms, {:.0} TFLOP/s", ours * 1e3, flops / ours / 1e12),
            );
        }
        select_default(dev)?;
        // the composite's f32 scores take 24·L²·4 bytes (25.8 GB at 16384)
        let (batches, per) = if l >= 8192 { (3, 1) } else { (5, 3) };
        let comp = time(dev, batches, per, || {
            let [q, k, v] = &sets[i % 3];
            i += 1;
            fk::attention_composite(q, k, v, Default::default())?;
            Ok(())
        })?;
        r.info(
            format!("attention L={l} candle composite"),
            format!("{:.3} ms, {:.0} TFLOP/s", comp * 1e3, flops / comp / 1e12),
        );
    }
    Ok(())
}

/// Every GEMM shape of a FLUX.1-dev step at 1024² (rows × in → out, calls per step, GELU after
/// it), bf16: cuBLASLt with the bias (and GELU) in its epilogue against candle's cuBLAS
/// product plus our bias kernel (plus the GELU pass).
fn bench_gemm(dev: &Device, r: &mut Report) -> Result<()> {
    println!("== FLUX GEMMs, bf16: fp8, cuBLASLt epilogues, cuBLAS + bias pass (CUDA events)");
    let shapes: [(&str, usize, usize, usize, usize, bool); 10] = [
        ("double img qkv", 4096, 3072, 9216, 19, false),
        ("double img proj", 4096, 3072, 3072, 19, false),
        ("double img mlp.0 (+GELU)", 4096, 3072, 12288, 19, true),
        ("double img mlp.2", 4096, 12288, 3072, 19, false),
        ("double txt qkv", 512, 3072, 9216, 19, false),
        ("double txt proj", 512, 3072, 3072, 19, false),
        ("double txt mlp.0 (+GELU)", 512, 3072, 12288, 19, true),
        ("double txt mlp.2", 512, 12288, 3072, 19, false),
        ("single linear1", 4608, 3072, 21504, 38, false),
        ("single linear2", 4608, 15360, 3072, 38, false),
    ];
    use fk::CudaLinear::{Cublas, CublasLt, CublasLtTuned};
    // (label, fp8 layer, product path)
    let paths = [
        ("fp8", true, CublasLt),
        ("fp8 tuned", true, CublasLtTuned),
        ("cuBLASLt", false, CublasLt),
        ("cuBLASLt tuned", false, CublasLtTuned),
        ("cuBLAS + passes", false, Cublas),
    ];
    let mut per_step = [0f64; 5];
    // seconds per call of the default cuBLASLt path, by shape, for the second-stream bound
    let mut lt_secs = HashMap::new();
    for (what, rows, inp, out, calls, gelu) in shapes {
        let w = (Tensor::randn(0f32, 0.02, (out, inp), dev)?).to_dtype(DType::BF16)?;
        let b = Tensor::randn(0f32, 1., out, dev)?.to_dtype(DType::BF16)?;
        let x = Tensor::randn(0f32, 1., (rows, inp), dev)?.to_dtype(DType::BF16)?;
        let lin8 = fk::Linear::from_weight_fp8(
            fk::LinearWeight::Dense(w.clone()),
            Some(b.clone()),
            dev,
            DType::BF16,
        )?;
        let lin = fk::Linear::new(w, Some(b))?;
        let flops = 2.0 * (rows * inp * out) as f64;
        let mut line = vec![];
        for (i, &(label, fp8, mode)) in paths.iter().enumerate() {
            fk::set_cuda_linear(mode);
            let layer = if fp8 { &lin8 } else { &lin };
            let before = fk::fp8_gemm_calls();
            let secs = time(dev, 9, 10, || {
                if gelu {
                    layer.forward_gelu(&x)?;
                } else {
                    layer.forward(&x)?;
                }
                Ok(())
            })?;
            let emulated = fp8 && fk::fp8_gemm_calls() == before;
            per_step[i] += secs * calls as f64;
            if i == 2 {
                lt_secs.insert((rows, inp, out), secs);
            }
            line.push(format!(
                "{label}{} {:.3} ms {:.0} TFLOP/s",
                if emulated { " (emulated!)" } else { "" },
                secs * 1e3,
                flops / secs / 1e12
            ));
        }
        fk::set_cuda_linear(CublasLt);
        r.info(
            format!("GEMM {what} {rows}×{inp}→{out} ×{calls}"),
            line.join(", "),
        );
    }
    // What a second stream for the text GEMMs could save at most: their time beyond what the
    // same products take at the image shapes' rate (the image GEMMs already fill the device).
    let mut bound = 0.0;
    for (_, rows, inp, out, calls, _) in shapes.iter().filter(|s| s.1 == 512) {
        let (Some(t), Some(t_img)) = (
            lt_secs.get(&(*rows, *inp, *out)),
            lt_secs.get(&(4096, *inp, *out)),
        ) else {
            continue;
        };
        bound += (t - t_img * *rows as f64 / 4096.0).max(0.0) * *calls as f64;
    }
    r.info(
        "second stream for the text GEMMs: at most".into(),
        format!(
            "{:.2} ms per step (text GEMMs' time beyond the image shapes' rate)",
            bound * 1e3
        ),
    );
    // GGUF weights on CUDA: our one-pass decoding into bf16 + cuBLASLt, against candle's CUDA
    // quantized matmul on the same blocks (which takes f32 activations)
    for (what, rows, inp, out) in [
        ("double img proj", 4096usize, 3072usize, 3072usize),
        ("double img mlp.0", 4096, 3072, 12288),
    ] {
        let wv = (Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu)?)
            .flatten_all()?
            .to_vec1::<f32>()?;
        let x = Tensor::randn(0f32, 1., (rows, inp), dev)?.to_dtype(DType::BF16)?;
        let x32 = x.to_dtype(DType::F32)?;
        let flops = 2.0 * (rows * inp * out) as f64;
        for ty in [fk::QuantType::Q8_0, fk::QuantType::Q4_K] {
            let p = fk::PackedWeight::quantize(ty, &wv, out, inp)?;
            let ours = fk::Linear::from_weight(
                fk::LinearWeight::Packed(p.clone()),
                None,
                dev,
                DType::BF16,
            )?;
            let t_ours = time(dev, 9, 5, || {
                ours.forward(&x)?;
                Ok(())
            })?;
            let storage = candle::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(p.bytes()),
                dev,
                ty.to_candle(),
            )?;
            let q = candle::quantized::QMatMul::from_qtensor(candle::quantized::QTensor::new(
                storage,
                (out, inp),
            )?)?;
            let t_candle = time(dev, 9, 5, || {
                candle::Module::forward(&q, &x32)?;
                Ok(())
            })?;
            let (e, _) = rel_err(
                &ours.forward(&x)?.to_dtype(DType::F32)?,
                &candle::Module::forward(&q, &x32)?,
            )?;
            r.info(
                format!("GEMM {what} {rows}×{inp}→{out} {ty}"),
                format!(
                    "ours (decode + cuBLASLt bf16) {:.3} ms {:.0} TFLOP/s, candle QMatMul (f32) {:.3} ms {:.0} TFLOP/s, rel diff {e:.1e}",
                    t_ours * 1e3,
                    flops / t_ours / 1e12,
                    t_candle * 1e3,
                    flops / t_candle / 1e12
                ),
            );
        }
    }
    let sums: Vec<String> = paths
        .iter()
        .zip(per_step)
        .map(|((label, ..), t)| format!("{label} {:.1} ms", t * 1e3))
        .collect();
    r.info(
        "GEMMs per step (sum of the table; fp8 = quantization + cuBLASLt fp8)".into(),
        sums.join(", "),
    );
    Ok(())
}

fn bench_dit(dev: &Device, r: &mut Report) -> Result<()> {
    use flux_dit::{
        bfl_tensor_shapes, img_ids, txt_ids, Config, DitInput, Flux, FluxOptions, Layout, Weights,
    };
    println!("== full-width DiT step (dev config, bf16, 1024² → 4096 image + 512 text tokens)");
    let cfg = Config::dev();
    let t = Instant::now();
    let mut tensors = HashMap::new();
    for (k, shape) in bfl_tensor_shapes(&cfg) {
        let w = Tensor::randn(0f32, 0.02, shape.as_slice(), dev)?.to_dtype(DType::BF16)?;
        tensors.insert(k, w);
    }
    dev.synchronize()?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    r.info(
        "DiT random weights made on the device".into(),
        format!(
            "{:.2} B params bf16 in {:.1} s",
            params as f64 / 1e9,
            t.elapsed().as_secs_f64()
        ),
    );
    let (h, w) = (128usize, 128usize); // 1024² image → 128² latent → 64² = 4096 packed tokens
    let img = Tensor::randn(0f32, 1., (1, h * w / 4, cfg.in_channels), dev)?;
    let img = img.to_dtype(DType::BF16)?;
    let txt = Tensor::randn(0f32, 1., (1, 512, cfg.context_in_dim), dev)?.to_dtype(DType::BF16)?;
    let y = Tensor::randn(0f32, 1., (1, cfg.vec_in_dim), dev)?.to_dtype(DType::BF16)?;
    let ids_img = img_ids(1, h, w, 0.0, dev)?;
    let ids_txt = txt_ids(1, 512, dev)?;
    let ts = Tensor::new(&[0.5f32], dev)?.to_dtype(DType::BF16)?;
    let g = Tensor::new(&[3.5f32], dev)?;
    let input = DitInput {
        img: &img,
        img_ids: &ids_img,
        txt: &txt,
        txt_ids: &ids_txt,
        timesteps: &ts,
        y: &y,
        guidance: Some(&g),
    };
    let mut results = vec![];
    // the defaults first (cuBLASLt epilogues, the default attention kernel), then cuBLASLt with
    // tuned algorithms, cuBLAS with separate passes, on a Hopper also today's mma.sync
    // attention, the composite last
    let lt = fk::CudaLinear::CublasLt;
    let mut runs = vec![(false, kernels(dev, 128)[0], lt)];
    runs.push((false, kernels(dev, 128)[0], fk::CudaLinear::CublasLtTuned));
    runs.push((false, kernels(dev, 128)[0], fk::CudaLinear::Cublas));
    if hopper(dev) {
        runs.push((false, Kern::Mma(FLASH_CONFIGS[0]), lt));
    }
    runs.push((true, kernels(dev, 128)[0], lt));
    // then the defaults with fp8 GEMMs (not compared with the composite: fp8's own error)
    let fp8_run = runs.len();
    runs.push((false, kernels(dev, 128)[0], lt));
    for (run, &(composite, kern, linear)) in runs.iter().enumerate() {
        let fp8_gemm = run == fp8_run;
        kern.select()?;
        fk::set_cuda_linear(linear);
        let ckpt =
            fk::Checkpoint::from_tensors(tensors.clone(), DType::BF16, dev, "random weights")?;
        let weights = Weights::from_checkpoint(ckpt, Layout::Bfl);
        let opts = FluxOptions {
            composite_attention: composite,
            fp8_gemm,
            ..Default::default()
        };
        let t = Instant::now();
        let model = Flux::load(&cfg, &weights, opts)?;
        dev.synchronize()?;
        if fp8_gemm {
            r.info(
                "DiT fp8 weights encoded on the device".into(),
                format!("{:.1} s", t.elapsed().as_secs_f64()),
            );
        }
        let calls = fk::fp8_gemm_calls();
        let mut out = None;
        let secs = time(dev, 5, 1, || {
            out = Some(model.forward(&input)?);
            Ok(())
        })?;
        let label = if composite {
            "candle composite attention".to_string()
        } else if fp8_gemm {
            let per = (fk::fp8_gemm_calls() - calls) as f64 / 6.0; // 1 warm-up + 5 timed
            format!(
                "fp8 GEMMs (attention {}; {per:.0} cuBLASLt fp8 calls per step)",
                kern.label()
            )
        } else {
            format!("ours (attention {}, linear {linear:?})", kern.label())
        };
        r.info(
            format!("DiT step 1024² bf16, {label}"),
            format!("{:.1} ms", secs * 1e3),
        );
        results.push(out.expect("ran"));
    }
    select_default(dev)?;
    fk::set_cuda_linear(lt);
    let fp8 = results.pop().expect("the fp8 run");
    let c = compare(
        &fp8.to_device(&Device::Cpu)?,
        &results[0].to_device(&Device::Cpu)?,
        Tolerance::new(f64::INFINITY, 0.0),
    )
    .map_err(anyhow::Error::msg)?;
    r.check(
        "DiT step: fp8 GEMMs vs bf16 (quality; random weights)".into(),
        format!(
            "cosine {:.5}, max abs {:.3e}, rel err {:.2e}",
            c.cosine, c.max_abs, c.rel_l2
        ),
        c.cosine.is_finite() && c.cosine > 0.98,
    );
    gguf_steps(dev, r, &cfg, &tensors, &input)?;
    let last = results.len() - 1;
    for (i, &(_, kern, linear)) in runs.iter().enumerate().take(last) {
        let (e, finite) = rel_err(&results[i], &results[last])?;
        r.check(
            format!(
                "DiT step: ours (attention {}, linear {linear:?}) vs composite outputs",
                kern.label()
            ),
            format!("rel err {e:.2e}"),
            finite && e < 2e-2,
        );
    }
    Ok(())
}

/// The full-width step with GGUF Q8_0 and Q4_K transformers (the blocks' weights packed as
/// city96's files have them, decoded on the device into bf16 before each product), against the
/// same model with those weights decoded once and kept dense (the same values, so the outputs
/// must agree to the GEMMs' rounding). One quantized weight per shape, shared by every layer of
/// that shape, keeps the CPU's quantization to a few seconds; the step does the same work.
fn gguf_steps(
    dev: &Device,
    r: &mut Report,
    cfg: &flux_dit::Config,
    tensors: &HashMap<String, Tensor>,
    input: &flux_dit::DitInput,
) -> Result<()> {
    use flux_dit::{gguf_type_for, Flux, FluxOptions, Layout, Weights};
    for ty in [fk::QuantType::Q8_0, fk::QuantType::Q4_K] {
        let t = Instant::now();
        let mut shared: HashMap<Vec<usize>, (fk::PackedWeight, Tensor)> = HashMap::new();
        let mut packed = HashMap::new();
        let mut dense = HashMap::new();
        for (k, w) in tensors {
            if gguf_type_for(k, w.dims(), None, ty) != ty {
                packed.insert(k.clone(), fk::LinearWeight::Dense(w.clone()));
                dense.insert(k.clone(), w.clone());
                continue;
            }
            let (out, inp) = w.dims2()?;
            if !shared.contains_key(w.dims()) {
                let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let p = fk::PackedWeight::quantize(ty, &v, out, inp)?;
                let d = Tensor::from_vec(p.dequantize()?, (out, inp), &Device::Cpu)?
                    .to_dtype(DType::BF16)?
                    .to_device(dev)?;
                shared.insert(w.dims().to_vec(), (p, d));
            }
            let (p, d) = &shared[w.dims()];
            packed.insert(k.clone(), fk::LinearWeight::Packed(p.clone()));
            dense.insert(k.clone(), d.clone());
        }
        let quantized = t.elapsed().as_secs_f64();
        let mut outs = vec![];
        for (what, ckpt) in [
            (
                format!("GGUF {ty}"),
                fk::Checkpoint::from_weights(packed, DType::BF16, dev, "random weights")?,
            ),
            (
                format!("its {ty} weights decoded once (dense bf16)"),
                fk::Checkpoint::from_tensors(dense, DType::BF16, dev, "random weights")?,
            ),
        ] {
            let t = Instant::now();
            let model = Flux::load(
                cfg,
                &Weights::from_checkpoint(ckpt, Layout::Bfl),
                FluxOptions::default(),
            )?;
            dev.synchronize()?;
            let load = t.elapsed().as_secs_f64();
            let mut out = None;
            let secs = time(dev, 5, 1, || {
                out = Some(model.forward(input)?);
                Ok(())
            })?;
            r.info(
                format!("DiT step 1024² bf16, {what}"),
                format!(
                    "{:.1} ms (load {load:.1} s{})",
                    secs * 1e3,
                    if outs.is_empty() {
                        format!(
                            ", {} shapes quantized on the CPU in {quantized:.1} s",
                            shared.len()
                        )
                    } else {
                        String::new()
                    }
                ),
            );
            outs.push(out.expect("ran"));
        }
        let (e, finite) = rel_err(&outs[0], &outs[1])?;
        r.check(
            format!("DiT step: GGUF {ty} (decoded per product) vs decoded once"),
            format!("rel err {e:.2e}"),
            finite && e < 1e-3,
        );
    }
    Ok(())
}

/// The DiT's ops one by one at 1024² dev shapes (4608 tokens, bf16), with the count per step.
fn profile(dev: &Device, r: &mut Report) -> Result<()> {
    println!("== DiT ops at 1024² (4608 tokens, bf16): ms per call × calls per step");
    let (l, c, mlp) = (4608usize, 3072usize, 12288usize);
    let bf = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1., shape, dev)?.to_dtype(DType::BF16)?)
    };
    let mut total = 0.0;
    let mut row = |r: &mut Report, what: &str, calls: usize, secs: f64, flops: f64| {
        total += secs * calls as f64;
        let rate = if flops > 0.0 {
            format!(", {:.0} TFLOP/s", flops / secs / 1e12)
        } else {
            String::new()
        };
        r.info(
            format!("op {what}"),
            format!(
                "{:.3} ms × {calls} = {:.1} ms{rate}",
                secs * 1e3,
                secs * 1e3 * calls as f64
            ),
        );
    };
    // Linear layers: (in, out, calls per step: 19 double blocks × 2 streams, 38 single blocks;
    // the text stream's rows are 512, counted as 4608 here, an upper bound)
    for (name, inp, out, calls) in [
        ("qkv", c, 3 * c, 38),
        ("proj", c, c, 38),
        ("mlp.0", c, mlp, 38),
        ("mlp.2", mlp, c, 38),
        ("linear1", c, 3 * c + mlp, 38),
        ("linear2", c + mlp, c, 38),
    ] {
        let x = bf(&[1, l, inp])?;
        let lin = fk::Linear::new((bf(&[out, inp])? * 0.02)?, Some(bf(&[out])?))?;
        let secs = time(dev, 5, 5, || {
            lin.forward(&x)?;
            Ok(())
        })?;
        row(
            r,
            &format!("Linear {name} {inp}→{out}"),
            calls,
            secs,
            2.0 * (l * inp * out) as f64,
        );
        if name == "linear1" {
            let w = bf(&[out, inp])?;
            let x2 = x.reshape((l, inp))?;
            let s_tn = time(dev, 5, 5, || {
                x2.matmul(&w.t()?)?;
                Ok(())
            })?;
            let wt = w.t()?.contiguous()?;
            let s_nn = time(dev, 5, 5, || {
                x2.matmul(&wt)?;
                Ok(())
            })?;
            r.info(
                "   matmul only, weight (out,in) as a transposed view / (in,out) contiguous".into(),
                format!("{:.3} ms / {:.3} ms", s_tn * 1e3, s_nn * 1e3),
            );
        }
    }
    let x = bf(&[1, l, c])?;
    let m = bf(&[1, 1, 3 * c])?;
    let ch = |i: usize| -> Result<Tensor> { Ok(m.narrow(2, i * c, c)?) };
    let (sh, sc, g) = (ch(0)?, ch(1)?, ch(2)?);
    let secs = time(dev, 5, 10, || {
        fk::layer_norm_modulate(&x, &sh, &sc, 1e-6)?;
        Ok(())
    })?;
    row(r, "layer_norm_modulate", 19 * 4 + 38 + 1, secs, 0.0);
    let secs = time(dev, 5, 10, || {
        fk::gated_residual(&x, &g, &x)?;
        Ok(())
    })?;
    row(r, "gated_residual", 19 * 4 + 38, secs, 0.0);
    let h = bf(&[1, l, mlp])?;
    let secs = time(dev, 5, 10, || {
        fk::gelu_tanh(&h)?;
        Ok(())
    })?;
    row(
        r,
        "gelu_tanh (fused kernel, double blocks)",
        19 * 2,
        secs,
        0.0,
    );
    let secs = time(dev, 5, 10, || {
        h.to_dtype(DType::F32)?.gelu()?.to_dtype(DType::BF16)?;
        Ok(())
    })?;
    r.info(
        "   gelu_tanh as candle's composite (f32 round trip), for comparison".into(),
        format!("{:.3} ms", secs * 1e3),
    );
    let qkv = bf(&[1, l, 3 * c])?;
    let qv = qkv
        .reshape((1, l, 72, 128))?
        .narrow(2, 0, 24)?
        .transpose(1, 2)?;
    let ang = Tensor::rand(0f32, 6.3, (1, 1, l, 64), dev)?;
    let pe = fk::RopeTable {
        cos: ang.cos()?,
        sin: ang.sin()?,
    };
    let scale = bf(&[128])?;
    let secs = time(dev, 5, 10, || {
        fk::qk_norm_rope(&qv, &scale, 1e-6, &pe)?;
        Ok(())
    })?;
    row(r, "qk_norm_rope (q or k)", 57 * 2, secs, 0.0);
    let a = bf(&[1, l, c])?;
    let b = bf(&[1, l, mlp])?;
    let secs = time(dev, 5, 10, || {
        Tensor::cat(&[&a, &b], 2)?;
        Ok(())
    })?;
    row(
        r,
        "cat [attn, mlp] (single block; replaced by cat_gelu)",
        0,
        secs,
        0.0,
    );
    let hm = bf(&[1, l, 3 * c + mlp])?;
    let mv = hm.narrow(2, 3 * c, mlp)?;
    let secs = time(dev, 5, 10, || {
        fk::cat_gelu_tanh(&a, &mv)?;
        Ok(())
    })?;
    row(
        r,
        "cat_gelu_tanh [attn, gelu(mlp view)] (single block)",
        38,
        secs,
        0.0,
    );
    let q = bf(&[1, 24, l, 128])?;
    let secs = time(dev, 5, 10, || {
        fk::attention_tokens(&q, &q, &q, Default::default())?;
        Ok(())
    })?;
    row(
        r,
        "attention_tokens",
        57,
        secs,
        4.0 * 24.0 * (l * l) as f64 * 128.0,
    );
    r.info(
        "op sum (upper bound: text rows counted as image rows)".into(),
        format!("{:.1} ms", total * 1e3),
    );
    Ok(())
}
