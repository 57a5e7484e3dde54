//! flux-sampler against goldens from the pinned Python reference (`cargo xtask golden gen sampler`).
//!
//! Every comparison here is exact: the sampler reproduces the references bit for bit.

use candle::{DType, Device, Tensor};
use flux_golden::{Golden, Tolerance};
use flux_sampler::*;

fn golden(file: &str) -> Golden {
    Golden::open(env!("CARGO_MANIFEST_DIR"), file)
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

const CASES: [(&str, usize, usize, bool); 5] = [
    ("schnell_4", 4, 4096, false),
    ("dev_28_1024", 28, 4096, true),
    ("dev_50_1024", 50, 4096, true),
    ("dev_50_1360x768", 50, 4080, true),
    ("dev_1_16", 1, 16, true),
];

fn shift(on: bool) -> Option<ShiftParams> {
    on.then(ShiftParams::default)
}

#[test]
fn schedules_match_bfl_and_diffusers() {
    let g = golden("schedule");
    for (name, n, seq, sh) in CASES {
        let bfl = schedule(n, seq, shift(sh)).unwrap();
        g.check_values(
            &format!("{name}/bfl"),
            "f32",
            &f64s(&bfl),
            &vals(&g.tensor(&format!("{name}/bfl"))),
            Tolerance::EXACT,
        );
        let dif = diffusers_sigmas(n, seq, shift(sh)).unwrap();
        let key = format!("{name}/diffusers_sigmas");
        g.check_values(
            &key,
            "f32",
            &f64s(&dif),
            &vals(&g.tensor(&key)),
            Tolerance::EXACT,
        );
        let key = format!("{name}/diffusers_timesteps");
        let ts: Vec<f64> = dif[..n].iter().map(|&s| (s * 1000.0) as f64).collect();
        g.check_values(&key, "f32", &ts, &vals(&g.tensor(&key)), Tolerance::EXACT);
    }
}

#[test]
fn bfl_and_diffusers_schedules_differ_by_at_most_3_ulp() {
    let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
    let mut worst = 0;
    for n in 1..=60 {
        for seq in [1, 16, 256, 1024, 4080, 4096, 6144, 16384, 45217] {
            let a = schedule(n, seq, Some(ShiftParams::default())).unwrap();
            let b = diffusers_sigmas(n, seq, Some(ShiftParams::default())).unwrap();
            worst = worst.max(a.iter().zip(&b).map(|(x, y)| ulps(*x, *y)).max().unwrap());
        }
    }
    assert_eq!(worst, 3);
    let a = schedule(28, 4096, Some(ShiftParams::default())).unwrap();
    let b = diffusers_sigmas(28, 4096, Some(ShiftParams::default())).unwrap();
    assert_eq!(a.iter().zip(&b).filter(|(x, y)| x != y).count(), 14);
}

#[test]
fn schedule_sweeps_match_bit_for_bit() {
    let g = golden("schedule");
    let meta = &g.meta()["sweep"];
    let steps = meta["steps"].as_array().unwrap();
    let (lo, hi) = (
        steps[0].as_u64().unwrap() as usize,
        steps[1].as_u64().unwrap() as usize,
    );
    let seqs: Vec<usize> = meta["image_seq_len"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (mut lin, mut bfl, mut dif) = (vec![], vec![], vec![]);
    for n in lo..=hi {
        lin.extend(schedule(n, 1, None).unwrap());
        for &seq in &seqs {
            bfl.extend(schedule(n, seq, Some(ShiftParams::default())).unwrap());
            dif.extend(diffusers_sigmas(n, seq, Some(ShiftParams::default())).unwrap());
        }
    }
    g.check_values(
        "sweep/linspace",
        "f32",
        &f64s(&lin),
        &vals(&g.tensor("sweep/linspace")),
        Tolerance::EXACT,
    );
    g.check_values(
        "sweep/bfl",
        "f32",
        &f64s(&bfl),
        &vals(&g.tensor("sweep/bfl")),
        Tolerance::EXACT,
    );
    g.check_values(
        "sweep/diffusers_sigmas",
        "f32",
        &f64s(&dif),
        &vals(&g.tensor("sweep/diffusers_sigmas")),
        Tolerance::EXACT,
    );
}

#[test]
fn embedded_timesteps_match_both_references() {
    let g = golden("schedule");
    for (name, n, seq, sh) in CASES {
        let bfl = schedule(n, seq, shift(sh)).unwrap();
        let ours: Vec<f64> = bfl[..n]
            .iter()
            .map(|&s| embedded_timestep(s, TimestepRounding::Bfl) as f64)
            .collect();
        let key = format!("{name}/bfl_embedded_t");
        g.check_values(
            &key,
            "bf16",
            &ours,
            &vals(&g.tensor(&key)),
            Tolerance::EXACT,
        );
        let dif = diffusers_sigmas(n, seq, shift(sh)).unwrap();
        let ours: Vec<f64> = dif[..n]
            .iter()
            .map(|&s| embedded_timestep(s, TimestepRounding::Diffusers) as f64)
            .collect();
        let key = format!("{name}/diffusers_embedded_t");
        g.check_values(
            &key,
            "bf16",
            &ours,
            &vals(&g.tensor(&key)),
            Tolerance::EXACT,
        );
    }
}

#[test]
fn spec_table_dev_28_embedded_timesteps() {
    // Spec §6.7: at dev 1024², 28 steps, step 7 embeds 908 (BFL) vs 904 (diffusers); 7 of 28
    // steps differ. Read from the reference goldens, not from the spec.
    let g = golden("schedule");
    let bfl = vals(&g.tensor("dev_28_1024/bfl_embedded_t"));
    let dif = vals(&g.tensor("dev_28_1024/diffusers_embedded_t"));
    assert_eq!((bfl[7], dif[7]), (908.0, 904.0));
    assert_eq!(bfl.iter().zip(&dif).filter(|(a, b)| a != b).count(), 7);
    let sigmas = schedule(28, 4096, Some(ShiftParams::default())).unwrap();
    assert_eq!(embedded_timestep(sigmas[7], TimestepRounding::Bfl), 908.0);
    assert_eq!(
        embedded_timestep(sigmas[7], TimestepRounding::Diffusers),
        904.0
    );
}

#[test]
fn embedded_guidance_matches_both_references() {
    let g = golden("schedule");
    let values = vals(&g.tensor("guidance/values"));
    for (key, r) in [
        ("guidance/bfl_embedded", TimestepRounding::Bfl),
        ("guidance/diffusers_embedded", TimestepRounding::Diffusers),
    ] {
        let ours: Vec<f64> = values
            .iter()
            .map(|&v| embedded_guidance(v as f32, r) as f64)
            .collect();
        g.check_values(key, "bf16", &ours, &vals(&g.tensor(key)), Tolerance::EXACT);
    }
}

fn trajectory(g: &Golden, dtype: DType, reference: Reference) -> Vec<Tensor> {
    let ts: Vec<f32> = g.tensor("schedule").to_vec1().unwrap();
    let x0 = g.tensor("x0").to_dtype(dtype).unwrap();
    let mut steps = vec![];
    let mut den = |_: &Tensor, i: &StepInfo| g.tensor(&format!("v/{}", i.index)).to_dtype(dtype);
    let opts = SampleOptions {
        reference,
        ..Default::default()
    };
    let out = sample(x0, &ts, &opts, &mut den, |_, x| steps.push(x.clone())).unwrap();
    assert_eq!(
        out.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap(),
        steps
            .last()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec3::<f64>()
            .unwrap()
    );
    steps
}

#[test]
fn euler_trajectories_match_bfl_in_f32_and_bf16() {
    let g = golden("euler");
    for (dtype, tag) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        for (i, x) in trajectory(&g, dtype, Reference::Bfl).iter().enumerate() {
            let key = format!("bfl_{tag}/{i}");
            g.check(&key, x, &g.tensor(&key), Tolerance::EXACT);
        }
    }
}

#[test]
fn euler_matches_diffusers_scheduler_step() {
    let g = golden("euler");
    for (dtype, tag) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        for (i, x) in trajectory(&g, dtype, Reference::Diffusers)
            .iter()
            .enumerate()
        {
            let key = format!("diffusers_{tag}/{i}");
            g.check(&key, x, &g.tensor(&key), Tolerance::EXACT);
        }
    }
}

