//! Hand-checked cases and properties of the shared ops.

use candle::{DType, Device, Tensor, D};
use flux_golden::max_abs_diff;
use flux_kernels::LoadError;
use flux_kernels::*;
use proptest::prelude::*;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    flux_golden::uniform(
        shape,
        seed.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407),
    )
}

fn ids(l: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = (0..l * 3)
        .map(|i| ((i as u64 * 7 + seed) % 50) as f32)
        .collect();
    Tensor::from_vec(v, (1, l, 3), &Device::Cpu).unwrap()
}

#[test]
fn attention_rows_sum_to_one_and_match_a_hand_case() {
    // With v = identity rows, the output rows are the attention probabilities.
    let q = randn(&[1, 2, 3, 4], 1);
    let k = randn(&[1, 2, 5, 4], 2);
    let v = Tensor::eye(5, DType::F32, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 5, 5))
        .unwrap()
        .repeat((1, 2, 1, 1))
        .unwrap();
    for causal in [false, true] {
        let p = attention(
            &q,
            &k,
            &v,
            AttnOpts {
                causal,
                ..Default::default()
            },
        )
        .unwrap();
        let sums = p
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
        if causal {
            let p4 = p.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
            for (h, head) in p4.iter().enumerate() {
                for (i, row) in head.iter().enumerate() {
                    for (j, &p) in row.iter().enumerate().skip(i + 1) {
                        assert_eq!(p, 0.0, "causal leak at head {h}, row {i}, col {j}");
                    }
                }
            }
        }
    }
    // Hand case: one query, two keys, logits (0, ln 3)·scale⁻¹ with scale 1 → probs (1/4, 3/4).
    let q = Tensor::new(&[[[[1.0f32]]]], &Device::Cpu).unwrap();
    let k = Tensor::new(&[[[[0.0f32], [3.0f32.ln()]]]], &Device::Cpu).unwrap();
    let v = Tensor::new(&[[[[4.0f32], [8.0]]]], &Device::Cpu).unwrap();
    let o = attention(
        &q,
        &k,
        &v,
        AttnOpts {
            scale: Some(1.0),
            ..Default::default()
        },
    )
    .unwrap();
    assert!((o.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] - 7.0).abs() < 1e-5);
    // An additive bias of −∞ on the second key leaves only the first.
    let bias = Tensor::new(&[[[[0.0f32, f32::NEG_INFINITY]]]], &Device::Cpu).unwrap();
    let o = attention(
        &q,
        &k,
        &v,
        AttnOpts {
            scale: Some(1.0),
            bias: Some(&bias),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        o.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![4.0]
    );
}

