//! Timestep schedules: BFL's `get_schedule` and diffusers' `FlowMatchEulerDiscreteScheduler`.
//!
//! Both are `linspace(1, 0)` pushed through the exponential time shift
//! `e^mu / (e^mu + (1/t − 1))` with `mu` on the line through (256, 0.5) and (4096, 1.15) of the
//! image sequence length (spec §6.2, §6.4). They agree mathematically and differ in the last
//! bits, because each evaluates the formula in its own float order:
//!
//! | | BFL (torch, f32) | diffusers (numpy) |
//! |---|---|---|
//! | linspace | f32, `1 + step·i` fused for the first half, `0 − step·(N − i)` for the rest | f64 `i·step + 1`, then cast to f32 |
//! | `e^mu / d` | `reciprocal(d) · e^mu` (two roundings) | `e^mu / d` (one rounding) |
//!
//! Both results are reproduced bit for bit (checked against goldens from the reference). Where
//! they differ, it is by at most 3 ulp: dev at 1024² with 28 steps differs in 14 of 29 entries
//! (≤ 2 ulp), 50 steps at 1360×768 in 18 of 51; schnell (no shift) never differs. Across 1–60
//! steps × 9 image sizes, a third of the entries differ, never by more than 3 ulp.
//! The schedules here include the final 0: `num_steps + 1` entries.

use crate::{Error, Result};

/// The line that maps image sequence length to `mu` (spec §6.2). The defaults are FLUX.1-dev's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShiftParams {
    /// `mu` at `base_seq_len` tokens.
    pub base_shift: f64,
    /// `mu` at `max_seq_len` tokens.
    pub max_shift: f64,
    /// First point of the line (tokens).
    pub base_seq_len: f64,
    /// Second point of the line (tokens).
    pub max_seq_len: f64,
}

impl Default for ShiftParams {
    fn default() -> Self {
        // BFL `get_schedule` defaults; diffusers' FLUX.1-dev scheduler config has the same.
        ShiftParams {
            base_shift: 0.5,
            max_shift: 1.15,
            base_seq_len: 256.0,
            max_seq_len: 4096.0,
        }
    }
}

impl ShiftParams {
    /// `mu` for `image_seq_len` tokens, unclamped (2048² gives 3.23), computed in f64 as the
    /// reference does.
    pub fn mu(&self, image_seq_len: usize) -> Result<f64> {
        self.validate()?;
        if image_seq_len == 0 {
            return Err(Error::ZeroSequenceLength);
        }
        let m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len);
        let b = self.base_shift - m * self.base_seq_len;
        Ok(m * image_seq_len as f64 + b)
    }

    fn validate(&self) -> Result<()> {
        let all = [
            self.base_shift,
            self.max_shift,
            self.base_seq_len,
            self.max_seq_len,
        ];
        if all.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidShift(format!("non-finite value in {self:?}")));
        }
        if self.max_seq_len == self.base_seq_len {
            return Err(Error::InvalidShift(format!(
                "base_seq_len and max_seq_len are both {}",
                self.base_seq_len
            )));
        }
        Ok(())
    }
}

/// `torch.linspace(1, 0, n)` in f32, bit for bit (PyTorch's CPU kernel: the first half counts
/// up from the start with a fused multiply-add, the second half down from the end).
fn torch_linspace_1_to_0(n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![1.0];
    }
    let step = (0.0f32 - 1.0) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, 1.0)
            } else {
                (-step).mul_add((n - 1 - i) as f32, 0.0)
            }
        })
        .collect()
}

/// BFL's schedule (`get_schedule` in the reference): `num_steps + 1` times from 1 down to 0.
///
/// `shift = None` is schnell (plain linspace: 4 steps give `[1, 0.75, 0.5, 0.25, 0]`);
/// `Some(params)` applies the exponential time shift for `image_seq_len` tokens
/// (`(H/16)·(W/16)`; 4096 at 1024²).
///
/// Reproduced as PyTorch computes it, including one quirk: for some sequence lengths (about one
/// in seven above ~20k tokens, e.g. 45217) the first entry is `1 − 2⁻²⁴` (0.99999994), not 1.
pub fn schedule(
    num_steps: usize,
    image_seq_len: usize,
    shift: Option<ShiftParams>,
) -> Result<Vec<f32>> {
    if num_steps == 0 {
        return Err(Error::ZeroSteps);
    }
    let ts = torch_linspace_1_to_0(num_steps + 1);
    let Some(params) = shift else {
        return Ok(ts);
    };
    let e = params.mu(image_seq_len)?.exp() as f32;
    // torch: exp(mu) / (exp(mu) + (1 / t - 1)) with `a / tensor` = reciprocal(tensor) * a.
    Ok(ts
        .into_iter()
        .map(|t| {
            let d = e + (1.0 / t - 1.0);
            (1.0 / d) * e
        })
        .collect())
}

