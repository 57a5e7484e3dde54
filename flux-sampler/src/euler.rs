//! The Euler step of rectified flow, and the img2img start (strength → start index, noising).

use candle::{DType, Tensor};

use crate::timestep::round_bf16;
use crate::{Error, Result};

fn same_shape(what: &'static str, expected: &Tensor, got: &Tensor) -> Result<()> {
    if expected.dims() != got.dims() {
        return Err(Error::ShapeMismatch {
            what,
            expected: expected.dims().to_vec(),
            got: got.dims().to_vec(),
        });
    }
    Ok(())
}

fn check_dtype(what: &'static str, t: &Tensor) -> Result<DType> {
    match t.dtype() {
        d @ (DType::F32 | DType::BF16) => Ok(d),
        dtype => Err(Error::UnsupportedDtype {
            what,
            dtype,
            supported: "f32, bf16",
        }),
    }
}

/// Which reference implementation's arithmetic to reproduce where BFL and diffusers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reference {
    /// black-forest-labs/flux.
    #[default]
    Bfl,
    /// diffusers' `FluxPipeline` family with `FlowMatchEulerDiscreteScheduler`.
    Diffusers,
}

fn bf16_round_trip(t: Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

/// One Euler step `x + (t_prev − t_curr)·v` from `t_curr` to `t_prev`.
///
/// The precision follows `x`'s dtype, as in the references:
/// - f32: `dt·v` then `x + ·`, each rounded to f32 (both references agree);
/// - bf16, [`Reference::Bfl`]: `bf16(dt·v)` then `bf16(x + ·)`, each computed in f32 and rounded
///   to bf16 (BFL's two bf16 ops);
/// - bf16, [`Reference::Diffusers`]: the scheduler's `dt` is a 0-dim f32 tensor, which PyTorch
///   rounds to bf16 before multiplying the bf16 velocity: `bf16(x + bf16(bf16(dt)·v))`.
///
/// `v` is converted to `x`'s dtype first if they differ.
///
/// # Shapes
/// `x` and `v`: any shape, equal.
pub fn euler_step(
    x: &Tensor,
    v: &Tensor,
    t_curr: f32,
    t_prev: f32,
    reference: Reference,
) -> Result<Tensor> {
    same_shape("velocity", x, v)?;
    let dtype = check_dtype("euler_step", x)?;
    check_dtype("euler_step velocity", v)?;
    for (what, value) in [("t_curr", t_curr), ("t_prev", t_prev)] {
        if !value.is_finite() {
            return Err(Error::NotFinite {
                what,
                value: value as f64,
            });
        }
    }
    // dt is a double in BFL and an f32 difference in diffusers: both round to the same f32.
    let mut dt = (t_prev as f64 - t_curr as f64) as f32;
    if dtype == DType::BF16 && reference == Reference::Diffusers {
        dt = round_bf16(dt);
    }
    let xf = x.to_dtype(DType::F32)?;
    let vf = v.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let step = (vf * dt as f64)?;
    match dtype {
        DType::BF16 => Ok((xf + bf16_round_trip(step)?)?.to_dtype(DType::BF16)?),
        _ => Ok((xf + step)?),
    }
}

/// The index into an `N`-step schedule (`N + 1` entries) at which img2img starts.
///
/// - [`Reference::Bfl`] (`demo_st.py`): `t_idx = int((1 − strength)·N)`;
/// - [`Reference::Diffusers`] (`FluxImg2ImgPipeline.get_timesteps`):
///   `t_start = int(max(N − min(N·strength, N), 0))`.
///
/// Strength 1 starts at 0 (pure noise, all N steps); strength 0 starts at N (no step). The two
/// conventions differ through float truncation: strength 0.8, N = 50 gives BFL 9, diffusers 10.
pub fn img2img_start_index(num_steps: usize, strength: f64, reference: Reference) -> Result<usize> {
    if num_steps == 0 {
        return Err(Error::ZeroSteps);
    }
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::InvalidStrength(strength));
    }
    let n = num_steps as f64;
    let idx = match reference {
        Reference::Bfl => ((1.0 - strength) * n) as usize,
        Reference::Diffusers => {
            let init = (n * strength).min(n);
            (n - init).max(0.0) as usize
        }
    };
    Ok(idx.min(num_steps))
}

