//! FLUX's rotary position embedding: the table from 3-axis position ids, and its application to
//! interleaved pairs `(x[2p], x[2p+1])`.

use candle::{DType, Tensor, D};

use crate::{Error, Result};

/// Precision of the RoPE angle table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AngleMode {
    /// Frequencies and angles in f32 (BFL since 2025-01-31).
    #[default]
    F32,
    /// Frequencies and angles in f64, cos/sin cast to f32 (diffusers, and BFL's 2024 code).
    F64,
}

/// A RoPE table: cosines and sines of every token's angle per pair, in f32.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// `(B, 1, L, D/2)`.
    pub cos: Tensor,
    /// `(B, 1, L, D/2)`.
    pub sin: Tensor,
}

/// Builds the table for position `ids` (BFL `EmbedND`): axis `i` contributes `axes_dim[i]/2`
/// pairs with frequencies `ω_k = 1/theta^(2k/axes_dim[i])` and angles `id_i·ω_k`, axes
/// concatenated in order.
///
/// # Shapes
/// `ids`: `(B, L, n_axes)` (any float or integer dtype). Returns `(B, 1, L, Σaxes_dim/2)` tables.
pub fn rope_table(
    ids: &Tensor,
    axes_dim: &[usize],
    theta: f64,
    mode: AngleMode,
) -> Result<RopeTable> {
    if ids.rank() != 3 {
        return Err(Error::RankMismatch {
            what: "rope ids (B, L, axes)",
            expected: 3,
            got: ids.dims().to_vec(),
        });
    }
    let (_, _, n_axes) = ids.dims3()?;
    if n_axes != axes_dim.len() {
        return Err(Error::ShapeMismatch {
            what: "rope ids last dimension (one per axis)",
            expected: vec![usize::MAX, usize::MAX, axes_dim.len()],
            got: ids.dims().to_vec(),
        });
    }
    if let Some(d) = axes_dim.iter().find(|d| **d == 0 || **d % 2 != 0) {
        return Err(Error::InvalidArgument(format!(
            "RoPE axis dims must be even and positive, got {d} in {axes_dim:?}"
        )));
    }
    let dtype = match mode {
        AngleMode::F32 => DType::F32,
        AngleMode::F64 => DType::F64,
    };
    // PyTorch converts ids straight to the angle dtype (f32 ids for BFL, `.float()` then f64 for diffusers).
    let pos_all = ids.to_dtype(DType::F32)?.to_dtype(dtype)?;
    let mut angles = Vec::with_capacity(axes_dim.len());
    for (i, &d) in axes_dim.iter().enumerate() {
        let omega: Vec<f64> = (0..d / 2)
            .map(|k| match mode {
                // torch: scale = arange(0, d, 2, f32) / d; omega = 1.0 / (theta ** scale), in f32.
                AngleMode::F32 => {
                    let scale = (2 * k) as f32 / d as f32;
                    (1.0f32 / (theta as f32).powf(scale)) as f64
                }
                AngleMode::F64 => 1.0 / theta.powf((2 * k) as f64 / d as f64),
            })
            .collect();
        let omega = Tensor::from_vec(omega, d / 2, ids.device())?.to_dtype(dtype)?;
        let pos = pos_all.narrow(D::Minus1, i, 1)?; // (b, l, 1)
        angles.push(pos.broadcast_mul(&omega.reshape((1, 1, d / 2))?)?);
    }
    let angles = Tensor::cat(&angles, D::Minus1)?.unsqueeze(1)?; // (b, 1, l, D/2)
    Ok(RopeTable {
        cos: angles.cos()?.to_dtype(DType::F32)?,
        sin: angles.sin()?.to_dtype(DType::F32)?,
    })
}

/// Rotates interleaved pairs: `x'[2p] = cos·x[2p] − sin·x[2p+1]`,
/// `x'[2p+1] = sin·x[2p] + cos·x[2p+1]`, in f32, returned in `x`'s dtype.
///
/// # Shapes
/// `x`: `(B, H, L, D)`; `pe`: `(B or 1, 1, L, D/2)` tables.
pub fn apply_rope(x: &Tensor, pe: &RopeTable) -> Result<Tensor> {
    if x.rank() != 4 {
        return Err(Error::RankMismatch {
            what: "apply_rope x (B, H, L, D)",
            expected: 4,
            got: x.dims().to_vec(),
        });
    }
    let (b, h, l, d) = x.dims4()?;
    let (pb, _, pl, pd) = pe.cos.dims4()?;
    if d % 2 != 0 || pd * 2 != d || pl != l || (pb != b && pb != 1) {
        return Err(Error::ShapeMismatch {
            what: "apply_rope table (B, 1, L, D/2) for x (B, H, L, D)",
            expected: vec![b, 1, l, d / 2],
            got: pe.cos.dims().to_vec(),
        });
    }
    let dtype = x.dtype();
    let xs = x.to_dtype(DType::F32)?.reshape((b, h, l, d / 2, 2))?;
    let x0 = xs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let x1 = xs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let (cos, sin) = (&pe.cos, &pe.sin);
    let y0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let y1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    Ok(Tensor::stack(&[y0, y1], D::Minus1)?
        .reshape((b, h, l, d))?
        .to_dtype(dtype)?)
}

/// FLUX's QK-norm then RoPE: `apply_rope(rms_norm(x, scale, eps), pe)`. On CUDA one fused kernel
/// pass that reads `x` through its strides (q or k straight out of the qkv projection) and writes
/// it contiguous; for CPU f32 one pass over rows; elsewhere the two ops, its plain twin.
///
/// # Shapes
/// `x`: `(B, H, L, D)`; `scale`: `(D)`; `pe`: `(B or 1, 1, L, D/2)`. Returns `(B, H, L, D)` in
/// `x`'s dtype.
pub fn qk_norm_rope(x: &Tensor, scale: &Tensor, eps: f64, pe: &RopeTable) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        if x.rank() != 4 {
            return Err(Error::RankMismatch {
                what: "qk_norm_rope x (B, H, L, D)",
                expected: 4,
                got: x.dims().to_vec(),
            });
        }
        let (b, _, l, d) = x.dims4()?;
        let pb = pe.cos.dim(0)?;
        if scale.dims() != [d]
            || pe.cos.dims() != [pb, 1, l, d / 2]
            || (pb != 1 && pb != b)
            || d % 2 != 0
        {
            return Err(Error::ShapeMismatch {
                what: "qk_norm_rope scale (D) and table (B or 1, 1, L, D/2)",
                expected: vec![b, 1, l, d / 2],
                got: pe.cos.dims().to_vec(),
            });
        }
        let x = if x.stride().last() == Some(&1) {
            x.clone()
        } else {
            x.contiguous()?
        };
        let op = crate::cuda::QkNormRope {
            cos: pe.cos.to_dtype(DType::F32)?.contiguous()?,
            sin: pe.sin.to_dtype(DType::F32)?.contiguous()?,
            eps: eps as f32,
        };
        let scale = scale.to_dtype(x.dtype())?.contiguous()?;
        return Ok(x.apply_op2_no_bwd(&scale, &op)?);
    }
    if let Some(y) = crate::fused_cpu::qk_norm_rope(x, scale, eps as f32, &pe.cos, &pe.sin)? {
        return Ok(y);
    }
    apply_rope(&crate::rms_norm(x, scale, eps)?, pe)
}
