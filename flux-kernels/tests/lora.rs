//! Adapters on one `Linear`: merged and run-time paths agree on random shapes, ranks,
//! placements and kinds, on dense and packed (fp8) weights; restoring is bit for bit.

use candle::{DType, Device, Tensor};
use flux_golden::{max_abs, max_abs_diff};
use flux_kernels::lora::{
    merge_patches, runtime_patches, AdapterKind, AdapterModule, LoraNaming, Patch, Placement,
};
use flux_kernels::{Encoding, Fp8Kind, Linear, LinearWeight, PackedWeight};
use proptest::prelude::*;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    flux_golden::uniform(shape, seed)
}

fn module(kind: AdapterKind, bias: Option<Tensor>, dora: Option<Tensor>) -> AdapterModule {
    AdapterModule {
        stem: "m".into(),
        kind,
        alpha: None,
        scale: None,
        up_bias: bias,
        dora_scale: dora,
    }
}

/// One random module of `kind` (0 LoRA, 1 LoRA + bias, 2 LoHa, 3 diff, 4 DoRA) over `rows`
/// output rows and `inp` inputs.
fn random_module(kind: u8, rows: usize, inp: usize, rank: usize, seed: u64) -> AdapterModule {
    let lora = || AdapterKind::LoRA {
        down: randn(&[rank, inp], seed),
        up: randn(&[rows, rank], seed + 1),
        naming: LoraNaming::AB,
    };
    match kind {
        0 => module(lora(), None, None),
        1 => module(lora(), Some(randn(&[rows], seed + 2)), None),
        2 => module(
            AdapterKind::LoHa {
                w1: (
                    randn(&[rows, rank], seed + 3),
                    randn(&[rank, inp], seed + 4),
                ),
                w2: (
                    randn(&[rows, rank], seed + 5),
                    randn(&[rank, inp], seed + 6),
                ),
            },
            None,
            None,
        ),
        3 => module(
            AdapterKind::Diff {
                weight: Some(randn(&[rows, inp], seed + 7)),
                bias: Some(randn(&[rows], seed + 8)),
            },
            None,
            None,
        ),
        _ => {
            let ds = (randn(&[1, inp], seed + 9).abs().unwrap() + 0.5).unwrap();
            module(lora(), None, Some(ds))
        }
    }
}

fn close(a: &Tensor, b: &Tensor, what: &str) -> Result<(), TestCaseError> {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let d = max_abs_diff(a, b);
    prop_assert!(d <= 1e-5 * scale.max(1.0), "{what}: {d} (scale {scale})");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn merged_and_runtime_agree(
        out in 2usize..40, inp in 1usize..40, rows_in in 1usize..6, parts in 1usize..4,
        kinds in proptest::collection::vec(0u8..5, 3), swap: bool, bias: bool,
        strength in -1.5f32..1.5, seed in 0u64..10_000,
    ) {
        let out = if swap { out & !1 } else { out }.max(2);
        let w = randn(&[out, inp], seed);
        let b = bias.then(|| randn(&[out], seed + 1));
        let base = Linear::new(w.clone(), b.clone()).unwrap();
        let x = randn(&[3, inp], seed + 2);
        // `parts` modules, each on a random slice of rows
        let mut mods = vec![];
        let mut places = vec![];
        for (k, kind) in kinds.iter().take(parts).enumerate() {
            let rows = 1 + (seed as usize + 7 * k) % out;
            let offset = (seed as usize / 3 + k) % (out - rows + 1);
            mods.push(random_module(*kind, rows, inp, rows_in, seed + 10 * k as u64));
            places.push(Placement { offset, rows, swap_halves: swap && k == 0 });
        }
        let patches: Vec<Patch> = mods
            .iter()
            .zip(&places)
            .enumerate()
            .map(|(k, (m, p))| Patch { module: m, place: *p, scale: 0.5 + k as f32, strength })
            .collect();
        let mut merged = base.clone();
        merge_patches(&mut merged, &patches, true).unwrap();
        let mut runtime = base.clone();
        runtime_patches(&mut runtime, &patches, DType::F32, &Device::Cpu).unwrap();
        let ym = merged.forward(&x).unwrap();
        let yr = runtime.forward(&x).unwrap();
        close(&yr, &ym, "run time vs merged")?;
        // candle's path (bf16 here) applies the same run-time adapter
        let mut half = Linear::new(w.to_dtype(DType::BF16).unwrap(), b.as_ref().map(|b| b.to_dtype(DType::BF16).unwrap())).unwrap();
        runtime_patches(&mut half, &patches, DType::BF16, &Device::Cpu).unwrap();
        let yh = half.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap().to_dtype(DType::F32).unwrap();
        let scale = max_abs(&ym);
        let d = max_abs_diff(&yh, &ym);
        prop_assert!(d <= 3e-2 * scale.max(1.0), "bf16 run time: {} (scale {})", d, scale);
        // restoring gives the weights as loaded, bit for bit
        for mut l in [merged, runtime] {
            l.restore();
            prop_assert_eq!(max_abs_diff(&l.weight().unwrap(), &w), 0.0);
            prop_assert!(!l.is_adapted());
            prop_assert_eq!(max_abs_diff(&l.forward(&x).unwrap(), &base.forward(&x).unwrap()), 0.0);
        }
    }

    #[test]
    fn runtime_on_fp8_equals_merged_on_its_decoded_weight(
        out in 1usize..30, inp in 1usize..30, rank in 1usize..5, kind in 0u8..5,
        seed in 0u64..10_000,
    ) {
        let w = randn(&[out, inp], seed);
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let packed = PackedWeight::encode(Encoding::Fp8(Fp8Kind::E4M3), &v, out, inp).unwrap();
        let mut fp8 = Linear::from_weight(LinearWeight::Packed(packed), None, &Device::Cpu, DType::F32).unwrap();
        let decoded = fp8.weight().unwrap();
        let mut dense = Linear::new(decoded, None).unwrap();
        let m = random_module(kind, out, inp, rank, seed + 1);
        let p = [Patch {
            module: &m,
            place: Placement { offset: 0, rows: out, swap_halves: false },
            scale: 0.7,
            strength: 0.9,
        }];
        prop_assert!(merge_patches(&mut fp8.clone(), &p, true).is_err());
        runtime_patches(&mut fp8, &p, DType::F32, &Device::Cpu).unwrap();
        merge_patches(&mut dense, &p, true).unwrap();
        let x = randn(&[4, inp], seed + 2);
        close(&fp8.forward(&x).unwrap(), &dense.forward(&x).unwrap(), "fp8 run time")?;
    }
}

