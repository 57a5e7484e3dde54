//! Scaled dot-product attention, the one copy every model calls.

use candle::{DType, Tensor, D};

use crate::{Error, Result};

/// Options of [`attention`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnOpts<'a> {
    /// Additive bias on the logits, broadcastable to `(B, H, Lq, Lk)` (T5's position bias).
    pub bias: Option<&'a Tensor>,
    /// Mask keys after the query position (CLIP's causal text attention).
    pub causal: bool,
    /// Logit scale; `None` is `1/√D`. T5 uses `Some(1.0)`.
    pub scale: Option<f64>,
}

/// `softmax(q·kᵀ·scale + bias [+ causal mask])·v`, computed in f32 and returned in `q`'s dtype.
///
/// FLUX's transformer uses it without bias or mask (every token attends to every token, text
/// padding included).
///
/// # Shapes
/// `q`: `(B, H, Lq, D)`, `k`: `(B, H, Lk, D)`, `v`: `(B, H, Lk, Dv)`. Returns `(B, H, Lq, Dv)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: AttnOpts) -> Result<Tensor> {
    for (what, t) in [("attention q", q), ("attention k", k), ("attention v", v)] {
        if t.rank() != 4 {
            return Err(Error::RankMismatch {
                what,
                expected: 4,
                got: t.dims().to_vec(),
            });
        }
    }
    let (b, h, lq, d) = q.dims4()?;
    let (kb, kh, lk, kd) = k.dims4()?;
    let (vb, vh, vl, _) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vl) != (b, h, lk) {
        return Err(Error::ShapeMismatch {
            what: "attention k/v (must match q in B, H and k's D; v's L must match k's)",
            expected: vec![b, h, lk, d],
            got: k.dims().to_vec(),
        });
    }
    let dtype = q.dtype();
    let scale = opts.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    let mut logits = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?; // (b, h, lq, lk)
    if let Some(bias) = opts.bias {
        logits = logits.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    if opts.causal {
        let mask: Vec<f32> = (0..lq)
            .flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (lq, lk), q.device())?;
        logits = logits.broadcast_add(&mask)?;
    }
    let probs = softmax_last_dim(&logits)?;
    Ok(probs.matmul(&v.contiguous()?)?.to_dtype(dtype)?)
}

/// Row-wise softmax over the last dimension in f32 (exposed for tests and the text encoders).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?.to_dtype(dtype)?)
}
