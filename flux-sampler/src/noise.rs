//! Seeded starting noise, identical to PyTorch's CPU `torch.randn`.
//!
//! BFL draws the FLUX starting latent with
//! `torch.randn(shape, dtype=bfloat16, generator=torch.Generator("cpu").manual_seed(seed))`, and
//! diffusers draws it the same way with a CPU generator. This module reproduces that draw bit for
//! bit on every machine, so a seed gives the same image here as in the reference.
//!
//! How PyTorch (2.15) fills a contiguous tensor of `n ≥ 16` elements (`normal_fill`):
//! 1. draw uniforms from mt19937 (one 32-bit word each, keeping 24 bits, as f32);
//! 2. Box–Muller on each block of 16, in f32: `u1 = 1 − u[j]`, `u2 = u[j + 8]`,
//!    `r = sqrt(−2·ln u1)`, `θ = 2π·u2`, `out[j] = r·cos θ`, `out[j + 8] = r·sin θ` (j < 8);
//! 3. if `n` is not a multiple of 16, draw 16 fresh uniforms for the *last* 16 slots and
//!    transform them as one more block (overwriting part of the previous block). The f32 kernel
//!    first draws (and discards) a uniform for every leftover element; the bf16 kernel does not.
//! 4. bf16 output is the f32 result rounded to nearest even.
//!
//! The transcendental functions depend on the CPU kernel PyTorch picked ([`TorchCpuKernel`]):
//! x86-64 builds run an AVX2 kernel with Cephes-style polynomial `log`/`sincos`
//! (`avx_mathfun.h`) compiled with fused multiply-adds, reproduced here operation by operation
//! in scalar code; builds without AVX2 run libm's `logf`/`cosf`/`sinf`.
//!
//! Tensors of fewer than 16 elements use PyTorch's per-element double-precision Box–Muller with a
//! cached second sample; this is reproduced too.

use candle::{DType, Device, Tensor};
use half::bf16;

use crate::{Error, Result};

/// PyTorch's CPU generator: mt19937 seeded with the low 32 bits of the seed.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; 624],
    index: usize,
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`; PyTorch keeps only the low 32 bits.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32; // truncation is PyTorch's behaviour
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        TorchGenerator {
            state,
            index: 624,
            next_double_normal: None,
        }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// The next 32-bit word of the stream.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// Two words, the first as the high half (PyTorch's `random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// PyTorch's `normal_distribution<double>` (used for tensors under 16 elements).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// The dtype of the drawn noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseDtype {
    /// bf16, as BFL's `get_noise` and diffusers' bf16 pipelines draw it.
    #[default]
    Bf16,
    /// f32.
    F32,
}

impl NoiseDtype {
    /// The candle dtype of tensors in this format.
    pub fn dtype(self) -> DType {
        match self {
            NoiseDtype::Bf16 => DType::BF16,
            NoiseDtype::F32 => DType::F32,
        }
    }
}

/// Which of PyTorch's CPU normal kernels to reproduce. The choice was PyTorch's, made by the CPU
/// the *reference* ran on; our result for a given choice is the same on every machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TorchCpuKernel {
    /// x86-64 PyTorch with AVX2 (every Linux/Windows GPU box; AVX-512 CPUs use it too): Cephes
    /// polynomial `log`/`sincos` in f32 with fused multiply-adds.
    #[default]
    Avx2,
    /// PyTorch's portable kernel (builds without AVX2, e.g. aarch64 and Apple silicon): libm in f32.
    Portable,
}

/// What to reproduce: dtype and kernel. The default is [`NoiseOptions::BFL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoiseOptions {
    /// Output dtype.
    pub dtype: NoiseDtype,
    /// PyTorch CPU kernel.
    pub kernel: TorchCpuKernel,
}

impl NoiseOptions {
    /// bf16 noise from x86-64 PyTorch: what BFL's `get_noise` gives on a Linux GPU machine.
    pub const BFL: NoiseOptions = NoiseOptions {
        dtype: NoiseDtype::Bf16,
        kernel: TorchCpuKernel::Avx2,
    };
    /// f32 noise from x86-64 PyTorch.
    pub const F32: NoiseOptions = NoiseOptions {
        dtype: NoiseDtype::F32,
        kernel: TorchCpuKernel::Avx2,
    };
}

