//! The elementwise and normalisation ops: RMSNorm, LayerNorm without affine, adaLN modulation,
//! GELU (tanh approximation).
//!
//! Each computes in f32 internally and returns the input dtype, as PyTorch does for bf16 I/O.

use candle::{DType, Tensor, D};

use crate::{Error, Result};

fn float_dtype(what: &'static str, x: &Tensor) -> Result<DType> {
    match x.dtype() {
        d @ (DType::F32 | DType::BF16 | DType::F16 | DType::F64) => Ok(d),
        dtype => Err(Error::UnsupportedDtype { what, dtype }),
    }
}

/// RMSNorm with a learnable scale, FLUX's QK-norm (BFL `RMSNorm`, torch `nn.RMSNorm`):
/// `bf16(x·rsqrt(mean(x²) + eps)) · scale` — normalised in f32, cast back to `x`'s dtype
/// *before* the scale multiplies.
///
/// # Shapes
/// `x`: `(…, D)`; `scale`: `(D)`. Returns `x`'s shape and dtype.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = float_dtype("rms_norm", x)?;
    let d = x.dim(D::Minus1)?;
    if scale.dims() != [d] {
        return Err(Error::ShapeMismatch {
            what: "rms_norm scale",
            expected: vec![d],
            got: scale.dims().to_vec(),
        });
    }
    let xf = x.to_dtype(DType::F32)?;
    let rrms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = xf.broadcast_mul(&rrms)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(&scale.to_dtype(dtype)?)?)
}

/// LayerNorm over the last dimension without weight or bias (biased variance), computed in f32.
///
/// # Shapes
/// `x`: `(…, D)`. Returns `x`'s shape and dtype.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = float_dtype("layer_norm", x)?;
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok(centered.broadcast_mul(&rstd)?.to_dtype(dtype)?)
}

/// GroupNorm with per-channel weight and bias (the VAE's norm), statistics in f32.
///
/// # Shapes
/// `x`: `(B, C, …)` with `C` divisible by `groups`; `weight`, `bias`: `(C)`. Returns `x`'s shape
/// and dtype.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = float_dtype("group_norm", x)?;
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        return Err(Error::ShapeMismatch {
            what: "group_norm input (B, C, …) with C divisible by the group count",
            expected: vec![usize::MAX, groups, usize::MAX],
            got: dims,
        });
    }
    let c = dims[1];
    for (what, t) in [("group_norm weight", weight), ("group_norm bias", bias)] {
        if t.dims() != [c] {
            return Err(Error::ShapeMismatch {
                what,
                expected: vec![c],
                got: t.dims().to_vec(),
            });
        }
    }
    let b = dims[0];
    let xf = x.to_dtype(DType::F32)?.reshape((b, groups, ()))?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered
        .broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?
        .reshape(dims.as_slice())?;
    let mut affine_shape = vec![1; dims.len()];
    affine_shape[1] = c;
    let w = weight
        .to_dtype(DType::F32)?
        .reshape(affine_shape.as_slice())?;
    let bb = bias
        .to_dtype(DType::F32)?
        .reshape(affine_shape.as_slice())?;
    Ok(normed
        .broadcast_mul(&w)?
        .broadcast_add(&bb)?
        .to_dtype(dtype)?)
}

/// adaLN modulation `(1 + scale)·x + shift`, in `x`'s dtype.
///
/// # Shapes
/// `x`: `(B, L, C)`; `shift`, `scale`: broadcastable to it, usually `(B, 1, C)`.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok((scale + 1.0)?.broadcast_mul(x)?.broadcast_add(shift)?)
}

/// `modulate(layer_norm(x, eps), shift, scale)` (adaLN after a LayerNorm without affine). One
/// fused pass on CUDA and for CPU f32; elsewhere the two ops, which are its plain twin.
///
/// # Shapes
/// `x`: `(B, L, C)`; `shift`, `scale`: `(B, 1, C)`. Returns `(B, L, C)` in `x`'s dtype.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    float_dtype("layer_norm_modulate", x)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() != DType::F64 {
        let (b, _, c) = x.dims3()?;
        for (what, t) in [
            ("layer_norm_modulate shift", shift),
            ("layer_norm_modulate scale", scale),
        ] {
            if t.dims() != [b, 1, c] || t.dtype() != x.dtype() {
                return Err(Error::ShapeMismatch {
                    what,
                    expected: vec![b, 1, c],
                    got: t.dims().to_vec(),
                });
            }
        }
        let op = crate::cuda::LnModulate { eps: eps as f32 };
        return Ok(x.contiguous()?.apply_op3_no_bwd(shift, scale, &op)?);
    }
    if let Some(y) = crate::fused_cpu::layer_norm_modulate(x, shift, scale, eps as f32)? {
        return Ok(y);
    }
    modulate(&layer_norm(x, eps)?, shift, scale)
}