#[test]
fn bf16_euler_conventions_differ_somewhere() {
    // The two bf16 updates are different arithmetic; the golden must show it, or the
    // diffusers convention would be untested.
    let g = golden("euler");
    let a = g.tensor("bfl_bf16/0").to_dtype(DType::F32).unwrap();
    let b = g.tensor("diffusers_bf16/0").to_dtype(DType::F32).unwrap();
    let differ = a
        .ne(&b)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(differ > 0.0);
}

#[test]
fn img2img_noising_matches_both_references() {
    let g = golden("euler");
    let noise = g.tensor("noising/noise");
    let x0 = g.tensor("x0");
    for t in g.meta()["noising_t"].as_array().unwrap() {
        let t = t.as_f64().unwrap();
        for (dtype, tag) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
            for (reference, who) in [(Reference::Bfl, "bfl"), (Reference::Diffusers, "diffusers")] {
                let ours = noise_latents(
                    &x0.to_dtype(dtype).unwrap(),
                    &noise.to_dtype(dtype).unwrap(),
                    t,
                    reference,
                )
                .unwrap();
                // Python prints 0.0 and 1.0 with a trailing ".0"; match its key spelling.
                let key = format!("noising/{who}_{tag}/{t:?}");
                g.check(&key, &ours, &g.tensor(&key), Tolerance::EXACT);
            }
        }
    }
}