/// The img2img starting latent `t·noise + (1 − t)·x0` at schedule value `t`.
///
/// `t` is a double as in the references (BFL takes it from the schedule's `tolist()`), so
/// `1 − t` is formed in f64 before the f32 multiply. Precision follows `x0`'s dtype:
/// - f32: each product and the sum round to f32;
/// - bf16, [`Reference::Bfl`]: each product and the sum round to bf16;
/// - [`Reference::Diffusers`] (`scale_noise`): `t` is a tensor of the latent dtype, so it is
///   rounded to that dtype first and `1 − t` is an op in that dtype too.
///
/// # Shapes
/// `noise` and `x0`: equal shapes (unpacked or packed latents).
pub fn noise_latents(x0: &Tensor, noise: &Tensor, t: f64, reference: Reference) -> Result<Tensor> {
    same_shape("noise", x0, noise)?;
    let dtype = check_dtype("noise_latents", x0)?;
    if !(0.0..=1.0).contains(&t) {
        return Err(Error::NotFinite {
            what: "img2img t (must be in [0, 1])",
            value: t,
        });
    }
    let n = noise.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let x = x0.to_dtype(DType::F32)?;
    let (a, b) = match (reference, dtype) {
        (Reference::Bfl, _) => (t, 1.0 - t),
        // diffusers: sigma is a tensor of the latent dtype, so are `1 − sigma` and its rounding.
        (Reference::Diffusers, DType::BF16) => {
            let t = round_bf16(t as f32);
            (t as f64, round_bf16(1.0 - t) as f64)
        }
        (Reference::Diffusers, _) => {
            let t = t as f32;
            (t as f64, (1.0 - t) as f64)
        }
    };
    let a = (n * a)?;
    let b = (x * b)?;
    match dtype {
        DType::BF16 => Ok((bf16_round_trip(a)? + bf16_round_trip(b)?)?.to_dtype(DType::BF16)?),
        _ => Ok((a + b)?),
    }
}

/// True classifier-free guidance (diffusers' `true_cfg_scale`): `neg + scale·(pos − neg)`.
///
/// # Shapes
/// `pos` and `neg`: equal shapes.
pub fn true_cfg(pos: &Tensor, neg: &Tensor, scale: f32) -> Result<Tensor> {
    same_shape("negative prediction", pos, neg)?;
    if !scale.is_finite() {
        return Err(Error::NotFinite {
            what: "true_cfg scale",
            value: scale as f64,
        });
    }
    Ok((neg + ((pos - neg)? * scale as f64)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn strength_examples_from_the_spec() {
        assert_eq!(img2img_start_index(50, 0.8, Reference::Bfl).unwrap(), 9);
        assert_eq!(
            img2img_start_index(50, 0.8, Reference::Diffusers).unwrap(),
            10
        );
        assert_eq!(img2img_start_index(28, 1.0, Reference::Bfl).unwrap(), 0);
        assert_eq!(
            img2img_start_index(28, 0.0, Reference::Diffusers).unwrap(),
            28
        );
    }

    #[test]
    fn bad_input_is_typed() {
        assert!(matches!(
            img2img_start_index(10, f64::NAN, Reference::Bfl),
            Err(Error::InvalidStrength(_))
        ));
        assert!(matches!(
            img2img_start_index(10, -0.1, Reference::Bfl),
            Err(Error::InvalidStrength(_))
        ));
        assert!(matches!(
            img2img_start_index(0, 0.5, Reference::Bfl),
            Err(Error::ZeroSteps)
        ));
        let a = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            euler_step(&a, &b, 1.0, 0.5, Reference::Bfl),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            noise_latents(&a, &b, 0.5, Reference::Bfl),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            true_cfg(&a, &b, 2.0),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            euler_step(&a, &a, f32::NAN, 0.5, Reference::Bfl),
            Err(Error::NotFinite { .. })
        ));
        let i = Tensor::zeros((1, 4), DType::I64, &Device::Cpu).unwrap();
        assert!(matches!(
            euler_step(&i, &i, 1.0, 0.5, Reference::Bfl),
            Err(Error::UnsupportedDtype { .. })
        ));
    }

    #[test]
    fn true_cfg_by_hand() {
        let pos = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let neg = Tensor::new(&[0.0f32, 4.0], &Device::Cpu).unwrap();
        let out = true_cfg(&pos, &neg, 3.0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out, vec![3.0, -2.0]);
    }
}
