//! Decoding of every GGUF type and both fp8 formats against the reference (`gguf` 0.19's numpy
//! dequantization, torch's fp8 casts), bit for bit (`cargo xtask golden gen kernels`).

use candle::{DType, Device};
use flux_golden::{Golden, Tolerance};
use flux_kernels::{Checkpoint, Fp8Kind, QuantType, StoredType};

fn golden() -> Golden {
    Golden::open(env!("CARGO_MANIFEST_DIR"), "quant_blocks")
}

fn gguf_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/quant_blocks.gguf")
}

/// Bitwise equality, NaN matching NaN; panics naming the first differing element, then
/// records the golden table row.
fn assert_bits(g: &Golden, case: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{case}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        if a.to_bits() != e.to_bits() && !(a.is_nan() && e.is_nan()) {
            panic!(
                "{case}: element {i}: ours {a:e} ({:#010x}), reference {e:e} ({:#010x})",
                a.to_bits(),
                e.to_bits()
            );
        }
    }
    let finite = |v: &[f32]| {
        let v: Vec<f32> = v
            .iter()
            .map(|x| if x.is_nan() { 0.0 } else { *x })
            .collect();
        candle::Tensor::from_vec(v, actual.len(), &Device::Cpu).unwrap()
    };
    g.check(case, &finite(actual), &finite(expected), Tolerance::EXACT);
}

#[test]
fn every_gguf_type_decodes_bit_for_bit() {
    let g = golden();
    let ck = Checkpoint::open(&[gguf_path()], DType::F32, &Device::Cpu).unwrap();
    let mut seen = std::collections::HashSet::new();
    for ty in QuantType::ALL {
        for suffix in ["", "_edge"] {
            let key = format!("{}{suffix}", ty.name());
            if !ck.contains(&key) {
                continue;
            }
            assert_eq!(ck.stored_type(&key), Some(StoredType::Gguf(ty)));
            let t = ck.get(&key, Some(&[4, 512])).unwrap();
            let ours = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = g
                .tensor(&key)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_bits(&g, &format!("gguf/{key}"), &ours, &want);
            seen.insert(ty);
        }
    }
    assert_eq!(
        seen.len(),
        QuantType::ALL.len(),
        "a type is missing from the golden file"
    );
    ck.finish(|_| false).unwrap();
    assert_eq!(
        ck.gguf_metadata("general.architecture")
            .and_then(|v| v.as_str()),
        Some("flux")
    );
}

#[test]
fn fp8_tables_match_torch() {
    let g = golden();
    for (kind, key) in [(Fp8Kind::E4M3, "fp8/e4m3"), (Fp8Kind::E5M2, "fp8/e5m2")] {
        let want = g.tensor(key).to_vec1::<f32>().unwrap();
        assert_bits(&g, key, kind.table(), &want);
    }
}

fn fp8_golden() -> Golden {
    Golden::open(env!("CARGO_MANIFEST_DIR"), "fp8_gemm")
}

/// The activations' rounding of an fp8 GEMM equals torch's per-tensor e4m3 cast bit for bit,
/// exact ties (rounded to even) and signed zeros included, on the host and through the tensor
/// function the layers use.
#[test]
fn fp8_rounding_matches_torch() {
    let g = fp8_golden();
    for key in ["fp8/ties", "fp8/x"] {
        let x = g.tensor(key);
        let want = g
            .tensor(&format!("{key}_rounded"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_bits(&g, key, &flux_kernels::fp8_round(Fp8Kind::E4M3, &v), &want);
        let t = flux_kernels::fp8_round_tensor(&x).unwrap();
        assert_eq!(t.dims(), x.dims());
        let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_bits(&g, &format!("{key} (tensor)"), &t, &want);
    }
    // all zeros keep scale 1 and stay zero
    assert_eq!(
        flux_kernels::fp8_round(Fp8Kind::E4M3, &[0.0; 5]),
        vec![0.0; 5]
    );
}

/// A layer multiplying in fp8 (weight encoded at load, activations rounded per product) equals
/// the reference's fp8 linear in f32, densely built and from an fp8 weight, plain and with
/// the GELU; bf16 activations stay close. Without fp8 it differs (the check can fail).
#[test]
fn fp8_linear_matches_reference() {
    use flux_kernels::{Linear, LinearWeight};
    let g = fp8_golden();
    let (x, w, b) = (g.tensor("fp8/x"), g.tensor("fp8/w"), g.tensor("fp8/b"));
    let want = g.tensor("fp8/linear");
    let tol = Tolerance::new(1e-5, 1e-5);
    let dense = LinearWeight::Dense(w.clone()).for_fp8_gemm().unwrap();
    let mut lin = Linear::from_weight(dense, Some(b.clone()), &Device::Cpu, DType::F32).unwrap();
    let plain = lin.forward(&x).unwrap();
    assert!(lin.set_fp8_gemm(true));
    assert!(lin.encoding().contains("fp8 GEMM"), "{}", lin.encoding());
    g.check("fp8 linear f32", &lin.forward(&x).unwrap(), &want, tol);
    let gelu = flux_kernels::gelu_tanh(&want).unwrap();
    g.check(
        "fp8 linear + GELU",
        &lin.forward_gelu(&x).unwrap(),
        &gelu,
        tol,
    );
    // activations not rounded: clearly off
    let c = flux_golden::compare(&plain, &want, tol).unwrap();
    assert!(!c.passed && c.max_abs > 1e-3, "{c:?}");
    // bf16 activations and bias: x is rounded to bf16 before fp8, which moves a few values
    // next to a tie by one e4m3 step, so only close overall
    let lin16 = {
        let w = LinearWeight::Dense(w.clone()).for_fp8_gemm().unwrap();
        let b = b.to_dtype(DType::BF16).unwrap();
        let mut l = Linear::from_weight(w, Some(b), &Device::Cpu, DType::BF16).unwrap();
        assert!(l.set_fp8_gemm(true));
        l
    };
    let y16 = lin16.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    g.check(
        "fp8 linear bf16",
        &y16.to_dtype(DType::F32).unwrap(),
        &want,
        Tolerance::new(0.1, 0.0).with_min_cosine(0.999),
    );
    // an e5m2 weight with a scale per row is re-encoded into e4m3 with one scale
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let e5 =
        flux_kernels::PackedWeight::encode(flux_kernels::Encoding::Fp8(Fp8Kind::E5M2), &v, 32, 64)
            .unwrap();
    let LinearWeight::Packed(p) = LinearWeight::Packed(e5).for_fp8_gemm().unwrap() else {
        panic!("packed stays packed");
    };
    assert_eq!(p.encoding(), flux_kernels::Encoding::Fp8(Fp8Kind::E4M3));
    assert_eq!(p.scale().len(), 1);
    // GGUF weights keep their path
    let q8 = flux_kernels::PackedWeight::quantize(QuantType::Q8_0, &v, 32, 64).unwrap();
    let mut lq = Linear::from_weight(
        LinearWeight::Packed(q8).for_fp8_gemm().unwrap(),
        None,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(!lq.set_fp8_gemm(true));
    assert!(!lq.is_fp8_gemm());
}
