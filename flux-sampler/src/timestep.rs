//! The value a FLUX model sees for a timestep or a guidance scale.
//!
//! The transformer embeds `1000·t` (and `1000·g`) with a sinusoid. In the references these
//! products are bf16 tensors, so the embedded values are rounded (spec §6.7): schnell's
//! t = 0.75 enters as 752, guidance 3.5 as 3504, and BFL and diffusers round differently
//! (dev 1024², 28 steps, step 7: 908 vs 904). [`TimestepRounding`] picks which reference to
//! reproduce; [`TimestepRounding::None`] keeps f32 values (more accurate, not bit-comparable).

use half::bf16;

/// How timesteps and guidance are rounded before the model embeds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepRounding {
    /// No rounding: the model gets `σ` and embeds `1000·σ` in f32.
    #[default]
    None,
    /// BFL: `t = bf16(σ)`, embedded `bf16(1000·t)`.
    Bfl,
    /// diffusers in a bf16 pipeline: `timesteps = f32(1000·σ)`, the model gets
    /// `bf16(bf16(timestep)/1000)` and embeds `bf16(1000·t)`.
    Diffusers,
    /// diffusers in an f32 pipeline: the model gets `f32(f32(1000·σ)/1000)` and embeds
    /// `f32(1000·t)` (not always `1000·σ` to the last bit).
    DiffusersF32,
}

/// Rounds an f32 to the nearest bf16 (ties to even) and widens it back, exactly.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// The timestep handed to the model (before the model's own `×1000`) at schedule value `sigma`.
pub fn model_timestep(sigma: f32, rounding: TimestepRounding) -> f32 {
    match rounding {
        TimestepRounding::None => sigma,
        TimestepRounding::Bfl => round_bf16(sigma),
        TimestepRounding::Diffusers => round_bf16(round_bf16(sigma * 1000.0) / 1000.0),
        TimestepRounding::DiffusersF32 => (sigma * 1000.0) / 1000.0,
    }
}

/// The value entering the timestep sinusoid at schedule value `sigma`: `1000·t`, rounded to
/// bf16 under either reference rounding.
pub fn embedded_timestep(sigma: f32, rounding: TimestepRounding) -> f32 {
    let t = model_timestep(sigma, rounding);
    match rounding {
        TimestepRounding::None | TimestepRounding::DiffusersF32 => 1000.0 * t,
        _ => round_bf16(1000.0 * t),
    }
}

/// The guidance handed to the model (before its `×1000`): `bf16(g)` under either reference.
pub fn model_guidance(guidance: f32, rounding: TimestepRounding) -> f32 {
    match rounding {
        TimestepRounding::None | TimestepRounding::DiffusersF32 => guidance,
        _ => round_bf16(guidance),
    }
}

/// The value entering the guidance sinusoid: `1000·g`, or `bf16(1000·bf16(g))` under either
/// reference (3.5 → 3504).
pub fn embedded_guidance(guidance: f32, rounding: TimestepRounding) -> f32 {
    let g = model_guidance(guidance, rounding);
    match rounding {
        TimestepRounding::None | TimestepRounding::DiffusersF32 => 1000.0 * g,
        _ => round_bf16(1000.0 * g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        assert_eq!(embedded_timestep(0.75, TimestepRounding::Bfl), 752.0);
        assert_eq!(embedded_timestep(0.75, TimestepRounding::None), 750.0);
        for (g, want) in [
            (1.0, 1000.0),
            (2.5, 2496.0),
            (3.5, 3504.0),
            (7.0, 7008.0),
            (30.0, 29952.0),
        ] {
            assert_eq!(
                embedded_guidance(g, TimestepRounding::Bfl),
                want,
                "guidance {g}"
            );
            assert_eq!(
                embedded_guidance(g, TimestepRounding::Diffusers),
                want,
                "guidance {g}"
            );
        }
    }
}