fn r16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Box–Muller on one block of 16 uniforms in f32 over libm (PyTorch's portable kernel).
fn block_portable(d: &mut [f32]) {
    let two_pi = 2.0f64 * std::f64::consts::PI;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // `2.0f * pi<double> * u2` is evaluated in double, then stored as float.
        let theta = (two_pi * u2 as f64) as f32;
        // fma(radius·cos θ, std = 1, mean = 0) is the product itself.
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

/// `a·b + c` with one rounding, as the compiled AVX2 kernel computes its contracted pairs.
#[inline]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// A single-precision constant written as the C source writes it (a double literal stored
/// into a float).
macro_rules! c32 {
    ($x:expr) => {
        ($x as f64) as f32
    };
}

/// Cephes-style natural log of the AVX2 kernel (x > 0), FMA-contracted as compiled.
fn avx_log(x: f32) -> f32 {
    let sqrthf = c32!(std::f64::consts::FRAC_1_SQRT_2); // the C source spells out 1/√2
    let p = [
        c32!(7.0376836292E-2),
        c32!(-1.1514610310E-1),
        c32!(1.1676998740E-1),
        c32!(-1.2420140846E-1),
        c32!(1.4249322787E-1),
        c32!(-1.6668057665E-1),
        c32!(2.0000714765E-1),
        c32!(-2.4999993993E-1),
        c32!(3.3333331174E-1),
    ];
    let q1 = c32!(-2.12194440e-4);
    let q2 = c32!(0.693359375);
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // mantissa in [0.5, 1)
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let small = m < sqrthf;
    let tmp = if small { m } else { 0.0 };
    m -= 1.0;
    if small {
        e -= 1.0;
    }
    m += tmp;
    let z = m * m;
    let mut y = p[0];
    for &c in &p[1..] {
        y = fma(y, m, c);
    }
    y *= m;
    let y = fma(y, z, e * q1);
    let y = fma(-z, 0.5, y);
    fma(e, q2, m + y)
}

/// Cephes-style sine and cosine of the AVX2 kernel (0 ≤ x < 8192), FMA-contracted as compiled.
/// The constants are the C source's literals, digit for digit.
#[allow(clippy::excessive_precision)]
fn avx_sincos(x: f32) -> (f32, f32) {
    let fopi = c32!(1.27323954473516);
    let dp1 = c32!(-0.78515625);
    let dp2 = c32!(-2.4187564849853515625e-4);
    let dp3 = c32!(-3.77489497744594108e-8);
    let s = [
        c32!(-1.9515295891E-4),
        c32!(8.3321608736E-3),
        c32!(-1.6666654611E-1),
    ];
    let c = [
        c32!(2.443315711809948E-005),
        c32!(-1.388731625493765E-003),
        c32!(4.166664568298827E-002),
    ];
    let sign_in = x.is_sign_negative();
    let mut x = x.abs();
    let mut j = (x * fopi) as i32; // truncation, as cvttps
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sin = j & 4 != 0;
    let poly_sin = j & 2 == 0; // the sine takes the sine polynomial
    let swap_cos = (j - 2) & 4 == 0;
    x = fma(y, dp1, x);
    x = fma(y, dp2, x);
    x = fma(y, dp3, x);
    let z = x * x;
    let mut pc = fma(c[0], z, c[1]);
    pc = fma(pc, z, c[2]);
    pc *= z;
    let pc = fma(pc, z, -(z * 0.5)) + 1.0;
    let mut ps = fma(s[0], z, s[1]);
    ps = fma(ps, z, s[2]);
    ps *= z;
    let ps = fma(ps, x, x);
    let (sin_v, cos_v) = if poly_sin { (ps, pc) } else { (pc, ps) };
    let sin_v = if sign_in != swap_sin { -sin_v } else { sin_v };
    let cos_v = if swap_cos { -cos_v } else { cos_v };
    (sin_v, cos_v)
}

/// Box–Muller on one block of 16 uniforms as x86-64 PyTorch's AVX2 kernel computes it.
fn block_avx2(d: &mut [f32]) {
    let two_pi = (2.0f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * avx_log(u1)).sqrt();
        let theta = two_pi * u2;
        let (s, c) = avx_sincos(theta);
        d[j] = radius * c;
        d[j + 8] = radius * s;
    }
}

/// Draws `numel` standard-normal values exactly as
/// `torch.randn(numel, dtype=…, generator=torch.Generator("cpu").manual_seed(seed))` does.
/// bf16 values are returned widened (exactly) to f32.
pub fn torch_randn(seed: u64, numel: usize, opts: NoiseOptions) -> Vec<f32> {
    torch_randn_with(&mut TorchGenerator::new(seed), numel, opts)
}

/// Like [`torch_randn`], continuing an existing generator (successive draws of one generator).
pub fn torch_randn_with(gen: &mut TorchGenerator, numel: usize, opts: NoiseOptions) -> Vec<f32> {
    let round = |v: f32| match opts.dtype {
        NoiseDtype::Bf16 => r16(v),
        NoiseDtype::F32 => v,
    };
    if numel < 16 {
        // Per element, in double, then cast (double → float → bf16 for bf16).
        return (0..numel).map(|_| round(gen.normal_f64() as f32)).collect();
    }
    let block: fn(&mut [f32]) = match opts.kernel {
        TorchCpuKernel::Avx2 => block_avx2,
        TorchCpuKernel::Portable => block_portable,
    };
    let full = numel - numel % 16;
    let mut data: Vec<f32> = (0..full).map(|_| gen.uniform_f32()).collect();
    if opts.dtype == NoiseDtype::F32 {
        // The f32 kernel draws a uniform for every element before transforming; the leftover
        // ones are overwritten by the tail block below. The bf16 kernel draws per block.
        data.extend((full..numel).map(|_| gen.uniform_f32()));
    } else {
        data.resize(numel, 0.0);
    }
    for chunk in data[..full].chunks_exact_mut(16) {
        block(chunk);
    }
    if full != numel {
        let tail = &mut data[numel - 16..];
        for v in tail.iter_mut() {
            *v = gen.uniform_f32();
        }
        block(tail);
    }
    if opts.dtype == NoiseDtype::Bf16 {
        for v in &mut data {
            *v = r16(*v);
        }
    }
    data
}

/// How an image size that is not a multiple of 16 maps to a latent size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SizeRounding {
    /// Reject sizes that are not multiples of 16 with [`Error::SizeNotMultipleOf16`].
    #[default]
    Strict,
    /// BFL's `get_noise`: latent side `2·ceil(side/16)`.
    Ceil,
    /// diffusers: latent side `2·(side/16)` (floor; diffusers warns and resizes the output).
    Floor,
}

