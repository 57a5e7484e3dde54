//! Scaled dot-product attention, the one copy every model calls.

use candle::{DType, Tensor, D};

use crate::{Error, Result};

/// Which CUDA attention kernel [`attention`] runs for CUDA tensors (process-wide; CPU tensors
/// never look at it). Chosen with [`set_flash_kernel`], or by the environment variable
/// `FLUX_CUDA_ATTENTION` (`auto`, `hopper-no-pingpong`, `mma.sync`) before the first call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlashKernel {
    /// On compute capability 9.x (H100, H200) with head dim 128, bf16/f16, the Hopper kernel
    /// (`cuda/flash_attn_sm90.cu`: TMA loads from a warp-specialised producer, wgmma products,
    /// ping-pong between two consumer warpgroups) when the build has it; the mma.sync kernel
    /// elsewhere. The default.
    #[default]
    Auto,
    /// As `Auto`, but the Hopper kernel's consumer warpgroups issue their products without the
    /// ping-pong (for comparison).
    HopperNoPingPong,
    /// Always the mma.sync kernel (sm_80 and later), the Hopper kernel's fallback.
    MmaSync,
}

impl FlashKernel {
    /// The environment variable that chooses the kernel.
    pub const ENV: &'static str = "FLUX_CUDA_ATTENTION";

    /// The name `FLUX_CUDA_ATTENTION` takes.
    pub fn name(self) -> &'static str {
        match self {
            FlashKernel::Auto => "auto",
            FlashKernel::HopperNoPingPong => "hopper-no-pingpong",
            FlashKernel::MmaSync => "mma.sync",
        }
    }
}

impl std::str::FromStr for FlashKernel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        use FlashKernel::*;
        crate::switch::parse_named(Self::ENV, s, &[Auto, HopperNoPingPong, MmaSync], Self::name)
    }
}

static FLASH_KERNEL: crate::switch::Switch<FlashKernel> =
    crate::switch::Switch::new(FlashKernel::ENV);

/// Chooses the CUDA attention kernel for this process (see [`FlashKernel`]).
pub fn set_flash_kernel(kernel: FlashKernel) {
    FLASH_KERNEL.set(kernel);
}

/// The CUDA attention kernel in use: the one [`set_flash_kernel`] chose, else
/// `FLUX_CUDA_ATTENTION`, else `Auto`. A value of the variable that names no kernel is an error.
pub fn flash_kernel() -> Result<FlashKernel> {
    FLASH_KERNEL.get()
}

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
/// On the CPU without bias or mask, a tiled online-softmax schedule (memory O(L) per head, the
/// score tiles stay in cache). With the `cuda` feature, CUDA tensors in bf16/f16 without bias or mask and with head dim 32,
/// 64 or 128 run the flash kernel (tensor cores, f32 accumulation, online softmax: memory O(L),
/// never the L×L scores); every other case runs the composite path, [`attention_composite`].
///
/// # Shapes
/// `q`: `(B, H, Lq, D)`, `k`: `(B, H, Lk, D)`, `v`: `(B, H, Lk, Dv)`. Returns `(B, H, Lq, Dv)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: AttnOpts) -> Result<Tensor> {
    let d = check_qkv(q, k, v)?;
    #[cfg(feature = "cuda")]
    if flash_eligible(q, k, v, &opts) {
        let op = crate::cuda::FlashAttn {
            scale: opts.scale.unwrap_or(1.0 / (d as f64).sqrt()) as f32,
            tokens_out: false,
        };
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        return Ok(q.apply_op3_no_bwd(&k, &v, &op)?);
    }
    if let Some(x) = tiled_cpu(q, k, v, &opts, d, false)? {
        return Ok(x);
    }
    composite(q, k, v, opts, d)
}

