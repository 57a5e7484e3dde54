//! Tiled attention with an online softmax for CPU f32: flash attention's schedule on the CPU.
//!
//! Each task is one block of [`BR`] query rows of one (batch, head), so that every core has
//! work at any batch, head count and length. Keys and values stream through in chunks of
//! [`BC`]: the block's scores against one chunk, a running maximum and sum per query, the
//! output rescaled when the maximum grows, and `P·V` accumulated, all in the task's scratch
//! (reused from task to task, nothing allocated per tile). Memory is O(L) per head instead of
//! the composite path's `H × L × L` scores, and every pass over the scores stays in cache: the
//! block is worked in slabs of one tile's width of queries, each slab's query, score and output
//! buffers dense (`[row][width]`), so that a slab's scores for one chunk (64 × 64 f32 with
//! AVX-512, 16 KiB) stay in L1 between `K·Qᵀ`, the softmax and `P·V`.
//!
//! Both products run one register-tiled kernel ([`tiles`]: AVX-512, AVX2 + FMA or portable,
//! chosen at run time), with the query block, transposed, as its right-hand side: the scores
//! are computed transposed (`Sᵀ = K·Qᵀ`, keys by queries) and so is the output
//! (`Oᵀ += Vᵀ·Sᵀ`), which lets K and V be read in place, row by row as the projections left
//! them, and the softmax run across a row of queries at a time.

use candle::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Query rows per task (a multiple of every tile's width).
const BR: usize = 128;
/// Keys per chunk (64 measured faster than 32 or 128 on an AVX-512 EPYC: a slab of scores fits L1).
const BC: usize = 64;

/// The instruction sets the tiles are written for (a const parameter of the kernels):
/// AVX-512F, 6 × 64 tiles in 24 of the 32 `zmm` registers;
const AVX512: u8 = 2;
/// AVX2 and FMA, 6 × 16 tiles in 12 of the 16 `ymm` registers;
const AVX2: u8 = 1;
/// anything else, the same 6 × 16 tile in plain Rust.
const PORTABLE: u8 = 0;

/// The best of the instruction sets above that this CPU has.
fn detect_isa() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return AVX512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return AVX2;
        }
    }
    PORTABLE
}

/// Rows of every register tile: keys in `K·Qᵀ`, value channels in `Vᵀ·Sᵀ`.
const MR: usize = 6;

/// Columns (queries) of `isa`'s register tile: four `zmm` or two `ymm` registers (with AVX-512,
/// six broadcasts feed 24 multiply-adds per step, as in gemm's own AVX-512 kernel).
const fn nr(isa: u8) -> usize {
    if isa == AVX512 {
        64
    } else {
        16
    }
}

// a query block is whole tiles of every width
const _: () = assert!(
    BR.is_multiple_of(nr(AVX512)) && BR.is_multiple_of(nr(AVX2)) && BR.is_multiple_of(nr(PORTABLE))
);

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

/// The output pointer, shared by the workers: each task writes its own rows only.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the workers write disjoint rows (one block of one (batch, head) each).
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
    tiled_with(detect_isa(), q, k, v, scale, tokens_out)
}