/// The unpacked latent shape `(batch, 16, 2·⌈h/16⌉, 2·⌈w/16⌉)` (or floor / strict, see
/// [`SizeRounding`]) for an image of `height × width` pixels.
pub fn latent_shape(
    batch: usize,
    height: usize,
    width: usize,
    rounding: SizeRounding,
) -> Result<[usize; 4]> {
    if batch == 0 || height == 0 || width == 0 {
        return Err(Error::EmptySize {
            batch,
            height,
            width,
        });
    }
    let side = |s: usize| -> Result<usize> {
        match rounding {
            SizeRounding::Strict if !s.is_multiple_of(16) => {
                Err(Error::SizeNotMultipleOf16 { height, width })
            }
            SizeRounding::Strict | SizeRounding::Floor => Ok(2 * (s / 16)),
            SizeRounding::Ceil => Ok(2 * s.div_ceil(16)),
        }
    };
    let (h, w) = (side(height)?, side(width)?);
    if h == 0 || w == 0 {
        return Err(Error::SizeNotMultipleOf16 { height, width });
    }
    Ok([batch, 16, h, w])
}

/// The FLUX starting noise for `seed`: `torch.randn(shape, dtype, generator=cpu_gen(seed))` of the
/// unpacked latent `shape`, drawn on the CPU and then moved to `device`, so every device gets the
/// same values. The tensor's dtype is [`NoiseDtype::dtype`] of `opts.dtype`.
///
/// # Shapes
/// `shape` is usually [`latent_shape`]'s `(B, 16, h, w)`; any shape works.
pub fn seeded_noise(
    seed: u64,
    shape: &[usize],
    opts: NoiseOptions,
    device: &Device,
) -> Result<Tensor> {
    seeded_noise_with(&mut TorchGenerator::new(seed), shape, opts, device)
}

/// [`seeded_noise`] from an existing generator: successive calls are successive draws, as
/// diffusers' img2img takes the VAE posterior sample and then the noise from one generator.
pub fn seeded_noise_with(
    gen: &mut TorchGenerator,
    shape: &[usize],
    opts: NoiseOptions,
    device: &Device,
) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Err(Error::EmptyShape(shape.to_vec()));
    }
    let values = torch_randn_with(gen, numel, opts);
    let t = match opts.dtype {
        NoiseDtype::Bf16 => {
            let v: Vec<bf16> = values.into_iter().map(bf16::from_f32).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?
        }
        _ => Tensor::from_vec(values, shape, &Device::Cpu)?,
    };
    Ok(t.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_standard_stream() {
        // std::mt19937 with the default seed 5489: the 10000th output is 4123659995 (C++ standard).
        let mut g = TorchGenerator::new(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = g.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn seed_uses_low_32_bits() {
        assert_eq!(
            torch_randn(7, 32, NoiseOptions::F32),
            torch_randn(7 + (1 << 32), 32, NoiseOptions::F32)
        );
    }

    #[test]
    fn avx_log_and_sincos_are_close_to_libm() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((avx_log(x) - x.ln()).abs() < 1e-6, "log {x}");
            let t = x * std::f32::consts::TAU;
            let (s, c) = avx_sincos(t);
            assert!(
                (s - t.sin()).abs() < 1e-6 && (c - t.cos()).abs() < 1e-6,
                "sincos {t}"
            );
        }
    }
}
