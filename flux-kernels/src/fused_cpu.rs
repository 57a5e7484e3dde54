//! One-pass CPU f32 versions of the fused entry points (`layer_norm_modulate`,
//! `gated_residual`, `qk_norm_rope`): the composite paths make a dozen passes over memory with a
//! temporary each; these make one, rows in parallel. Each returns `None` when its inputs are not
//! f32 on the CPU (the caller then takes the plain twin).

use candle::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// The f32 elements of a contiguous CPU tensor's storage, or `None`.
fn cpu_slice<'a>(s: &'a Storage, l: &candle::Layout) -> Result<Option<&'a [f32]>> {
    let (Storage::Cpu(c), Some((a, b))) = (s, l.contiguous_offsets()) else {
        return Ok(None);
    };
    Ok(Some(&c.as_slice::<f32>()?[a..b]))
}

/// Binds `$name` to the f32 slice of tensor `$t` (keeping its storage guard alive), or returns
/// `Ok(None)` from the enclosing function.
macro_rules! slice_of {
    ($t:expr, $guard:ident, $name:ident) => {
        let ($guard, layout) = $t.storage_and_layout();
        let Some($name) = cpu_slice(&$guard, layout)? else {
            return Ok(None);
        };
    };
}

fn is_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// `(1 + scale)·LN(x) + shift`; x `(B, L, C)`, shift/scale `(B, 1, C)`.
pub(crate) fn layer_norm_modulate(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Option<Tensor>> {
    if !is_cpu_f32(&[x, shift, scale]) || x.rank() != 3 {
        return Ok(None);
    }
    let (b, l, c) = x.dims3()?;
    if shift.dims() != [b, 1, c] || scale.dims() != [b, 1, c] || c == 0 {
        return Ok(None);
    }
    let (x, shift, scale) = (x.contiguous()?, shift.contiguous()?, scale.contiguous()?);
    let mut out = vec![0f32; b * l * c];
    {
        slice_of!(x, xg, xv);
        slice_of!(shift, shg, sh);
        slice_of!(scale, scg, sc);
        out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
            let bi = row / l;
            let xr = &xv[row * c..(row + 1) * c];
            let (shr, scr) = (&sh[bi * c..(bi + 1) * c], &sc[bi * c..(bi + 1) * c]);
            let mean = xr.iter().sum::<f32>() / c as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for i in 0..c {
                o[i] = (scr[i] + 1.0) * ((xr[i] - mean) * rstd) + shr[i];
            }
        });
    }
    Ok(Some(Tensor::from_vec(out, (b, l, c), x.device())?))
}

/// `x + gate·y`; x, y `(B, L, C)`, gate `(B, 1, C)`.
pub(crate) fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
    if !is_cpu_f32(&[x, gate, y]) || x.rank() != 3 || x.dims() != y.dims() {
        return Ok(None);
    }
    let (b, l, c) = x.dims3()?;
    if gate.dims() != [b, 1, c] || c == 0 {
        return Ok(None);
    }
    let (x, gate, y) = (x.contiguous()?, gate.contiguous()?, y.contiguous()?);
    let mut out = vec![0f32; b * l * c];
    {
        slice_of!(x, xg, xv);
        slice_of!(gate, gg, gv);
        slice_of!(y, yg, yv);
        out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
            let bi = row / l;
            let g = &gv[bi * c..(bi + 1) * c];
            let (xr, yr) = (&xv[row * c..(row + 1) * c], &yv[row * c..(row + 1) * c]);
            for i in 0..c {
                o[i] = xr[i] + g[i] * yr[i];
            }
        });
    }
    Ok(Some(Tensor::from_vec(out, (b, l, c), x.device())?))
}