/// [`attention_tiled`] with the tiles of `isa`, which the CPU must have.
fn tiled_with(
    isa: u8,
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
    // every element of the output is written once, by the task of its query block
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
        let blocks = lq.div_ceil(BR);
        (0..b * h * blocks).into_par_iter().for_each_init(
            || Scratch::new(d, dv),
            |scratch, task| {
                let (bh, blk) = (task / blocks, task % blocks);
                let (bi, hi) = (bh / h, bh % h);
                let qh = &qv[qo + bi * qs[0] + hi * qs[1]..];
                let kh = &kv[ko + bi * ks[0] + hi * ks[1]..];
                let vh = &vv[vo + bi * vs[0] + hi * vs[1]..];
                // SAFETY: this head's rows of `out` (offset below, `lq` rows of `dv` at stride
                // `o_l`) lie inside `out`, and of them this task writes its block's only.
                let oh = unsafe { o.at(bi * o_b + hi * o_h) };
                block(isa, qh, kh, vh, oh, &g, scale, blk * BR, scratch);
            },
        );
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

/// One worker's buffers, reused from task to task; every one is [`BR`] queries wide.
struct Scratch {
    /// The query block times the scale, transposed: `[channel][query]`.
    qt: Vec<f32>,
    /// `Sᵀ` of one key chunk, then its exponentials `Pᵀ`: `[key][query]`.
    st: Vec<f32>,
    /// The unnormalised output `Oᵀ`: `[value channel][query]`.
    ot: Vec<f32>,
    /// Per query: running maximum, running sum, this chunk's rescale factor.
    max: [f32; BR],
    sum: [f32; BR],
    alpha: [f32; BR],
}

impl Scratch {
    fn new(d: usize, dv: usize) -> Self {
        Scratch {
            qt: vec![0.0; d * BR],
            st: vec![0.0; BC * BR],
            ot: vec![0.0; dv * BR],
            max: [0.0; BR],
            sum: [0.0; BR],
            alpha: [0.0; BR],
        }
    }
}

/// Query rows `r0..r0 + BR` (or to the end) of one (batch, head): `o = softmax(q kᵀ · scale) v`.
/// `q`, `k`, `v` start at the head's first row (rows `g.*_rs` apart, each contiguous); `o`
/// points at the head's first output row. With `isa`'s tiles (from [`detect_isa`]).
#[allow(clippy::too_many_arguments)]
fn block(
    isa: u8,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: *mut f32,
    g: &Geometry,
    scale: f32,
    r0: usize,
    s: &mut Scratch,
) {
    // the last row of each view ends inside its slice: every read below stays inside
    assert!((g.lq - 1) * g.q_rs + g.d <= q.len() && (g.lk - 1) * g.k_rs + g.d <= k.len());
    assert!((g.lk - 1) * g.v_rs + g.dv <= v.len());
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(
            q: &[f32],
            k: &[f32],
            v: &[f32],
            o: *mut f32,
            g: &Geometry,
            scale: f32,
            r0: usize,
            s: &mut Scratch,
        ) {
            // SAFETY: the caller's.
            unsafe { block_body::<AVX512>(q, k, v, o, g, scale, r0, s) }
        }
        /// # Safety
        /// The CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            q: &[f32],
            k: &[f32],
            v: &[f32],
            o: *mut f32,
            g: &Geometry,
            scale: f32,
            r0: usize,
            s: &mut Scratch,
        ) {
            // SAFETY: the caller's.
            unsafe { block_body::<AVX2>(q, k, v, o, g, scale, r0, s) }
        }
        match isa {
            // SAFETY: `detect_isa` found AVX-512F.
            AVX512 => return unsafe { avx512(q, k, v, o, g, scale, r0, s) },
            // SAFETY: `detect_isa` found AVX2 and FMA.
            AVX2 => return unsafe { avx2(q, k, v, o, g, scale, r0, s) },
            _ => {}
        }
    }
    let _ = isa;
    // SAFETY: the portable tiles need nothing of the CPU.
    unsafe { block_body::<PORTABLE>(q, k, v, o, g, scale, r0, s) }
}

