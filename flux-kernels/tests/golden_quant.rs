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
