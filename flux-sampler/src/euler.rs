//! The Euler step of rectified flow, and the img2img start (strength → start index, noising).

use candle::{DType, Tensor};

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

/// One Euler step `x + (t_prev − t_curr)·v` from `t_curr` to `t_prev`.
///
/// The precision follows `x`'s dtype, as in the references:
/// - f32: `dt·v` then `x + ·`, each rounded to f32;
/// - bf16: `bf16(dt·v)` then `bf16(x + ·)`, each computed in f32 and rounded to bf16 (BFL's two
///   bf16 ops; diffusers' f32 upcast gives the same bits, since its `dt·v` is a bf16 op too).
///
/// `v` is converted to `x`'s dtype first if they differ.
///
/// # Shapes
/// `x` and `v`: any shape, equal.
pub fn euler_step(x: &Tensor, v: &Tensor, t_curr: f32, t_prev: f32) -> Result<Tensor> {
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
    let dt = (t_prev as f64 - t_curr as f64) as f32;
    let xf = x.to_dtype(DType::F32)?;
    let vf = v.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let step = (vf * dt as f64)?;
    match dtype {
        DType::BF16 => {
            let step = step.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            Ok((xf + step)?.to_dtype(DType::BF16)?)
        }
        _ => Ok((xf + step)?),
    }
}

/// Which reference's strength → start-index rule to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StrengthConvention {
    /// BFL (`demo_st.py`): `t_idx = int((1 − strength)·N)`.
    #[default]
    Bfl,
    /// diffusers `FluxImg2ImgPipeline`: `t_start = int(max(N − min(N·strength, N), 0))`.
    Diffusers,
}

/// The index into an `N`-step schedule (`N + 1` entries) at which img2img starts.
///
/// Strength 1 starts at 0 (pure noise, all N steps); strength 0 starts at N (no step). The two
/// conventions differ through float truncation: strength 0.8, N = 50 gives BFL 9, diffusers 10.
pub fn img2img_start_index(num_steps: usize, strength: f64, convention: StrengthConvention) -> Result<usize> {
    if num_steps == 0 {
        return Err(Error::ZeroSteps);
    }
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::InvalidStrength(strength));
    }
    let n = num_steps as f64;
    let idx = match convention {
        StrengthConvention::Bfl => ((1.0 - strength) * n) as usize,
        StrengthConvention::Diffusers => {
            let init = (n * strength).min(n);
            (n - init).max(0.0) as usize
        }
    };
    Ok(idx.min(num_steps))
}

/// The img2img starting latent `t·noise + (1 − t)·x0` at schedule value `t`.
///
/// Precision follows `x0`'s dtype: in bf16 each product and the sum round to bf16, as BFL's
/// bf16 tensors do (diffusers additionally rounds `t` to bf16 first; pass `round_bf16(t)` to
/// reproduce it).
///
/// # Shapes
/// `noise` and `x0`: equal shapes (unpacked or packed latents).
pub fn noise_latents(x0: &Tensor, noise: &Tensor, t: f32) -> Result<Tensor> {
    same_shape("noise", x0, noise)?;
    let dtype = check_dtype("noise_latents", x0)?;
    if !(0.0..=1.0).contains(&t) {
        return Err(Error::NotFinite {
            what: "img2img t (must be in [0, 1])",
            value: t as f64,
        });
    }
    let n = noise.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let x = x0.to_dtype(DType::F32)?;
    let a = (n * t as f64)?;
    let b = (x * (1.0 - t as f64) as f32 as f64)?;
    match dtype {
        DType::BF16 => {
            let a = a.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            let b = b.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            Ok((a + b)?.to_dtype(DType::BF16)?)
        }
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
        assert_eq!(img2img_start_index(50, 0.8, StrengthConvention::Bfl).unwrap(), 9);
        assert_eq!(img2img_start_index(50, 0.8, StrengthConvention::Diffusers).unwrap(), 10);
        assert_eq!(img2img_start_index(28, 1.0, StrengthConvention::Bfl).unwrap(), 0);
        assert_eq!(img2img_start_index(28, 0.0, StrengthConvention::Diffusers).unwrap(), 28);
    }

    #[test]
    fn bad_input_is_typed() {
        assert!(matches!(
            img2img_start_index(10, f64::NAN, StrengthConvention::Bfl),
            Err(Error::InvalidStrength(_))
        ));
        assert!(matches!(
            img2img_start_index(10, -0.1, StrengthConvention::Bfl),
            Err(Error::InvalidStrength(_))
        ));
        assert!(matches!(img2img_start_index(0, 0.5, StrengthConvention::Bfl), Err(Error::ZeroSteps)));
        let a = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(euler_step(&a, &b, 1.0, 0.5), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(noise_latents(&a, &b, 0.5), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(true_cfg(&a, &b, 2.0), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(euler_step(&a, &a, f32::NAN, 0.5), Err(Error::NotFinite { .. })));
        let i = Tensor::zeros((1, 4), DType::I64, &Device::Cpu).unwrap();
        assert!(matches!(euler_step(&i, &i, 1.0, 0.5), Err(Error::UnsupportedDtype { .. })));
    }

    #[test]
    fn true_cfg_by_hand() {
        let pos = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let neg = Tensor::new(&[0.0f32, 4.0], &Device::Cpu).unwrap();
        let out = true_cfg(&pos, &neg, 3.0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out, vec![3.0, -2.0]);
    }
}