/// [`block`]'s work with the tiles of `ISA`.
///
/// # Safety
/// The CPU has `ISA` (AVX-512F, or AVX2 and FMA).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block_body<const ISA: u8>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: *mut f32,
    g: &Geometry,
    scale: f32,
    r0: usize,
    s: &mut Scratch,
) {
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
    let nr = nr(ISA);
    let br = BR.min(lq - r0);
    // whole tiles; the queries past `br` are zeros and their results unused
    let w = br.div_ceil(nr) * nr;
    // every buffer is `nr`-wide slabs of queries, each `[row][nr]` and contiguous, so that a
    // tile's right-hand side and result are dense (rows `BR` apart would use a fraction of the
    // cache's sets); slab `j / nr` of a buffer with `rows` rows starts at `(j / nr)·rows·nr`
    for r in 0..br {
        let src = &q[(r0 + r) * q_rs..(r0 + r) * q_rs + d];
        let dst = &mut s.qt[(r / nr) * d * nr + r % nr..];
        for (c, &x) in src.iter().enumerate() {
            dst[c * nr] = x * scale;
        }
    }
    for r in br..w {
        let dst = &mut s.qt[(r / nr) * d * nr + r % nr..];
        for c in 0..d {
            dst[c * nr] = 0.0;
        }
    }
    s.ot[..dv * w].fill(0.0);
    s.max[..w].fill(f32::NEG_INFINITY);
    s.sum[..w].fill(0.0);
    for c0 in (0..lk).step_by(BC) {
        let bc = BC.min(lk - c0);
        let (kc, vc) = (&k[c0 * k_rs..], &v[c0 * v_rs..]);
        for j0 in (0..w).step_by(nr) {
            let qt = &s.qt[j0 * d..(j0 + nr) * d];
            let st = &mut s.st[j0 * BC..j0 * BC + bc * nr];
            let ot = &mut s.ot[j0 * dv..(j0 + nr) * dv];
            // Sᵀ (bc × nr) = K[c0..c0 + bc] · Qᵀ
            let mut i0 = 0;
            while i0 < bc {
                let m = MR.min(bc - i0);
                let c = &mut st[i0 * nr..];
                // SAFETY: the caller's (the CPU has `ISA`).
                unsafe { tiles::<ISA>(m, &kc[i0 * k_rs..], k_rs, 1, d, qt, nr, c, nr, false) };
                i0 += m;
            }
            let (max, sum, alpha) = (
                &mut s.max[j0..j0 + nr],
                &mut s.sum[j0..j0 + nr],
                &mut s.alpha[j0..j0 + nr],
            );
            softmax_update(st, max, sum, alpha);
            if alpha.iter().any(|&a| a != 1.0) {
                for row in ot.chunks_exact_mut(nr) {
                    for (x, &a) in row.iter_mut().zip(&*alpha) {
                        *x *= a;
                    }
                }
            }
            // Oᵀ (dv × nr) += Vᵀ (dv × bc) · Pᵀ (bc × nr)
            let mut i0 = 0;
            while i0 < dv {
                let m = MR.min(dv - i0);
                // SAFETY: as above.
                unsafe {
                    tiles::<ISA>(
                        m,
                        &vc[i0..],
                        1,
                        v_rs,
                        bc,
                        st,
                        nr,
                        &mut ot[i0 * nr..],
                        nr,
                        true,
                    )
                };
                i0 += m;
            }
        }
    }
    for r in 0..br {
        let inv = 1.0 / s.sum[r];
        let src = &s.ot[(r / nr) * dv * nr + r % nr..];
        // SAFETY: output row r0 + r of this head, which only this task writes (see the caller).
        let dst = unsafe { std::slice::from_raw_parts_mut(o.add((r0 + r) * o_rs), dv) };
        for (c, x) in dst.iter_mut().enumerate() {
            *x = src[c * nr] * inv;
        }
    }
}

