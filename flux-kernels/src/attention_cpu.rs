//! Tiled attention with an online softmax for CPU f32: flash attention's schedule on the CPU.
//!
//! For each (batch, head) and each block of [`BR`] query rows, keys and values stream through in
//! chunks of [`BC`]: the block's scores against one chunk (a small gemm), a running row maximum
//! and row sum, the output rows rescaled when the maximum grows, and `P·V` accumulated by a
//! second gemm. Memory is O(L) per head (one `BR × BC` score tile per worker) instead of the
//! composite path's `H × L × L` scores, and every pass over the scores stays in cache.

use candle::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Query rows per block.
const BR: usize = 128;
/// Keys per chunk.
const BC: usize = 256;

/// A CPU f32 view `(B, H, L, D)` whose rows are contiguous: its storage slice, the offset of
/// element 0 and the strides of B, H and L. Views with a strided last dim are copied first.
struct Rows {
    t: Tensor,
}

impl Rows {
    fn new(t: &Tensor) -> Result<Self> {
        let t = if t.layout().stride()[3] == 1 || t.dim(3)? <= 1 {
            t.clone()
        } else {
            t.contiguous()?
        };
        Ok(Rows { t })
    }

    /// `(offset, [s_b, s_h, s_l])`.
    fn geometry(&self) -> (usize, [usize; 3]) {
        let l = self.t.layout();
        let st = l.stride();
        (l.start_offset(), [st[0], st[1], st[2]])
    }
}

/// The output pointer, shared by the workers: each (batch, head) writes its own rows only.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the workers write disjoint rows (one (batch, head) each).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `i` must lie inside the output.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        // SAFETY: the caller keeps `i` inside the output.
        unsafe { self.0.add(i) }
    }
}

/// `softmax(q·kᵀ·scale)·v` for f32 CPU views `(B, H, Lq, D)`, `(B, H, Lk, D)`, `(B, H, Lk, Dv)`
/// with any batch, head and row strides (the DiT passes slices of its projections; nothing is
/// copied unless a row itself is strided). Returns `(B, H, Lq, Dv)`, or `(B, Lq, H·Dv)` when
/// `tokens_out` (the layout the output projection reads); `None` when the inputs are not f32
/// on the CPU.
pub(crate) fn attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    tokens_out: bool,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || [q, k, v].iter().any(|t| t.dtype() != DType::F32) {
        return Ok(None);
    }
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let dv = v.dim(3)?;
    let shape: Vec<usize> = if tokens_out {
        vec![b, lq, h * dv]
    } else {
        vec![b, h, lq, dv]
    };
    if lk == 0 {
        return Ok(None); // no keys: the composite path says what it makes of that
    }
    if b * h * lq * dv == 0 {
        return Ok(Some(Tensor::zeros(shape, DType::F32, q.device())?));
    }
    let (q, k, v) = (Rows::new(q)?, Rows::new(k)?, Rows::new(v)?);
    let ((qo, qs), (ko, ks), (vo, vs)) = (q.geometry(), k.geometry(), v.geometry());
    // every element of the output is written once, by the worker of its (batch, head)
    let mut out = vec![0f32; b * h * lq * dv];
    // (batch, head, row) → offset in `out`, and the row stride
    let (o_b, o_h, o_l) = if tokens_out {
        (lq * h * dv, dv, h * dv)
    } else {
        (h * lq * dv, lq * dv, dv)
    };
    {
        let (qg, _) = q.t.storage_and_layout();
        let (kg, _) = k.t.storage_and_layout();
        let (vg, _) = v.t.storage_and_layout();
        let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qg, &*kg, &*vg) else {
            return Ok(None);
        };
        let (qv, kv, vv) = (
            qc.as_slice::<f32>()?,
            kc.as_slice::<f32>()?,
            vc.as_slice::<f32>()?,
        );
        let o = Out(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let qh = &qv[qo + bi * qs[0] + hi * qs[1]..];
            let kh = &kv[ko + bi * ks[0] + hi * ks[1]..];
            let vh = &vv[vo + bi * vs[0] + hi * vs[1]..];
            // SAFETY: this head's rows of `out` (offset below, `lq` rows of `dv` at stride
            // `o_l`) lie inside `out` and no other worker writes them.
            let oh = unsafe { o.at(bi * o_b + hi * o_h) };
            let g = Geometry {
                lq,
                lk,
                d,
                dv,
                q_rs: qs[2],
                k_rs: ks[2],
                v_rs: vs[2],
                o_rs: o_l,
            };
            head(qh, kh, vh, oh, &g, scale);
        });
    }
    Ok(Some(Tensor::from_vec(out, shape, q.t.device())?))
}

/// Sizes and row strides of one (batch, head).
struct Geometry {
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    q_rs: usize,
    k_rs: usize,
    v_rs: usize,
    o_rs: usize,
}