#[test]
fn img2img_start_indices_match_both_conventions() {
    let g = golden("euler");
    let strengths = vals(&g.tensor("strength/values"));
    let bfl: Vec<i64> = g.tensor("strength/bfl_index").to_vec1().unwrap();
    let dif: Vec<i64> = g.tensor("strength/diffusers_index").to_vec1().unwrap();
    let mut k = 0;
    let (mut ours_bfl, mut ours_dif) = (vec![], vec![]);
    for n in g.meta()["strength_num_steps"].as_array().unwrap() {
        let n = n.as_u64().unwrap() as usize;
        for &s in &strengths {
            ours_bfl.push(img2img_start_index(n, s, Reference::Bfl).unwrap() as f64);
            ours_dif.push(img2img_start_index(n, s, Reference::Diffusers).unwrap() as f64);
            k += 1;
        }
    }
    assert_eq!(k, bfl.len());
    let to_f = |v: &[i64]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    g.check_values(
        "strength/bfl_index",
        "i64",
        &ours_bfl,
        &to_f(&bfl),
        Tolerance::EXACT,
    );
    g.check_values(
        "strength/diffusers_index",
        "i64",
        &ours_dif,
        &to_f(&dif),
        Tolerance::EXACT,
    );
}

fn check_noise(file: &str, kernel: TorchCpuKernel) {
    let g = golden(file);
    let cases = g.meta()["cases"].as_object().unwrap().clone();
    assert!(!cases.is_empty());
    for (name, c) in cases {
        let seed = c["seed"].as_u64().unwrap();
        let shape: Vec<usize> = c["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        for (dtype, tag) in [(NoiseDtype::F32, "f32"), (NoiseDtype::Bf16, "bf16")] {
            let ours =
                seeded_noise(seed, &shape, NoiseOptions { dtype, kernel }, &Device::Cpu).unwrap();
            let key = format!("{name}/{tag}");
            g.check(&key, &ours, &g.tensor(&key), Tolerance::EXACT);
        }
    }
}

#[test]
fn noise_matches_torch_randn_x86_64() {
    check_noise("noise", TorchCpuKernel::Avx2);
}

#[test]
fn noise_matches_torch_randn_portable_kernel() {
    check_noise("noise_portable", TorchCpuKernel::Portable);
}