/// `c[i][j] (+)= Σₚ a[i·a_rs + p·a_cs] · b[p·BR + j]` for `i < m ≤ MR`, `j < nr(ISA)`,
/// `p < k`, with `c` rows [`BR`] apart; `acc`: add to `c`, else overwrite it. Dispatches to
/// `ISA`'s register tile of `m` rows.
///
/// # Safety
/// The CPU has `ISA`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles<const ISA: u8>(
    m: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    k: usize,
    b: &[f32],
    b_rs: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    // every index the tile touches lies inside its slice
    let width = nr(ISA);
    assert!((1..=MR).contains(&m) && k >= 1);
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len());
    assert!((k - 1) * b_rs + width <= b.len() && (m - 1) * c_rs + width <= c.len());
    macro_rules! rows {
        ($($n:literal)*) => {
            match m {
                $($n => {
                    #[cfg(target_arch = "x86_64")]
                    {
                        if ISA == AVX512 {
                            // SAFETY: the CPU has AVX-512F (the caller's promise); the bounds
                            // were checked above.
                            unsafe {
                                tile_simd::<std::arch::x86_64::__m512, $n, { nr(AVX512) / 16 }>(a, a_rs, a_cs, k, b, b_rs, c, c_rs, acc)
                            };
                            return;
                        }
                        if ISA == AVX2 {
                            // SAFETY: as above, with AVX2 and FMA.
                            unsafe {
                                tile_simd::<std::arch::x86_64::__m256, $n, { nr(AVX2) / 8 }>(a, a_rs, a_cs, k, b, b_rs, c, c_rs, acc)
                            };
                            return;
                        }
                    }
                    tile::<$n, { nr(PORTABLE) }>(a, a_rs, a_cs, k, b, b_rs, c, c_rs, acc)
                })*
                _ => unreachable!(),
            }
        };
    }
    rows!(1 2 3 4 5 6);
}

/// A SIMD register of f32 lanes with fused multiply-add: what the register tile needs.
///
/// # Safety
/// Every method needs the CPU features of its type (AVX-512F for `__m512`, AVX2 and FMA for
/// `__m256`), and loads and stores need `LANES` values at the pointer.
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn splat(p: *const f32) -> Self;
    /// `a·b + self`, rounded once.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm512_set1_ps(*p) }
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm512_fmadd_ps(a, b, self) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for std::arch::x86_64::__m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm256_broadcast_ss(&*p) }
    }
    #[inline(always)]
    unsafe fn fma(self, a: Self, b: Self) -> Self {
        // SAFETY: the trait's contract.
        unsafe { std::arch::x86_64::_mm256_fmadd_ps(a, b, self) }
    }
}

/// [`tile`]`::<M, W·V::LANES>` in registers: the `M × W` vectors of sums stay in registers for
/// the whole `k` loop, each step loading `W` vectors of `b` and broadcasting `M` values of `a`
/// (AVX-512: 6 × 4 `zmm`; AVX2: 6 × 2 `ymm`).
///
/// # Safety
/// The CPU has `V`'s features; the bounds are [`tiles`]'s, with `W·V::LANES = nr(ISA)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_simd<V: Lanes, const M: usize, const W: usize>(
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    k: usize,
    b: &[f32],
    b_rs: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    // SAFETY: the caller's (see above): every pointer below stays inside its slice.
    unsafe {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let mut t = [[V::zero(); W]; M];
        if acc {
            for (i, row) in t.iter_mut().enumerate() {
                for (x, r) in row.iter_mut().enumerate() {
                    *r = V::load(c.add(i * c_rs + V::LANES * x));
                }
            }
        }
        for p in 0..k {
            let bp = b.add(p * b_rs);
            let bv: [V; W] = std::array::from_fn(|x| V::load(bp.add(V::LANES * x)));
            let ap = a.add(p * a_cs);
            for (i, row) in t.iter_mut().enumerate() {
                let ai = V::splat(ap.add(i * a_rs));
                for (r, &bx) in row.iter_mut().zip(&bv) {
                    *r = r.fma(ai, bx);
                }
            }
        }
        for (i, row) in t.iter().enumerate() {
            for (x, r) in row.iter().enumerate() {
                r.store(c.add(i * c_rs + V::LANES * x));
            }
        }
    }
}