#[test]
fn attention_rejects_bad_shapes() {
    let q = randn(&[1, 2, 3, 4], 1);
    assert!(matches!(
        attention(&q, &randn(&[1, 2, 3, 5], 1), &q, AttnOpts::default()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        attention(&randn(&[2, 3, 4], 1), &q, &q, AttnOpts::default()),
        Err(Error::RankMismatch { .. })
    ));
}

#[test]
fn flash_kernel_names_parse_and_bad_ones_are_named_errors() {
    for k in [
        FlashKernel::Auto,
        FlashKernel::HopperNoPingPong,
        FlashKernel::MmaSync,
    ] {
        assert_eq!(k.name().parse::<FlashKernel>().unwrap(), k);
    }
    assert_eq!(
        " mma.sync\n".parse::<FlashKernel>().unwrap(),
        FlashKernel::MmaSync
    );
    let e = "hopper".parse::<FlashKernel>().unwrap_err().to_string();
    assert!(
        e.contains("FLUX_CUDA_ATTENTION") && e.contains("\"hopper\""),
        "{e}"
    );
    // an explicit choice wins over the environment; CPU attention does not look at it
    set_flash_kernel(FlashKernel::MmaSync);
    assert_eq!(flash_kernel().unwrap(), FlashKernel::MmaSync);
    let q = randn(&[1, 2, 5, 8], 3);
    let a = attention(&q, &q, &q, AttnOpts::default()).unwrap();
    let b = attention_composite(&q, &q, &q, AttnOpts::default()).unwrap();
    assert!(max_diff(&a, &b) < 1e-5);
    set_flash_kernel(FlashKernel::Auto);
    assert_eq!(flash_kernel().unwrap(), FlashKernel::Auto);
}

#[test]
fn cuda_linear_names_parse_and_forward_gelu_is_gelu_of_forward() {
    assert_eq!(
        "cublaslt".parse::<CudaLinear>().unwrap(),
        CudaLinear::CublasLt
    );
    assert_eq!(
        " cublas ".parse::<CudaLinear>().unwrap(),
        CudaLinear::Cublas
    );
    assert_eq!(
        "cublaslt-tuned".parse::<CudaLinear>().unwrap(),
        CudaLinear::CublasLtTuned
    );
    let e = "cutlass".parse::<CudaLinear>().unwrap_err().to_string();
    assert!(
        e.contains("FLUX_CUDA_LINEAR") && e.contains("\"cutlass\"") && e.contains("cublaslt-tuned"),
        "{e}"
    );
    set_cuda_linear(CudaLinear::Cublas);
    assert_eq!(cuda_linear().unwrap(), CudaLinear::Cublas);
    set_cuda_linear(CudaLinear::CublasLt);
    assert_eq!(cuda_linear().unwrap(), CudaLinear::CublasLt);
    // on the CPU the fused entry is exactly GELU after the layer, with or without a bias and
    // with a run-time adapter (which adds before the GELU)
    let x = randn(&[2, 3, 8], 5);
    for bias in [None, Some(randn(&[6], 6))] {
        let mut lin = Linear::new(randn(&[6, 8], 7), bias).unwrap();
        let want = gelu_tanh(&lin.forward(&x).unwrap()).unwrap();
        assert_eq!(max_diff(&lin.forward_gelu(&x).unwrap(), &want), 0.0);
        let delta = RuntimeDelta {
            down: Some(randn(&[2, 8], 8)),
            up: Some(randn(&[6, 2], 9)),
            dense: None,
            bias: None,
        };
        lin.set_runtime(Some(delta), DType::F32, &Device::Cpu)
            .unwrap();
        let want = gelu_tanh(&lin.forward(&x).unwrap()).unwrap();
        assert_eq!(max_diff(&lin.forward_gelu(&x).unwrap(), &want), 0.0);
        assert_eq!(lin.forward_gelu(&x).unwrap().dims(), [2, 3, 6]);
    }
}

#[test]
fn rope_is_identity_at_position_zero() {
    let zeros = Tensor::zeros((1, 4, 3), DType::F32, &Device::Cpu).unwrap();
    for mode in [AngleMode::F32, AngleMode::F64] {
        let pe = rope_table(&zeros, &[4, 6, 6], 10_000.0, mode).unwrap();
        let x = randn(&[1, 2, 4, 16], 3);
        let y = apply_rope(&x, &pe).unwrap();
        let diff = max_abs_diff(&x, &y);
        assert_eq!(diff, 0.0);
    }
}

#[test]
fn rope_rotates_pairs_by_hand() {
    // One axis of dim 2: ω = 1; position 1 rotates (1, 0) by 1 radian.
    let ids = Tensor::new(&[[[1.0f32]]], &Device::Cpu).unwrap();
    let pe = rope_table(&ids, &[2], 10_000.0, AngleMode::F64).unwrap();
    let x = Tensor::new(&[[[[1.0f32, 0.0]]]], &Device::Cpu).unwrap();
    let y = apply_rope(&x, &pe)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        (y[0] - 1.0f32.cos()).abs() < 1e-7 && (y[1] - 1.0f32.sin()).abs() < 1e-7,
        "{y:?}"
    );
    // Frequencies per axis: axis of dim 4 has ω = (1, 1/100) at theta 10000.
    let ids = Tensor::new(&[[[0.0f32, 2.0]]], &Device::Cpu).unwrap();
    let pe = rope_table(&ids, &[2, 4], 10_000.0, AngleMode::F64).unwrap();
    let cos = pe.cos.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = [1.0, 2.0f64.cos() as f32, 0.02f64.cos() as f32];
    for (c, w) in cos.iter().zip(want) {
        assert!((c - w).abs() < 1e-7, "{cos:?}");
    }
}