/// diffusers' sigmas as `FluxPipeline` + `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=…,
/// mu=…)` produce them, including the appended final 0: `num_steps + 1` entries.
///
/// `shift = None` is the schnell scheduler (no dynamic shifting, shift 1.0: identity).
/// The scheduler's `timesteps` are these sigmas times 1000 in f32 (without the final 0).
pub fn diffusers_sigmas(
    num_steps: usize,
    image_seq_len: usize,
    shift: Option<ShiftParams>,
) -> Result<Vec<f32>> {
    if num_steps == 0 {
        return Err(Error::ZeroSteps);
    }
    // np.linspace(1.0, 1/N, N): y = i·step + start in f64, last entry = stop exactly.
    let n = num_steps;
    let stop = 1.0 / n as f64;
    let mut sigmas: Vec<f32> = if n == 1 {
        vec![1.0]
    } else {
        let step = (stop - 1.0) / (n - 1) as f64;
        (0..n)
            .map(|i| {
                if i == n - 1 {
                    stop
                } else {
                    i as f64 * step + 1.0
                }
            })
            .map(|v| v as f32)
            .collect()
    };
    if let Some(params) = shift {
        let e = params.mu(image_seq_len)?.exp() as f32;
        for s in &mut sigmas {
            *s = e / (e + (1.0 / *s - 1.0));
        }
    }
    sigmas.push(0.0);
    Ok(sigmas)
}

/// Checks that a schedule can be stepped: at least 2 finite entries, never increasing, ending
/// below its start. Equal neighbours are allowed: at extreme shifts (mu ≳ 10, e.g. 4096² images)
/// f32 cannot separate the first entries, in the reference as here, and the step is a no-op.
pub fn validate_schedule(timesteps: &[f32]) -> Result<()> {
    if timesteps.len() < 2 {
        return Err(Error::ScheduleTooShort(timesteps.len()));
    }
    for (i, w) in timesteps.windows(2).enumerate() {
        if !w[0].is_finite() || !w[1].is_finite() {
            return Err(Error::NotFinite {
                what: "schedule entry",
                value: if w[0].is_finite() { w[1] } else { w[0] } as f64,
            });
        }
        if w[1] > w[0] {
            return Err(Error::IncreasingSchedule {
                index: i + 1,
                previous: w[0],
                value: w[1],
            });
        }
    }
    let (first, last) = (timesteps[0], timesteps[timesteps.len() - 1]);
    if last >= first {
        return Err(Error::IncreasingSchedule {
            index: timesteps.len() - 1,
            previous: first,
            value: last,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schnell_four_steps() {
        assert_eq!(
            schedule(4, 4096, None).unwrap(),
            vec![1.0, 0.75, 0.5, 0.25, 0.0]
        );
        assert_eq!(
            diffusers_sigmas(4, 4096, None).unwrap(),
            vec![1.0, 0.75, 0.5, 0.25, 0.0]
        );
    }

    #[test]
    fn mu_examples_from_the_spec() {
        let p = ShiftParams::default();
        assert!((p.mu(4096).unwrap() - 1.15).abs() < 1e-12);
        assert!((p.mu(4080).unwrap() - 1.147_291_666_666_666_7).abs() < 1e-12);
        assert!((p.mu(1024).unwrap() - 0.63).abs() < 1e-12);
        assert!((p.mu(16384).unwrap() - 3.23).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_typed() {
        assert!(matches!(schedule(0, 16, None), Err(Error::ZeroSteps)));
        assert!(matches!(
            diffusers_sigmas(0, 16, None),
            Err(Error::ZeroSteps)
        ));
        assert!(matches!(
            schedule(4, 0, Some(ShiftParams::default())),
            Err(Error::ZeroSequenceLength)
        ));
        let flat = ShiftParams {
            max_seq_len: 256.0,
            ..Default::default()
        };
        assert!(matches!(
            schedule(4, 16, Some(flat)),
            Err(Error::InvalidShift(_))
        ));
        let nan = ShiftParams {
            max_shift: f64::NAN,
            ..Default::default()
        };
        assert!(matches!(
            schedule(4, 16, Some(nan)),
            Err(Error::InvalidShift(_))
        ));
        assert!(matches!(
            validate_schedule(&[1.0]),
            Err(Error::ScheduleTooShort(1))
        ));
        assert!(matches!(
            validate_schedule(&[1.0, 0.5, 0.6]),
            Err(Error::IncreasingSchedule { index: 2, .. })
        ));
        assert!(matches!(
            validate_schedule(&[0.5, 0.5]),
            Err(Error::IncreasingSchedule { .. })
        ));
        assert!(validate_schedule(&[1.0, 1.0, 0.0]).is_ok());
        assert!(matches!(
            validate_schedule(&[1.0, f32::NAN]),
            Err(Error::NotFinite { .. })
        ));
    }
}