/// One (batch, head): `o (lq × dv) = softmax(q kᵀ · scale) v`. `q`, `k`, `v` start at the head's
/// first row (rows `g.*_rs` apart, each contiguous); `o` points at the head's first output row.
fn head(q: &[f32], k: &[f32], v: &[f32], o: *mut f32, g: &Geometry, scale: f32) {
    let Geometry {
        lq,
        lk,
        d,
        dv,
        q_rs,
        k_rs,
        v_rs,
        o_rs,
    } = *g;
    // the last row of each view ends inside its slice
    assert!((lq - 1) * q_rs + d <= q.len() && (lk - 1) * k_rs + d <= k.len());
    assert!((lk - 1) * v_rs + dv <= v.len());
    let mut s = vec![0f32; BR * BC];
    let mut acc = vec![0f32; BR * dv];
    // the block's query rows times the softmax scale, so the scores come out scaled
    let mut qb = vec![0f32; BR * d];
    let mut row_max = [0f32; BR];
    let mut row_sum = [0f32; BR];
    for r0 in (0..lq).step_by(BR) {
        let br = BR.min(lq - r0);
        let ob = &mut acc[..br * dv];
        ob.fill(0.0);
        row_max[..br].fill(f32::NEG_INFINITY);
        row_sum[..br].fill(0.0);
        for (i, dst) in qb.chunks_exact_mut(d).take(br).enumerate() {
            let src = &q[(r0 + i) * q_rs..(r0 + i) * q_rs + d];
            for (x, &y) in dst.iter_mut().zip(src) {
                *x = y * scale;
            }
        }
        for c0 in (0..lk).step_by(BC) {
            let bc = BC.min(lk - c0);
            // s (br × bc) = scale · q[r0..] · k[c0..]ᵀ
            // SAFETY: every pointer and stride below stays inside its slice (asserted above):
            // qb br × d, k rows c0..c0+bc (read transposed), s br × bc row-major.
            unsafe {
                gemm::gemm(
                    br,
                    bc,
                    d,
                    s.as_mut_ptr(),
                    1,
                    bc as isize,
                    false,
                    qb.as_ptr(),
                    1,
                    d as isize,
                    k.as_ptr().add(c0 * k_rs),
                    k_rs as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for i in 0..br {
                let row = &mut s[i * bc..(i + 1) * bc];
                let mx = max_of(row);
                let m_new = row_max[i].max(mx);
                let alpha = (row_max[i] - m_new).exp();
                let sum = exp_and_sum(row, m_new);
                row_sum[i] = row_sum[i] * alpha + sum;
                row_max[i] = m_new;
                if alpha != 1.0 {
                    for x in &mut ob[i * dv..(i + 1) * dv] {
                        *x *= alpha;
                    }
                }
            }
            // ob (br × dv) += p (br × bc) · v[c0..] (bc × dv)
            // SAFETY: as above; ob is br × dv row-major, v rows c0..c0+bc.
            unsafe {
                gemm::gemm(
                    br,
                    dv,
                    bc,
                    ob.as_mut_ptr(),
                    1,
                    dv as isize,
                    true,
                    s.as_ptr(),
                    1,
                    bc as isize,
                    v.as_ptr().add(c0 * v_rs),
                    1,
                    v_rs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        for i in 0..br {
            let inv = 1.0 / row_sum[i];
            // SAFETY: output row r0 + i of this head (see the caller).
            let dst = unsafe { std::slice::from_raw_parts_mut(o.add((r0 + i) * o_rs), dv) };
            for (x, &a) in dst.iter_mut().zip(&ob[i * dv..(i + 1) * dv]) {
                *x = a * inv;
            }
        }
    }
}

/// Runs `$body` compiled for AVX2 when the CPU has it (detected once, then a cached check),
/// else as built: the default x86-64 target has only SSE2, where these loops run at half width.
/// Both paths compute the same results (no FMA contraction in either).
macro_rules! with_avx2 {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        pub(crate) fn $name($($a: $t),*) -> $r {
            #[inline(always)]
            fn body($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            {
                // `unsafe fn`: a safe `#[target_feature]` fn needs Rust 1.86, the workspace
                // supports 1.85
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($a: $t),*) -> $r {
                    body($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (just checked).
                    return unsafe { avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use with_avx2;

with_avx2! {
/// The row's maximum (8 running maxima so that the loop vectorises).
fn max_of(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            m[j] = m[j].max(c[j]);
        }
    }
    let mx = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    chunks.remainder().iter().fold(mx, |a, &b| a.max(b))
}
}

with_avx2! {
/// `row = exp(row − m)`, returning the row's sum (8 running sums).
fn exp_and_sum(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for j in 0..8 {
            c[j] = exp_approx(c[j] - m);
            acc[j] += c[j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - m);
        sum += *x;
    }
    sum
}
}

/// `e^x` for `x ≤ 0` to about 1 ulp (Cody–Waite reduction by ln 2 in two parts, degree-7
/// polynomial, scale by 2ⁿ through the exponent bits), written so that loops over it vectorise;
/// libm's `expf` per score was a large share of the attention time. Inputs below −87 give
/// ≈ 1e-38 instead of 0, which no softmax sum can see.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // round to nearest through the 1.5·2²³ trick (vectorises, unlike `round`): the low bits of
    // `t` hold n in two's complement
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r)
        * r
        + r
        + 1.0;
    // 2ⁿ from t's bits by integer ops only (n + 127 is in 1..=254 after the clamp; the bits of
    // 1.5·2²³ shift out), where `n as i32` would be a scalar saturating conversion
    let bits = t.to_bits().wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_approx_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (super::exp_approx(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_7;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(super::exp_approx(0.0), 1.0);
        assert!(super::exp_approx(f32::NEG_INFINITY) < 1e-37);
    }
}
