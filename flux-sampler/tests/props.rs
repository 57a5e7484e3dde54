//! Property tests of flux-sampler's invariants.

use flux_sampler::*;
use proptest::prelude::*;

/// BFL's `reciprocal(e)·e` can land one ulp below 1 at t = 1 (0.99999994 for about one sequence
/// length in seven above ~20k tokens, as PyTorch does); diffusers divides and always gives 1.
fn check_schedule(ts: &[f32], n: usize, strict: bool) -> std::result::Result<(), TestCaseError> {
    prop_assert_eq!(ts.len(), n + 1);
    prop_assert!(
        ts[0] == 1.0 || ts[0] == 1.0 - f32::EPSILON / 2.0,
        "first entry {}",
        ts[0]
    );
    prop_assert_eq!(ts[n], 0.0);
    for w in ts.windows(2) {
        prop_assert!(w[1] <= w[0], "increasing: {} then {}", w[0], w[1]);
        if strict {
            prop_assert!(
                w[1] < w[0],
                "not strictly decreasing: {} then {}",
                w[0],
                w[1]
            );
        }
    }
    prop_assert!(validate_schedule(ts).is_ok());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Up to 2048² (16384 tokens, mu 3.23) and 400 steps every entry is distinct.
    #[test]
    fn schedules_start_at_1_end_at_0_and_strictly_decrease(n in 1usize..400, seq in 1usize..=16_384, shifted: bool) {
        let shift = shifted.then(ShiftParams::default);
        check_schedule(&schedule(n, seq, shift).unwrap(), n, true)?;
        let dif = diffusers_sigmas(n, seq, shift).unwrap();
        check_schedule(&dif, n, true)?;
        prop_assert_eq!(dif[0], 1.0);
        if !shifted {
            prop_assert_eq!(schedule(n, seq, None).unwrap()[0], 1.0);
        }
    }

    /// Beyond that (4096² images, mu ≈ 11) f32 merges the first entries, in PyTorch too:
    /// the schedule never increases, and `validate_schedule` accepts it.
    #[test]
    fn huge_images_give_non_increasing_schedules(n in 1usize..400, seq in 16_384usize..70_000) {
        check_schedule(&schedule(n, seq, Some(ShiftParams::default())).unwrap(), n, false)?;
        check_schedule(&diffusers_sigmas(n, seq, Some(ShiftParams::default())).unwrap(), n, false)?;
    }

    #[test]
    fn shift_keeps_monotonicity_for_any_line(n in 1usize..100, seq in 1usize..16_384,
                                             base in -1.0f64..2.0, span in 0.01f64..0.5) {
        let p = ShiftParams { base_shift: base, max_shift: base + span, ..Default::default() };
        check_schedule(&schedule(n, seq, Some(p)).unwrap(), n, true)?;
        check_schedule(&diffusers_sigmas(n, seq, Some(p)).unwrap(), n, true)?;
    }

    #[test]
    fn mu_is_monotone_in_sequence_length(a in 1usize..100_000, b in 1usize..100_000) {
        prop_assume!(a < b);
        let p = ShiftParams::default();
        prop_assert!(p.mu(a).unwrap() < p.mu(b).unwrap());
    }

    #[test]
    fn img2img_index_is_in_range(n in 1usize..1000, strength in 0.0f64..=1.0) {
        for r in [Reference::Bfl, Reference::Diffusers] {
            let i = img2img_start_index(n, strength, r).unwrap();
            prop_assert!(i <= n);
        }
        prop_assert_eq!(img2img_start_index(n, 1.0, Reference::Bfl).unwrap(), 0);
        prop_assert_eq!(img2img_start_index(n, 0.0, Reference::Diffusers).unwrap(), n);
    }

    #[test]
    fn strength_outside_unit_interval_is_rejected(s in prop_oneof![-1e9f64..-1e-12, 1.0f64 + 1e-9..1e9]) {
        prop_assert!(matches!(img2img_start_index(10, s, Reference::Bfl), Err(Error::InvalidStrength(_))));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn noise_is_reproducible_and_standard_normal(seed: u64, bf16: bool, portable: bool) {
        let opts = NoiseOptions {
            dtype: if bf16 { NoiseDtype::Bf16 } else { NoiseDtype::F32 },
            kernel: if portable { TorchCpuKernel::Portable } else { TorchCpuKernel::Avx2 },
        };
        let n = 16 * 1024;
        let a = torch_randn(seed, n, opts);
        prop_assert_eq!(&a, &torch_randn(seed, n, opts));
        prop_assert_ne!(&a, &torch_randn(seed.wrapping_add(1) & 0xffff_ffff, n, opts));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors at n = 16384: mean 0.008, variance 0.011.
        prop_assert!(mean.abs() < 0.05, "mean {}", mean);
        prop_assert!((var - 1.0).abs() < 0.08, "variance {}", var);
        prop_assert!(a.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn latent_shapes_follow_the_rounding(h in 1usize..3000, w in 1usize..3000, b in 1usize..4) {
        let strict = latent_shape(b, h, w, SizeRounding::Strict);
        if h % 16 == 0 && w % 16 == 0 {
            prop_assert_eq!(strict.unwrap(), [b, 16, h / 8, w / 8]);
        } else {
            let is_size_error = matches!(strict, Err(Error::SizeNotMultipleOf16 { .. }));
            prop_assert!(is_size_error);
        }
        prop_assert_eq!(latent_shape(b, h, w, SizeRounding::Ceil).unwrap(), [b, 16, 2 * h.div_ceil(16), 2 * w.div_ceil(16)]);
        match latent_shape(b, h, w, SizeRounding::Floor) {
            Ok(s) => prop_assert_eq!(s, [b, 16, 2 * (h / 16), 2 * (w / 16)]),
            Err(_) => prop_assert!(h < 16 || w < 16),
        }
    }
}

#[test]
fn empty_sizes_are_errors() {
    assert!(matches!(
        latent_shape(0, 16, 16, SizeRounding::Strict),
        Err(Error::EmptySize { .. })
    ));
    assert!(matches!(
        latent_shape(1, 0, 16, SizeRounding::Ceil),
        Err(Error::EmptySize { .. })
    ));
    assert!(matches!(
        seeded_noise(0, &[1, 0, 4], NoiseOptions::BFL, &candle::Device::Cpu),
        Err(Error::EmptyShape(_))
    ));
}