/// RMSNorm (learned scale) then RoPE on interleaved pairs; x a `(B, H, L, D)` view (any
/// strides; read in place when its rows are contiguous), scale `(D)`, tables
/// `(B or 1, 1, L, D/2)` f32. Output contiguous.
pub(crate) fn qk_norm_rope(
    x: &Tensor,
    scale: &Tensor,
    eps: f32,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<Tensor>> {
    if !is_cpu_f32(&[x, scale, cos, sin]) || x.rank() != 4 {
        return Ok(None);
    }
    let (b, h, l, d) = x.dims4()?;
    let pb = cos.dim(0)?;
    if d % 2 != 0
        || d == 0
        || scale.dims() != [d]
        || cos.dims() != [pb, 1, l, d / 2]
        || sin.dims() != cos.dims()
    {
        return Ok(None);
    }
    // x is read in place when its rows are contiguous (q and k are views of the projection)
    let x = if x.layout().stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    let (scale, cos, sin) = (scale.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let mut out = vec![0f32; b * h * l * d];
    {
        let (xg, xl) = x.storage_and_layout();
        let Storage::Cpu(xc) = &*xg else {
            return Ok(None);
        };
        let xv = xc.as_slice::<f32>()?;
        let (x0, xs) = (xl.start_offset(), xl.stride());
        slice_of!(scale, sg, sv);
        slice_of!(cos, cg, cv);
        slice_of!(sin, sng, snv);
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let li = row % l;
            let hi = (row / l) % h;
            let bi = row / (l * h);
            let t = ((if pb == 1 { 0 } else { bi }) * l + li) * (d / 2);
            let at = x0 + bi * xs[0] + hi * xs[1] + li * xs[2];
            let xr = &xv[at..at + d];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let rrms = 1.0 / (ms + eps).sqrt();
            for p in 0..d / 2 {
                let y0 = xr[2 * p] * rrms * sv[2 * p];
                let y1 = xr[2 * p + 1] * rrms * sv[2 * p + 1];
                let (c, s) = (cv[t + p], snv[t + p]);
                o[2 * p] = y0 * c - y1 * s;
                o[2 * p + 1] = y0 * s + y1 * c;
            }
        });
    }
    Ok(Some(Tensor::from_vec(out, (b, h, l, d), x.device())?))
}

/// `[a, GELU_tanh(m)]` along the last dim in one parallel pass; a `(B, L, Ca)`, m `(B, L, Cm)`
/// views with contiguous rows (m is a slice of the single block's projection, read in place).
pub(crate) fn cat_gelu_tanh(a: &Tensor, m: &Tensor) -> Result<Option<Tensor>> {
    if !is_cpu_f32(&[a, m]) || a.rank() != 3 || m.rank() != 3 {
        return Ok(None);
    }
    let (b, l, ca) = a.dims3()?;
    let cm = m.dim(2)?;
    let rows_of = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.layout().stride()[2] == 1 {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let (a, m) = (rows_of(a)?, rows_of(m)?);
    let c = ca + cm;
    let mut out = vec![0f32; b * l * c];
    if out.is_empty() {
        return Ok(Some(Tensor::from_vec(out, (b, l, c), a.device())?));
    }
    {
        let (ag, al) = a.storage_and_layout();
        let (mg, ml) = m.storage_and_layout();
        let (Storage::Cpu(ac), Storage::Cpu(mc)) = (&*ag, &*mg) else {
            return Ok(None);
        };
        let (av, mv) = (ac.as_slice::<f32>()?, mc.as_slice::<f32>()?);
        let (a0, ast, m0, mst) = (
            al.start_offset(),
            al.stride(),
            ml.start_offset(),
            ml.stride(),
        );
        out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
            let (bi, li) = (row / l, row % l);
            let at = a0 + bi * ast[0] + li * ast[1];
            let mt = m0 + bi * mst[0] + li * mst[1];
            o[..ca].copy_from_slice(&av[at..at + ca]);
            gelu_into(&mut o[ca..], &mv[mt..mt + cm]);
        });
    }
    Ok(Some(Tensor::from_vec(out, (b, l, c), a.device())?))
}

crate::attention_cpu::with_avx2! {
/// `o = GELU(x)` (tanh form) through `0.5·(1 + tanh(u)) = 1 / (1 + e^(−2u))`.
fn gelu_into(o: &mut [f32], x: &[f32]) -> () {
    for (o, &v) in o.iter_mut().zip(x) {
        let u = 0.797_884_6 * v * (1.0 + 0.044_715 * v * v);
        *o = v / (1.0 + crate::attention_cpu::exp_approx(-2.0 * u));
    }
}
}

/// GELU (tanh approximation) for CPU f32 in one parallel pass, through
/// `0.5·(1 + tanh(u)) = 1 / (1 + e^(−2u))` and the vectorisable exp of the attention tiles
/// (libm's `tanhf` per element dominated candle's GELU).
pub(crate) fn gelu_tanh(x: &Tensor) -> Result<Option<Tensor>> {
    if !is_cpu_f32(&[x]) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let n = x.elem_count();
    let mut out = vec![0f32; n];
    {
        slice_of!(x, xg, xv);
        out.par_chunks_mut(4096)
            .zip(xv.par_chunks(4096))
            .for_each(|(o, xs)| {
                gelu_into(o, xs);
            });
    }
    Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
}
