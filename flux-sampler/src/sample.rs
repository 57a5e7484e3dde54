//! The sampling loop: Euler steps over a schedule with any denoiser.

use candle::Tensor;

use crate::euler::{euler_step, Reference};
use crate::schedule::validate_schedule;
use crate::timestep::{model_guidance, model_timestep, TimestepRounding};
use crate::{Error, Result};

/// What the denoiser and the progress callback learn about a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Step index, 0-based.
    pub index: usize,
    /// Number of model evaluations in this run.
    pub num_steps: usize,
    /// Schedule value at which the model is evaluated.
    pub t_curr: f32,
    /// Schedule value the step moves to.
    pub t_prev: f32,
    /// The timestep to hand to the model (before its `×1000`), rounded per
    /// [`SampleOptions::rounding`].
    pub model_t: f32,
    /// The guidance to hand to the model, rounded likewise; `None` for models without guidance.
    pub model_guidance: Option<f32>,
}

/// A velocity predictor: given the latent `x` at `info.t_curr`, returns `v` of `x`'s shape.
pub trait Denoiser {
    /// Predicts the velocity for one step.
    fn velocity(
        &mut self,
        x: &Tensor,
        info: &StepInfo,
    ) -> std::result::Result<Tensor, Box<dyn std::error::Error + Send + Sync>>;
}

impl<F, E> Denoiser for F
where
    F: FnMut(&Tensor, &StepInfo) -> std::result::Result<Tensor, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn velocity(
        &mut self,
        x: &Tensor,
        info: &StepInfo,
    ) -> std::result::Result<Tensor, Box<dyn std::error::Error + Send + Sync>> {
        self(x, info).map_err(Into::into)
    }
}

/// Options of [`sample`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SampleOptions {
    /// Rounding of the timestep and guidance handed to the model.
    pub rounding: TimestepRounding,
    /// Guidance scale for guidance-distilled models (dev); `None` for schnell.
    pub guidance: Option<f32>,
    /// Whose bf16 Euler arithmetic to reproduce (f32 updates are the same in both).
    pub reference: Reference,
}

/// Runs Euler steps from `timesteps[0]` to the last entry (usually 0), calling `denoiser` once
/// per step and `on_step` after each step with the new latent. The precision of the update
/// follows `x`'s dtype (see [`euler_step`]).
///
/// For img2img pass the schedule sliced at [`crate::img2img_start_index`] and the noised latent.
///
/// # Shapes
/// `x`: any shape (FLUX uses packed `(B, L_img, 64)`); the denoiser must return the same shape.
pub fn sample<D, C>(
    x: Tensor,
    timesteps: &[f32],
    opts: &SampleOptions,
    denoiser: &mut D,
    on_step: C,
) -> Result<Tensor>
where
    D: Denoiser + ?Sized,
    C: FnMut(&StepInfo, &Tensor),
{
    sample_with(x, timesteps, opts, denoiser, |_, x| Ok(x), on_step)
}

/// The steps [`sample`] takes over `timesteps` with `opts`, in order: what its denoiser is
/// called with, known before the loop (a model can prepare every step's conditioning at once).
pub fn step_infos(timesteps: &[f32], opts: &SampleOptions) -> Vec<StepInfo> {
    let num_steps = timesteps.len().saturating_sub(1);
    timesteps
        .windows(2)
        .enumerate()
        .map(|(index, w)| StepInfo {
            index,
            num_steps,
            t_curr: w[0],
            t_prev: w[1],
            model_t: model_timestep(w[0], opts.rounding),
            model_guidance: opts.guidance.map(|g| model_guidance(g, opts.rounding)),
        })
        .collect()
}

/// [`sample`] with `after_step` applied to each stepped latent before the next step (and
/// before `on_step` sees it): inpainting's re-noise-and-blend of the kept region.
pub fn sample_with<D, A, C>(
    x: Tensor,
    timesteps: &[f32],
    opts: &SampleOptions,
    denoiser: &mut D,
    mut after_step: A,
    mut on_step: C,
) -> Result<Tensor>
where
    D: Denoiser + ?Sized,
    A: FnMut(&StepInfo, Tensor) -> Result<Tensor>,
    C: FnMut(&StepInfo, &Tensor),
{
    validate_schedule(timesteps)?;
    if let Some(g) = opts.guidance {
        if !g.is_finite() {
            return Err(Error::NotFinite {
                what: "guidance",
                value: g as f64,
            });
        }
    }
    let mut x = x;
    for info in step_infos(timesteps, opts) {
        let index = info.index;
        let v = denoiser
            .velocity(&x, &info)
            .map_err(|source| Error::Denoiser {
                step: index,
                source,
            })?;
        x = after_step(
            &info,
            euler_step(&x, &v, info.t_curr, info.t_prev, opts.reference)?,
        )?;
        on_step(&info, &x);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device};

    #[test]
    fn constant_velocity_integrates_exactly() {
        // v = x1 - x0 constant: from noise at t = 1 the loop lands on x0 = noise - v at t = 0.
        let noise = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let v = Tensor::new(&[0.5f32, -1.0, 0.25], &Device::Cpu).unwrap();
        let ts = [1.0, 0.75, 0.5, 0.25, 0.0];
        let mut seen = vec![];
        let mut den = |_: &Tensor, _: &StepInfo| -> candle::Result<Tensor> { Ok(v.clone()) };
        let out = sample(noise, &ts, &SampleOptions::default(), &mut den, |i, _| {
            seen.push(i.index)
        })
        .unwrap();
        assert_eq!(out.to_vec1::<f32>().unwrap(), vec![0.5, -1.0, 0.25]);
        assert_eq!(seen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn denoiser_errors_name_the_step() {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let mut den = |_: &Tensor, i: &StepInfo| -> candle::Result<Tensor> {
            if i.index == 2 {
                candle::bail!("boom")
            }
            Tensor::zeros(4, DType::F32, &Device::Cpu)
        };
        let err = sample(
            x,
            &[1.0, 0.75, 0.5, 0.25, 0.0],
            &SampleOptions::default(),
            &mut den,
            |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, Error::Denoiser { step: 2, .. }), "{err}");
    }

    #[test]
    fn wrong_velocity_shape_is_an_error() {
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let mut den = |_: &Tensor, _: &StepInfo| Tensor::zeros(5, DType::F32, &Device::Cpu);
        let err = sample(
            x,
            &[1.0, 0.0],
            &SampleOptions::default(),
            &mut den,
            |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }

    #[test]
    fn rounding_reaches_the_denoiser() {
        let x = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let mut got = vec![];
        let opts = SampleOptions {
            rounding: TimestepRounding::Bfl,
            guidance: Some(3.5),
            ..Default::default()
        };
        let mut den = |x: &Tensor, i: &StepInfo| -> candle::Result<Tensor> {
            got.push((i.model_t, i.model_guidance));
            x.zeros_like()
        };
        sample(x, &[1.0, 0.75, 0.0], &opts, &mut den, |_, _| {}).unwrap();
        assert_eq!(got, vec![(1.0, Some(3.5)), (0.75, Some(3.5))]);
    }
}