#[test]
fn wider_module_pads_the_input() {
    // a control LoRA's img_in: the module takes 2x the layer's inputs
    let w = randn(&[4, 3], 1);
    let m = random_module(1, 4, 6, 2, 2);
    let p = [Patch {
        module: &m,
        place: Placement {
            offset: 0,
            rows: 4,
            swap_halves: false,
        },
        scale: 1.0,
        strength: 0.85,
    }];
    let mut merged = Linear::new(w.clone(), None).unwrap();
    merge_patches(&mut merged, &p, true).unwrap();
    let mut runtime = Linear::new(w.clone(), None).unwrap();
    runtime_patches(&mut runtime, &p, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(merged.dims(), (6, 4));
    assert_eq!(runtime.dims(), (6, 4));
    let x = randn(&[2, 6], 3);
    let d = max_abs_diff(&merged.forward(&x).unwrap(), &runtime.forward(&x).unwrap());
    assert!(d < 1e-5, "{d}");
    // the first three columns are the old weight plus the change, the rest only the change
    let dw = (merged.weight().unwrap()
        - Tensor::cat(
            &[
                &w,
                &Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap())
    .unwrap();
    let AdapterKind::LoRA { down, up, .. } = &m.kind else {
        unreachable!()
    };
    let want = (up.matmul(down).unwrap() * 0.85).unwrap();
    assert!(max_abs_diff(&dw, &want) < 1e-6);
    merged.restore();
    assert_eq!(merged.dims(), (3, 4));
}

#[test]
fn bad_placements_and_shapes_are_errors() {
    let mut l = Linear::new(randn(&[4, 3], 1), None).unwrap();
    let m = random_module(0, 3, 3, 2, 2);
    let at = |offset, rows| Patch {
        module: &m,
        place: Placement {
            offset,
            rows,
            swap_halves: false,
        },
        scale: 1.0,
        strength: 1.0,
    };
    // rows past the end, and a module of 3 rows placed on 4
    assert!(merge_patches(&mut l, &[at(2, 3)], true).is_err());
    assert!(runtime_patches(&mut l, &[at(0, 4)], DType::F32, &Device::Cpu).is_err());
    assert!(!l.is_adapted());
    // a run-time delta of the wrong shape
    let bad = flux_kernels::RuntimeDelta {
        down: Some(randn(&[2, 5], 3)),
        up: Some(randn(&[4, 2], 4)),
        dense: None,
        bias: None,
    };
    let e = l
        .set_runtime(Some(bad), DType::F32, &Device::Cpu)
        .unwrap_err();
    assert!(e.to_string().contains("down factors"), "{e}");
}