/// The gated residual `x + gate·y` of every FLUX block. One fused pass on CUDA and for CPU f32;
/// elsewhere the composite ops, its plain twin.
///
/// # Shapes
/// `x`, `y`: `(B, L, C)`; `gate`: `(B, 1, C)`. Returns `(B, L, C)` in `x`'s dtype.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() != DType::F64 {
        let (b, _, c) = x.dims3()?;
        if gate.dims() != [b, 1, c] || y.dims() != x.dims() {
            return Err(Error::ShapeMismatch {
                what: "gated_residual gate (B, 1, C) and y like x",
                expected: vec![b, 1, c],
                got: gate.dims().to_vec(),
            });
        }
        let op = crate::cuda::GatedResidual;
        return Ok(x
            .contiguous()?
            .apply_op3_no_bwd(gate, &y.contiguous()?, &op)?);
    }
    if let Some(out) = crate::fused_cpu::gated_residual(x, gate, y)? {
        return Ok(out);
    }
    Ok((x + gate.broadcast_mul(y)?)?)
}

/// GELU with the tanh approximation (`approximate="tanh"`), computed in f32 (on CUDA and for CPU
/// f32 one fused pass; elsewhere candle's, its plain twin).
///
/// # Shapes
/// Any. Returns `x`'s shape and dtype.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let dtype = float_dtype("gelu_tanh", x)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && dtype != DType::F64 {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&crate::cuda::GeluTanh)?);
    }
    if let Some(y) = crate::fused_cpu::gelu_tanh(x)? {
        return Ok(y);
    }
    Ok(x.to_dtype(DType::F32)?.gelu()?.to_dtype(dtype)?)
}

/// `x` as an fp8 GEMM sees its activations: quantized to e4m3 with one scale for the whole
/// tensor (max |x| onto 448, nearest value with ties to even) and decoded again, in `x`'s dtype.
/// On CUDA one reduction and one rounding pass; elsewhere [`crate::quant::fp8_round`] on the
/// host, its twin (both round the same way: equal results).
///
/// # Shapes
/// Any. Returns `x`'s shape and dtype.
pub fn fp8_round_tensor(x: &Tensor) -> Result<Tensor> {
    let dtype = float_dtype("fp8_round_tensor", x)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && dtype != DType::F64 {
        return Ok(x
            .contiguous()?
            .apply_op1_no_bwd(&crate::cuda::Fp8Quantize { round: true })?);
    }
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let r = crate::quant::fp8_round(crate::Fp8Kind::E4M3, &v);
    Ok(Tensor::from_vec(r, x.shape(), x.device())?.to_dtype(dtype)?)
}

/// `cat([a, gelu_tanh(m)], -1)`, the input of FLUX's single-block output projection. On CUDA one
/// kernel pass reading both views; elsewhere the two ops, its plain twin.
///
/// # Shapes
/// `a`: `(B, L, Ca)`, `m`: `(B, L, Cm)`. Returns `(B, L, Ca + Cm)`.
pub fn cat_gelu_tanh(a: &Tensor, m: &Tensor) -> Result<Tensor> {
    let dtype = float_dtype("cat_gelu_tanh", a)?;
    if a.rank() != 3 || m.rank() != 3 || a.dims()[..2] != m.dims()[..2] || m.dtype() != dtype {
        return Err(Error::ShapeMismatch {
            what: "cat_gelu_tanh m (same B, L and dtype as a)",
            expected: vec![a.dim(0)?, a.dim(1)?, usize::MAX],
            got: m.dims().to_vec(),
        });
    }
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() && dtype != DType::F64 {
        let even = |t: &Tensor| -> Result<Tensor> {
            Ok(if crate::cuda::row_stride(t.layout()).is_some() {
                t.clone()
            } else {
                t.contiguous()?
            })
        };
        return Ok(even(a)?.apply_op2_no_bwd(&even(m)?, &crate::cuda::CatGelu)?);
    }
    if let Some(y) = crate::fused_cpu::cat_gelu_tanh(a, m)? {
        return Ok(y);
    }
    Ok(Tensor::cat(&[a, &gelu_tanh(m)?], D::Minus1)?)
}