/// The CPU's tiled online-softmax path, for inputs without bias or mask: computed in f32 and
/// returned in `q`'s dtype, `(B, H, Lq, Dv)` or with `tokens_out` `(B, Lq, H·Dv)`. `None`
/// elsewhere.
fn tiled_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOpts,
    d: usize,
    tokens_out: bool,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || opts.bias.is_some() || opts.causal {
        return Ok(None);
    }
    let dtype = q.dtype();
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let scale = opts.scale.unwrap_or(1.0 / (d as f64).sqrt()) as f32;
    Ok(
        crate::attention_cpu::attention_tiled(&f(q)?, &f(k)?, &f(v)?, scale, tokens_out)?
            .map(|x| x.to_dtype(dtype))
            .transpose()?,
    )
}

/// [`attention`] followed by `(B, H, Lq, Dv) → (B, Lq, H·Dv)`, the token-major layout the
/// output projection wants. The CUDA kernel writes that layout directly.
pub fn attention_tokens(q: &Tensor, k: &Tensor, v: &Tensor, opts: AttnOpts) -> Result<Tensor> {
    let d = check_qkv(q, k, v)?;
    let (b, h, lq, _) = q.dims4()?;
    #[cfg(feature = "cuda")]
    if flash_eligible(q, k, v, &opts) {
        let op = crate::cuda::FlashAttn {
            scale: opts.scale.unwrap_or(1.0 / (d as f64).sqrt()) as f32,
            tokens_out: true,
        };
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        return Ok(q.apply_op3_no_bwd(&k, &v, &op)?.reshape((b, lq, h * d))?);
    }
    if let Some(x) = tiled_cpu(q, k, v, &opts, d, true)? {
        return Ok(x);
    }
    let x = composite(q, k, v, opts, d)?;
    let dv = x.dim(3)?;
    Ok(x.transpose(1, 2)?.reshape((b, lq, h * dv))?)
}

/// The composite path of [`attention`] (matmul, softmax, matmul in f32) on every device: the
/// plain twin the fused kernels are checked against, and the baseline of the GPU benchmarks.
pub fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, opts: AttnOpts) -> Result<Tensor> {
    let d = check_qkv(q, k, v)?;
    composite(q, k, v, opts, d)
}

/// Whether the CUDA flash kernel takes these inputs: CUDA, bf16/f16, no bias or mask, equal
/// head dims of a supported size. Others take the composite path.
#[cfg(feature = "cuda")]
fn flash_eligible(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOpts) -> bool {
    let d = q.dim(3).unwrap_or(0);
    q.device().is_cuda()
        && q.dim(2).is_ok_and(|l| l > 0)
        && k.dim(2).is_ok_and(|l| l > 0)
        && opts.bias.is_none()
        && !opts.causal
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && v.dim(3).ok() == Some(d)
        && crate::cuda::FLASH_HEAD_DIMS.contains(&d)
}

/// The kernel reads rows with 16-byte copies: views whose rows are not 8-element aligned are
/// copied first.
#[cfg(feature = "cuda")]
fn aligned(t: &Tensor) -> Result<Tensor> {
    let layout = t.layout();
    let st = layout.stride();
    let ok = st.len() == 4
        && st[3] == 1
        && st[..3].iter().all(|s| s % 8 == 0)
        && layout.start_offset().is_multiple_of(8);
    Ok(if ok { t.clone() } else { t.contiguous()? })
}

/// Ranks and shapes of q, k, v; returns the head dim.
fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<usize> {
    for (what, t) in [("attention q", q), ("attention k", k), ("attention v", v)] {
        if t.rank() != 4 {
            return Err(Error::RankMismatch {
                what,
                expected: 4,
                got: t.dims().to_vec(),
            });
        }
    }
    let (b, h, _, d) = q.dims4()?;
    let (kb, kh, lk, kd) = k.dims4()?;
    let (vb, vh, vl, _) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vl) != (b, h, lk) {
        return Err(Error::ShapeMismatch {
            what: "attention k/v (must match q in B, H and k's D; v's L must match k's)",
            expected: vec![b, h, lk, d],
            got: k.dims().to_vec(),
        });
    }
    Ok(d)
}

fn composite(q: &Tensor, k: &Tensor, v: &Tensor, opts: AttnOpts, d: usize) -> Result<Tensor> {
    let lq = q.dim(2)?;
    let lk = k.dim(2)?;
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