#[test]
fn rope_rejects_bad_axes() {
    let ids = Tensor::zeros((1, 4, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        rope_table(&ids, &[4, 5, 7], 1e4, AngleMode::F32),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        rope_table(&ids, &[8, 8], 1e4, AngleMode::F32),
        Err(Error::ShapeMismatch { .. })
    ));
    let pe = rope_table(&ids, &[4, 6, 6], 1e4, AngleMode::F32).unwrap();
    assert!(matches!(
        apply_rope(&randn(&[1, 2, 4, 18], 0), &pe),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn linear_by_hand_and_bad_input() {
    let w = Tensor::new(&[[1.0f32, 2.0], [0.0, -1.0], [3.0, 0.5]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.5f32, 0.0, -1.0], &Device::Cpu).unwrap();
    let lin = Linear::new(w, Some(b)).unwrap();
    let x = Tensor::new(&[[[2.0f32, 1.0]]], &Device::Cpu).unwrap();
    let y = lin.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 1, 3]);
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![4.5, -1.0, 5.5]
    );
    assert!(matches!(
        lin.forward(&Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap()),
        Err(Error::ShapeMismatch { .. })
    ));
    let bad_bias = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        Linear::new(
            Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
            Some(bad_bias)
        ),
        Err(Error::ShapeMismatch { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn fused_linear_equals_plain_twin(rows in 1usize..40, inp in 1usize..70, out in 1usize..50, bias: bool, seed in 0u64..1000) {
        let w = randn(&[out, inp], seed);
        let b = bias.then(|| randn(&[out], seed + 1));
        let lin = Linear::new(w, b).unwrap();
        let x = randn(&[rows, inp], seed + 2);
        let fast = lin.forward(&x).unwrap();
        let plain = lin.forward_plain(&x).unwrap();
        let d = max_abs_diff(&fast, &plain);
        prop_assert!(d <= 1e-5, "max diff {}", d);
        // strided input (a transposed view) takes the same path after a copy
        let xt = randn(&[inp, rows], seed + 3).t().unwrap();
        let d = max_abs_diff(&lin.forward(&xt).unwrap(), &lin.forward_plain(&xt.contiguous().unwrap()).unwrap());
        prop_assert!(d <= 1e-5);
    }

    #[test]
    fn rope_preserves_pair_norms(l in 1usize..12, seed in 0u64..1000, f64_angles: bool) {
        let mode = if f64_angles { AngleMode::F64 } else { AngleMode::F32 };
        let pe = rope_table(&ids(l, seed), &[4, 6, 6], 10_000.0, mode).unwrap();
        let x = randn(&[1, 3, l, 16], seed);
        let y = apply_rope(&x, &pe).unwrap();
        let norms = |t: &Tensor| t.reshape((1, 3, l, 8, 2)).unwrap().sqr().unwrap().sum(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in norms(&x).iter().zip(norms(&y)) {
            prop_assert!((a - b).abs() <= 1e-5 * a.max(1.0), "{} vs {}", a, b);
        }
    }

    #[test]
    fn tiled_cpu_attention_equals_composite(b in 1usize..3, h in 1usize..3, lq in 1usize..300, lk in 1usize..600, d in 1usize..40, dv in 1usize..20, seed in 0u64..1000, big: bool) {
        // lengths across the 128-query block, 64- and 16-query slabs, 64-key chunk and 6-row tile
        // edges; `big` scales logits so that the running maximum moves between key chunks
        let mul = if big { 8.0 } else { 1.0 };
        let q = (randn(&[b, h, lq, d], seed) * mul).unwrap();
        let k = randn(&[b, h, lk, d], seed + 1);
        let v = randn(&[b, h, lk, dv], seed + 2);
        let t = attention(&q, &k, &v, AttnOpts::default()).unwrap();
        let c = attention_composite(&q, &k, &v, AttnOpts::default()).unwrap();
        prop_assert_eq!(t.dims(), &[b, h, lq, dv]);
        let diff = max_diff(&t, &c);
        // both sides are f32: with logits of tens (`big`) one ulp of a logit is ~4e-6 of its
        // exponential, so the two summation orders may differ by a few 1e-6 there
        let tol = if big { 1e-5 } else { 2e-6 };
        prop_assert!(diff <= tol, "max diff {}", diff);
        // the same inputs as strided head views of token-major projections (as the DiT passes
        // them), and the token-major output
        let view = |x: &Tensor, s: u64| {
            let (_, _, l, dd) = x.dims4().unwrap();
            let p = randn(&[b, l, h + 2, dd], s);
            let p = p.slice_assign(&[0..b, 0..l, 1..h + 1, 0..dd], &x.transpose(1, 2).unwrap()).unwrap();
            p.narrow(2, 1, h).unwrap().transpose(1, 2).unwrap()
        };
        let (qs, ks, vs) = (view(&q, seed + 7), view(&k, seed + 8), view(&v, seed + 9));
        prop_assert!(max_diff(&qs, &q) == 0.0 && (lq == 1 || !qs.is_contiguous()));
        let t = attention(&qs, &ks, &vs, AttnOpts::default()).unwrap();
        prop_assert!(max_diff(&t, &c) <= tol, "strided: max diff {}", max_diff(&t, &c));
        let t = attention_tokens(&qs, &ks, &vs, AttnOpts::default()).unwrap();
        let c = c.transpose(1, 2).unwrap().reshape((b, lq, h * dv)).unwrap();
        prop_assert!(max_diff(&t, &c) <= tol, "tokens: max diff {}", max_diff(&t, &c));
    }

    #[test]
    fn fused_cpu_ops_equal_their_plain_twins(b in 1usize..3, l in 1usize..20, c in 1usize..70, h in 1usize..4, half_d in 1usize..12, seed in 0u64..1000) {
        let x = (randn(&[b, l, c], seed) * 3.0).unwrap();
        let m = randn(&[b, 1, 3 * c], seed + 1);
        let ch = |i: usize| m.narrow(2, i * c, c).unwrap();
        let fused = layer_norm_modulate(&x, &ch(0), &ch(1), 1e-6).unwrap();
        let plain = modulate(&layer_norm(&x, 1e-6).unwrap(), &ch(0), &ch(1)).unwrap();
        prop_assert!(max_diff(&fused, &plain) <= 1e-4, "ln_modulate {}", max_diff(&fused, &plain));
        let y = randn(&[b, l, c], seed + 2);
        let fused = gated_residual(&x, &ch(2), &y).unwrap();
        let plain = (&x + ch(2).broadcast_mul(&y).unwrap()).unwrap();
        prop_assert!(max_diff(&fused, &plain) <= 1e-6);
        let d = 2 * half_d;
        let q = (randn(&[b, h, l, d], seed + 3) * 5.0).unwrap();
        let s = randn(&[d], seed + 4);
        let ang = (randn(&[1, 1, l, half_d], seed + 5) * 3.0).unwrap();
        let pe = RopeTable { cos: ang.cos().unwrap(), sin: ang.sin().unwrap() };
        let fused = qk_norm_rope(&q, &s, 1e-6, &pe).unwrap();
        let plain = apply_rope(&rms_norm(&q, &s, 1e-6).unwrap(), &pe).unwrap();
        prop_assert!(max_diff(&fused, &plain) <= 1e-5, "qk_norm_rope {}", max_diff(&fused, &plain));
        // q as a head view of a token-major projection (read in place)
        let proj = randn(&[b, l, 2 * h + 1, d], seed + 7);
        let qv = proj.narrow(2, h + 1, h).unwrap().transpose(1, 2).unwrap();
        let fused = qk_norm_rope(&qv, &s, 1e-6, &pe).unwrap();
        let plain = apply_rope(&rms_norm(&qv.contiguous().unwrap(), &s, 1e-6).unwrap(), &pe).unwrap();
        prop_assert!(max_diff(&fused, &plain) <= 1e-5, "strided qk_norm_rope {}", max_diff(&fused, &plain));
        // GELU through the fast exp vs candle's tanh form, over ±12 (both tails)
        let g = (randn(&[b, l, c], seed + 6) * 12.0).unwrap();
        let fused = gelu_tanh(&g).unwrap();
        let plain = g.gelu().unwrap();
        prop_assert!(max_diff(&fused, &plain) <= 4e-6, "gelu {}", max_diff(&fused, &plain));
        // [a, GELU(m)] with m a slice of a wider projection, vs candle's cat and GELU
        let wide = (randn(&[b, l, 2 * c + 3], seed + 8) * 12.0).unwrap();
        let m = wide.narrow(2, c + 3, c).unwrap();
        let a = wide.narrow(2, 0, c).unwrap();
        let fused = cat_gelu_tanh(&a, &m).unwrap();
        let plain = Tensor::cat(&[a.clone(), m.gelu().unwrap()], 2).unwrap();
        prop_assert!(max_diff(&fused, &plain) <= 4e-6, "cat_gelu {}", max_diff(&fused, &plain));
    }

    #[test]
    fn softmax_rows_sum_to_one(rows in 1usize..6, cols in 1usize..40, seed in 0u64..1000) {
        let x = (randn(&[rows, cols], seed) * 30.0).unwrap();
        let s = softmax_last_dim(&x).unwrap().sum(D::Minus1).unwrap().to_vec1::<f32>().unwrap();
        for v in s {
            prop_assert!((v - 1.0).abs() < 1e-5);
        }
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b)
}

#[test]
fn attention_tokens_is_attention_in_token_major_layout() {
    let (q, k, v) = (
        randn(&[2, 3, 5, 4], 11),
        randn(&[2, 3, 7, 4], 12),
        randn(&[2, 3, 7, 4], 13),
    );
    let a = attention(&q, &k, &v, AttnOpts::default()).unwrap();
    let t = attention_tokens(&q, &k, &v, AttnOpts::default()).unwrap();
    assert_eq!(t.dims(), [2, 5, 12]);
    let expect = a.transpose(1, 2).unwrap().reshape((2, 5, 12)).unwrap();
    assert_eq!(max_diff(&t, &expect), 0.0);
    // the CPU's tiled online softmax agrees with the composite path to rounding
    let c = attention_composite(&q, &k, &v, AttnOpts::default()).unwrap();
    assert!(max_diff(&a, &c) < 1e-6, "{}", max_diff(&a, &c));
}

#[test]
fn fused_entry_points_equal_their_parts_on_cpu() {
    // The CPU path of each fused entry point is its plain twin; the CUDA kernels are checked
    // against these by `flux-gpu-check ops` on a GPU machine.
    let x = randn(&[2, 6, 8], 21);
    let m = randn(&[2, 1, 24], 22);
    let (shift, scale, gate) = (
        m.narrow(2, 0, 8).unwrap(),
        m.narrow(2, 8, 8).unwrap(),
        m.narrow(2, 16, 8).unwrap(),
    );
    let fused = layer_norm_modulate(&x, &shift, &scale, 1e-6).unwrap();
    let plain = modulate(&layer_norm(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
    assert!(max_diff(&fused, &plain) < 1e-5);
    // LayerNorm output has zero mean per row before modulation: spot-check the math too.
    let ln = layer_norm(&x, 1e-6).unwrap();
    let mean = ln.mean_keepdim(D::Minus1).unwrap().abs().unwrap();
    assert!(
        mean.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            < 1e-6
    );

    let y = randn(&[2, 6, 8], 23);
    let g = gated_residual(&x, &gate, &y).unwrap();
    let by_hand = (&x + gate.broadcast_mul(&y).unwrap()).unwrap();
    assert!(max_diff(&g, &by_hand) < 1e-6);

    // QK-norm + RoPE on a strided view (as the DiT passes q): RMSNorm then rotation.
    let qkv = randn(&[1, 5, 3 * 2, 8], 24);
    let q = qkv.narrow(2, 2, 2).unwrap().transpose(1, 2).unwrap(); // (1, 2, 5, 8) view
    let s = randn(&[8], 25);
    let pe = rope_table(&ids(5, 3), &[2, 2, 4], 10_000.0, AngleMode::F32).unwrap();
    let fused = qk_norm_rope(&q, &s, 1e-6, &pe).unwrap();
    let plain = apply_rope(&rms_norm(&q.contiguous().unwrap(), &s, 1e-6).unwrap(), &pe).unwrap();
    assert_eq!(fused.dims(), [1, 2, 5, 8]);
    assert!(max_diff(&fused, &plain) < 1e-5);
}

#[test]
fn checkpoint_from_tensors_is_as_strict_as_files() {
    let mut map = std::collections::HashMap::new();
    map.insert("a.weight".to_string(), randn(&[2, 3], 31));
    map.insert("b.weight".to_string(), randn(&[4], 32));
    let ck = Checkpoint::from_tensors(map, DType::BF16, &Device::Cpu, "made in memory").unwrap();
    let a = ck.get("a.weight", Some(&[2, 3])).unwrap();
    assert_eq!(a.dtype(), DType::BF16);
    match ck.get("a.weight", Some(&[3, 2])) {
        Err(Error::Load(LoadError::TensorShape { name, .. })) => assert_eq!(name, "a.weight"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    match ck.get("c.weight", None) {
        Err(Error::Load(LoadError::MissingTensor { name, source_desc })) => {
            assert_eq!(name, "c.weight");
            assert_eq!(source_desc, "made in memory");
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    match ck.finish(|_| false) {
        Err(Error::Load(LoadError::UnexpectedTensors { names, .. })) => {
            assert_eq!(names, ["b.weight"])
        }
        other => panic!("expected leftovers, got {other:?}"),
    }
    assert!(matches!(
        Checkpoint::from_tensors(Default::default(), DType::U8, &Device::Cpu, "x"),
        Err(Error::UnsupportedDtype { .. })
    ));
}

#[test]
fn checkpoint_from_weights_keeps_packed_weights_packed() {
    let v: Vec<f32> = (0..4 * 256)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
        .collect();
    let q = PackedWeight::quantize(QuantType::Q4_K, &v, 4, 256).unwrap();
    let mut map = std::collections::HashMap::new();
    map.insert("w.weight".to_string(), LinearWeight::Packed(q.clone()));
    map.insert("w.bias".to_string(), LinearWeight::Dense(randn(&[4], 33)));
    let ck = Checkpoint::from_weights(map, DType::F32, &Device::Cpu, "in memory").unwrap();
    assert_eq!(ck.shape("w.weight"), Some(&[4usize, 256][..]));
    assert_eq!(
        ck.stored_type("w.weight"),
        Some(StoredType::Gguf(QuantType::Q4_K))
    );
    assert_eq!(ck.stored_type("w.bias"), None);
    match ck.get_weight("w.weight", &[4, 256]).unwrap() {
        LinearWeight::Packed(p) => {
            assert_eq!(p.encoding(), Encoding::Gguf(QuantType::Q4_K));
            assert_eq!(p.bytes(), q.bytes());
        }
        LinearWeight::Dense(_) => panic!("a packed weight came back dense"),
    }
    // `get` decodes it, exactly as the packed weight decodes
    let dense = ck.get("w.weight", Some(&[4, 256])).unwrap();
    let want = q.dequantize().unwrap();
    assert_eq!(dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    assert!(matches!(
        ck.get_weight("w.weight", &[256, 4]),
        Err(Error::Load(LoadError::TensorShape { .. }))
    ));
    match ck.finish(|_| false) {
        Err(Error::Load(LoadError::UnexpectedTensors { names, .. })) => {
            assert_eq!(names, ["w.bias"])
        }
        other => panic!("expected leftovers, got {other:?}"),
    }
}

#[test]
fn cat_gelu_tanh_is_cat_of_gelu_and_checks_shapes() {
    let a = randn(&[2, 3, 4], 41);
    let h = randn(&[2, 3, 10], 42);
    let m = h.narrow(2, 4, 6).unwrap(); // a strided view, as the single block passes it
    let out = cat_gelu_tanh(&a, &m).unwrap();
    assert_eq!(out.dims(), [2, 3, 10]);
    let expect = Tensor::cat(&[a.clone(), gelu_tanh(&m).unwrap()], 2).unwrap();
    assert_eq!(max_diff(&out, &expect), 0.0);
    let bad = randn(&[2, 4, 6], 43);
    assert!(matches!(
        cat_gelu_tanh(&a, &bad),
        Err(Error::ShapeMismatch { .. })
    ));
}