/// QuickGELU `x·sigmoid(1.702·x)` (CLIP), computed in f32.
///
/// # Shapes
/// Any. Returns `x`'s shape and dtype.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let dtype = float_dtype("quick_gelu", x)?;
    let xf = x.to_dtype(DType::F32)?;
    let sigmoid = ((&xf * -1.702)?.exp()? + 1.0)?.recip()?;
    Ok((&xf * sigmoid)?.to_dtype(dtype)?)
}

/// SiLU `x·sigmoid(x)`, computed in f32.
///
/// # Shapes
/// Any. Returns `x`'s shape and dtype.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let dtype = float_dtype("silu", x)?;
    Ok(x.to_dtype(DType::F32)?.silu()?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_by_hand() {
        // x = [3, 4]: mean(x²) = 12.5, rrms = 1/sqrt(12.5).
        let y = rms_norm(&t(&[3.0, 4.0], &[1, 2]), &t(&[1.0, 2.0], &[2]), 0.0).unwrap();
        let r = 1.0 / 12.5f32.sqrt();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 3.0 * r).abs() < 1e-6 && (got[1] - 8.0 * r).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn rms_norm_rejects_wrong_scale() {
        let e = rms_norm(&t(&[3.0, 4.0], &[1, 2]), &t(&[1.0, 2.0, 3.0], &[3]), 1e-6).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }));
    }

    #[test]
    fn layer_norm_by_hand() {
        // [1, 2, 3]: mean 2, var 2/3.
        let y = layer_norm(&t(&[1.0, 2.0, 3.0], &[1, 3]), 0.0).unwrap();
        let s = (2.0f32 / 3.0).sqrt();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip([-1.0 / s, 0.0, 1.0 / s]) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn group_norm_by_hand() {
        // Two groups of two channels, one pixel each: [1, 3 | 2, 6] → [-1, 1 | -1, 1] (eps 0),
        // then weight [1, 2, 3, 4] and bias [0, 0, 1, 1].
        let x = t(&[1.0, 3.0, 2.0, 6.0], &[1, 4, 1, 1]);
        let y = group_norm(
            &x,
            2,
            &t(&[1.0, 2.0, 3.0, 4.0], &[4]),
            &t(&[0.0, 0.0, 1.0, 1.0], &[4]),
            0.0,
        )
        .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![-1.0, 2.0, -2.0, 5.0]
        );
        let bad = group_norm(&x, 3, &t(&[1.0; 4], &[4]), &t(&[0.0; 4], &[4]), 1e-6);
        assert!(matches!(bad, Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn modulate_by_hand() {
        let y = modulate(
            &t(&[2.0, 3.0], &[1, 1, 2]),
            &t(&[1.0, -1.0], &[1, 1, 2]),
            &t(&[0.5, 0.0], &[1, 1, 2]),
        )
        .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, 2.0]
        );
    }

    #[test]
    fn gelu_tanh_by_hand() {
        let x = [-3.0f32, -1.0, 0.0, 0.5, 2.0];
        let got = gelu_tanh(&t(&x, &[5])).unwrap().to_vec1::<f32>().unwrap();
        for (g, &x) in got.iter().zip(&x) {
            let c = (2.0f64 / std::f64::consts::PI).sqrt();
            let x = x as f64;
            let want = 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh());
            assert!(
                (*g as f64 - want).abs() < 1e-6,
                "gelu({x}) = {g}, want {want}"
            );
        }
    }

    #[test]
    fn quick_gelu_by_hand() {
        let x = [-2.0f32, 0.0, 1.0];
        let got = quick_gelu(&t(&x, &[3])).unwrap().to_vec1::<f32>().unwrap();
        for (g, x) in got.iter().zip(x) {
            let want = x / (1.0 + (-1.702 * x).exp());
            assert!((g - want).abs() < 1e-6, "{g} vs {want}");
        }
    }

    #[test]
    fn integer_input_is_a_typed_error() {
        let i = Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            layer_norm(&i, 1e-6),
            Err(Error::UnsupportedDtype { .. })
        ));
        assert!(matches!(gelu_tanh(&i), Err(Error::UnsupportedDtype { .. })));
    }
}