/// One `M × N` tile of [`tiles`] (bounds checked there), portable: what CPUs without AVX2 run,
/// and the twin both SIMD tiles are tested against.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const M: usize, const N: usize>(
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    k: usize,
    b: &[f32],
    b_rs: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
) {
    let mut t = [[0f32; N]; M];
    if acc {
        for (i, row) in t.iter_mut().enumerate() {
            row.copy_from_slice(&c[i * c_rs..i * c_rs + N]);
        }
    }
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for p in 0..k {
        // SAFETY: `tiles` checked that row `p` of `b` (N values) and column `p` of `a`'s
        // `M` rows lie inside their slices.
        let bp: [f32; N] = unsafe { std::ptr::read_unaligned(b.add(p * b_rs).cast()) };
        for (i, row) in t.iter_mut().enumerate() {
            // SAFETY: as above.
            let ai = unsafe { *a.add(i * a_rs + p * a_cs) };
            for (x, &y) in row.iter_mut().zip(&bp) {
                *x += ai * y;
            }
        }
    }
    for (i, row) in t.iter().enumerate() {
        c[i * c_rs..i * c_rs + N].copy_from_slice(row);
    }
}

/// The online softmax's step over one chunk's `Sᵀ` for one slab of queries (keys × `n`
/// queries, `n` = `max.len()`): each query's new maximum, its rescale factor
/// `alpha = e^(old − new)`, the scores replaced by `e^(s − new)` and the running sum updated.
/// Vectorised across queries.
#[inline(always)]
fn softmax_update(st: &mut [f32], max: &mut [f32], sum: &mut [f32], alpha: &mut [f32]) {
    let n = max.len();
    let mut m = [0f32; BR];
    let m = &mut m[..n];
    m.copy_from_slice(max);
    for row in st.chunks_exact(n) {
        for (x, &y) in m.iter_mut().zip(row) {
            *x = x.max(y);
        }
    }
    let mut part = [0f32; BR];
    let part = &mut part[..n];
    for row in st.chunks_exact_mut(n) {
        for ((x, &mx), acc) in row.iter_mut().zip(&*m).zip(part.iter_mut()) {
            *x = exp_approx(*x - mx);
            *acc += *x;
        }
    }
    for j in 0..n {
        // the first chunk: −∞ − m, whose e^ is 0 through the clamp (≈ 1e-38 times a zero sum)
        alpha[j] = if max[j] == m[j] {
            1.0
        } else {
            exp_approx(max[j] - m[j])
        };
        sum[j] = sum[j] * alpha[j] + part[j];
        max[j] = m[j];
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
                // `unsafe fn`: the callers hold no AVX2 promise of their own
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
    /// The portable tiles and the SIMD ones compute the same sums (to rounding: FMA rounds
    /// once), for every row count, accumulating or not: the portable tile is what CPUs without
    /// AVX2 run, and the proptests only see the best tile the CPU has.
    #[test]
    fn portable_tiles_equal_the_simd_tiles() {
        use super::{nr, tile, tiles, BR, MR};
        let k = 37;
        let a: Vec<f32> = (0..MR * k * 3)
            .map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0)
            .collect();
        let b: Vec<f32> = (0..k * BR)
            .map(|i| ((i * 104_729) % 97) as f32 / 30.0 - 1.5)
            .collect();
        // a read with row stride 3k and column stride 3: the strides both products use
        let (a_rs, a_cs) = (3 * k, 3);
        for m in 1..=MR {
            let a = &a[..(m - 1) * a_rs + (k - 1) * a_cs + 1];
            for acc in [false, true] {
                // the 64-wide portable tile, checked by hand
                let mut want = vec![0.5f32; m * BR];
                macro_rules! portable64 {
                    ($($n:literal)*) => { match m { $($n => tile::<$n, 64>(a, a_rs, a_cs, k, &b, BR, &mut want, BR, acc),)* _ => unreachable!() } };
                }
                portable64!(1 2 3 4 5 6);
                for i in 0..m {
                    for j in 0..BR {
                        let dot: f32 = (0..k).map(|p| a[i * a_rs + p * a_cs] * b[p * BR + j]).sum();
                        let expect = if acc && j < 64 {
                            0.5 + dot
                        } else if j < 64 {
                            dot
                        } else {
                            0.5
                        };
                        assert!((want[i * BR + j] - expect).abs() < 1e-4, "m {m} ({i}, {j})");
                    }
                }
                let run = |isa: u8| {
                    let mut got = vec![0.5f32; m * BR];
                    // SAFETY: called only where the CPU has `isa`.
                    unsafe {
                        match isa {
                            super::AVX512 => tiles::<{ super::AVX512 }>(
                                m, a, a_rs, a_cs, k, &b, BR, &mut got, BR, acc,
                            ),
                            super::AVX2 => tiles::<{ super::AVX2 }>(
                                m, a, a_rs, a_cs, k, &b, BR, &mut got, BR, acc,
                            ),
                            _ => tiles::<{ super::PORTABLE }>(
                                m, a, a_rs, a_cs, k, &b, BR, &mut got, BR, acc,
                            ),
                        }
                    }
                    got
                };
                let same = |got: &[f32], width: usize, what: &str| {
                    for i in 0..m {
                        for j in 0..BR {
                            let (x, y) = (got[i * BR + j], want[i * BR + j]);
                            let y = if j < width { y } else { 0.5 };
                            assert!((x - y).abs() < 1e-4, "{what} m {m} ({i}, {j}): {x} vs {y}");
                        }
                    }
                };
                {
                    same(&run(super::PORTABLE), nr(super::PORTABLE), "portable");
                }
                #[cfg(target_arch = "x86_64")]
                {
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        same(&run(super::AVX2), nr(super::AVX2), "avx2");
                    }
                    if is_x86_feature_detected!("avx512f") {
                        same(&run(super::AVX512), nr(super::AVX512), "avx512");
                    }
                }
            }
        }
    }

    /// Every instruction set this CPU has (each lays its buffers out in slabs of its own tile
    /// width) against attention in f64, across the query-block, slab, key-chunk and tile-row
    /// edges; the proptests in `tests/ops.rs` see only the best of them.
    #[test]
    fn every_instruction_set_equals_f64_attention() {
        use candle::{Device, Tensor};
        let isas: Vec<u8> = [super::PORTABLE, super::AVX2, super::AVX512]
            .into_iter()
            .filter(|&i| i <= super::detect_isa())
            .collect();
        let val = |i: usize, m: usize| ((i * m) % 101) as f32 / 25.0 - 2.0;
        for (lq, lk, d, dv) in [
            (1, 1, 1, 1),
            (17, 65, 5, 7),
            (130, 131, 13, 3),
            (200, 70, 8, 13),
        ] {
            let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..lq * d).map(|i| val(i, 7919)).collect(),
                (0..lk * d).map(|i| val(i, 104_729)).collect(),
                (0..lk * dv).map(|i| val(i, 1299)).collect(),
            );
            let scale = 0.7f32;
            let mut want = vec![0f64; lq * dv];
            for r in 0..lq {
                let s: Vec<f64> = (0..lk)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|c| (q[r * d + c] * k[j * d + c]) as f64).sum();
                        dot * scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dv {
                    want[r * dv + c] =
                        (0..lk).map(|j| e[j] * v[j * dv + c] as f64).sum::<f64>() / z;
                }
            }
            let t = |x: Vec<f32>, l, w| Tensor::from_vec(x, (1, 1, l, w), &Device::Cpu).unwrap();
            let (q, k, v) = (t(q, lq, d), t(k, lk, d), t(v, lk, dv));
            for &isa in &isas {
                let got = super::tiled_with(isa, &q, &k, &v, scale, false)
                    .unwrap()
                    .unwrap();
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst < 2e-5,
                    "isa {isa}, {lq}×{lk}, d {d}, dv {dv}: off by {worst}"
                );
            }
        }
    }

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
