//! GGUF files: our writer read back by our reader, packed `Linear`s against their dense twins,
//! and every class of corrupt header giving its typed error (never a panic or a huge
//! allocation).

use candle::{DType, Device, Tensor};
use flux_kernels::gguf::{self, GgufError, TensorOut, Value};
use flux_kernels::{
    Checkpoint, Encoding, Error, Fp8Kind, Linear, LinearWeight, LoadError, PackedWeight, QuantType,
};

fn tmp(name: &str) -> std::path::PathBuf {
    flux_golden::scratch(name)
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

/// A small valid file: one Q8_0 (2, 64) tensor and one F32 (3,) tensor.
fn valid_file() -> Vec<u8> {
    let w = flux_kernels::quantize(QuantType::Q8_0, &values(128, 1), 64).unwrap();
    let b: Vec<u8> = [1f32, 2.0, 3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let p = tmp("valid.gguf");
    gguf::write(
        &p,
        &[("general.architecture", Value::Str("flux".into()))],
        &[
            TensorOut {
                name: "w",
                ty: QuantType::Q8_0,
                shape: &[2, 64],
                data: &w,
            },
            TensorOut {
                name: "b",
                ty: QuantType::F32,
                shape: &[3],
                data: &b,
            },
        ],
    )
    .unwrap();
    std::fs::read(&p).unwrap()
}

#[test]
fn writer_and_reader_round_trip() {
    let bytes = valid_file();
    let h = gguf::parse(&bytes).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(h.metadata["general.architecture"].as_str(), Some("flux"));
    assert_eq!(h.tensors[0].shape, [2, 64]);
    assert_eq!(h.tensors[0].ty, QuantType::Q8_0);
    assert_eq!(h.tensors[0].start % 32, 0);
    assert_eq!(h.tensors[1].shape, [3]);
    let ck = Checkpoint::open(&[tmp("valid.gguf")], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        ck.get("b", Some(&[3])).unwrap().to_vec1::<f32>().unwrap(),
        [1.0, 2.0, 3.0]
    );
    let dense = ck.get("w", Some(&[2, 64])).unwrap();
    let want = flux_kernels::dequantize(
        QuantType::Q8_0,
        &bytes[h.tensors[0].start..h.tensors[0].end],
        128,
    )
    .unwrap();
    assert_eq!(dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    // the same tensor as a linear weight stays packed
    match ck.get_weight("w", &[2, 64]).unwrap() {
        LinearWeight::Packed(p) => assert_eq!(p.encoding(), Encoding::Gguf(QuantType::Q8_0)),
        other => panic!("expected a packed weight, got {other:?}"),
    }
    ck.finish(|_| false).unwrap();
}

fn expect_gguf(bytes: &[u8], name: &str) -> GgufError {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    let direct = gguf::parse(bytes).expect_err("corrupt header accepted");
    match Checkpoint::open(&[p], DType::F32, &Device::Cpu) {
        Err(Error::Load(LoadError::Gguf { source, .. })) => assert_eq!(*source, direct),
        // without the magic it is not a GGUF file at all: read as safetensors, which fails
        Err(Error::Load(LoadError::File { reason, .. }))
            if matches!(direct, GgufError::BadMagic(_)) =>
        {
            assert!(
                reason.contains("not a safetensors or GGUF file"),
                "{reason}"
            )
        }
        other => panic!("{name}: expected a GGUF error, got {other:?}"),
    }
    direct
}

/// Byte offsets in `valid_file()`: header fields, then the first tensor info.
struct Layout {
    n_tensors: usize,
    n_kv: usize,
    first_dims: usize,
    first_type: usize,
    first_offset: usize,
}

fn layout() -> Layout {
    // magic 4 + version 4, n_tensors 8, n_kv 8; kv: key (8 + 20) + type 4 + string (8 + 4)
    let kv_end = 24 + 8 + "general.architecture".len() + 4 + 8 + 4;
    let name_end = kv_end + 8 + 1; // "w"
    Layout {
        n_tensors: 8,
        n_kv: 16,
        first_dims: name_end + 4,
        first_type: name_end + 4 + 16,
        first_offset: name_end + 4 + 16 + 4,
    }
}

#[test]
fn corrupt_headers_are_typed_errors() {
    let good = valid_file();
    let l = layout();
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());

    // truncated anywhere in the header
    for cut in [0, 3, 7, 20, l.first_dims, l.first_offset + 4] {
        assert!(
            matches!(
                expect_gguf(&good[..cut.max(4)], "trunc.gguf"),
                GgufError::Truncated { .. } | GgufError::BadMagic(_)
            ),
            "cut {cut}"
        );
    }
    // truncated data: the tensor's bytes lie past the end
    assert!(matches!(
        expect_gguf(&good[..good.len() - 40], "short.gguf"),
        GgufError::OutOfBounds { .. }
    ));
    // magic and version
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(
        expect_gguf(&b, "magic.gguf"),
        GgufError::BadMagic(_)
    ));
    let mut b = good.clone();
    put32(&mut b, 4, 9);
    assert_eq!(expect_gguf(&b, "version.gguf"), GgufError::Version(9));
    // counts far beyond the file (would allocate terabytes if trusted)
    for (at, what) in [(l.n_tensors, "tensor count"), (l.n_kv, "metadata count")] {
        let mut b = good.clone();
        put64(&mut b, at, u64::MAX / 2);
        match expect_gguf(&b, "count.gguf") {
            GgufError::Count { what: w, .. } => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
    // a string length beyond the file
    let mut b = good.clone();
    put64(&mut b, 24, 1 << 40);
    assert!(matches!(
        expect_gguf(&b, "strlen.gguf"),
        GgufError::Count {
            what: "metadata key",
            ..
        }
    ));
    // an unknown metadata value type
    let mut b = good.clone();
    put32(&mut b, 24 + 8 + 20, 77);
    assert!(matches!(
        expect_gguf(&b, "vtype.gguf"),
        GgufError::ValueType { id: 77, .. }
    ));
    // dimensions: too many, zero, overflowing, not whole blocks
    let mut b = good.clone();
    put32(&mut b, l.first_dims - 4, 9);
    assert!(matches!(
        expect_gguf(&b, "ndims.gguf"),
        GgufError::Dims { .. }
    ));
    let mut b = good.clone();
    put64(&mut b, l.first_dims, 0);
    assert!(matches!(
        expect_gguf(&b, "zero.gguf"),
        GgufError::Dims { .. }
    ));
    let mut b = good.clone();
    put64(&mut b, l.first_dims + 8, u64::MAX / 3);
    assert!(matches!(
        expect_gguf(&b, "huge.gguf"),
        GgufError::Dims { .. }
    ));
    let mut b = good.clone();
    put64(&mut b, l.first_dims, 63);
    assert!(matches!(
        expect_gguf(&b, "blocks.gguf"),
        GgufError::Dims { .. }
    ));
    // unknown tensor type (IQ2_XXS) and one candle has no reader for
    for id in [16u32, 99] {
        let mut b = good.clone();
        put32(&mut b, l.first_type, id);
        assert!(matches!(
            expect_gguf(&b, "ttype.gguf"),
            GgufError::TensorType { .. }
        ));
    }
    // misaligned and out-of-range offsets
    let mut b = good.clone();
    put64(&mut b, l.first_offset, 3);
    assert!(matches!(
        expect_gguf(&b, "misaligned.gguf"),
        GgufError::Misaligned { offset: 3, .. }
    ));
    let mut b = good.clone();
    put64(&mut b, l.first_offset, u64::MAX - 31);
    assert!(matches!(
        expect_gguf(&b, "offset.gguf"),
        GgufError::OutOfBounds { .. }
    ));
}

#[test]
fn bad_alignment_and_duplicates_are_typed_errors() {
    let w = vec![0u8; 34];
    let p = tmp("align.gguf");
    for (align, ok) in [
        (Value::U64(0), false),
        (Value::U64(48), false),
        (Value::U64(64), true),
    ] {
        gguf::write(
            &p,
            &[("general.alignment", align)],
            &[TensorOut {
                name: "w",
                ty: QuantType::Q8_0,
                shape: &[32],
                data: &w,
            }],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        // our writer pads to 32: a file that declares 64 must have its data on 64
        let r = gguf::parse(&bytes);
        if ok {
            assert!(matches!(
                r,
                Ok(_) | Err(GgufError::OutOfBounds { .. }) | Err(GgufError::Misaligned { .. })
            ));
        } else {
            assert!(matches!(r, Err(GgufError::Alignment(_))), "{r:?}");
        }
    }
    gguf::write(
        &p,
        &[],
        &[
            TensorOut {
                name: "w",
                ty: QuantType::Q8_0,
                shape: &[32],
                data: &w,
            },
            TensorOut {
                name: "w",
                ty: QuantType::Q8_0,
                shape: &[32],
                data: &w,
            },
        ],
    )
    .unwrap();
    assert_eq!(
        gguf::parse(&std::fs::read(&p).unwrap()),
        Err(GgufError::Duplicate("w".into()))
    );
    // the writer refuses data that does not match the shape
    assert!(gguf::write(
        &p,
        &[],
        &[TensorOut {
            name: "w",
            ty: QuantType::Q8_0,
            shape: &[33],
            data: &w
        }]
    )
    .is_err());
}

#[test]
fn packed_linear_equals_its_dense_twin() {
    let (out, inp, rows) = (48, 256, 5);
    let x = Tensor::from_vec(values(rows * inp, 7), (rows, inp), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(values(out, 8), out, &Device::Cpu).unwrap();
    let encodings: Vec<Encoding> = QuantType::ALL
        .into_iter()
        .filter(|t| t.is_quantized())
        .map(Encoding::Gguf)
        .chain([Encoding::Fp8(Fp8Kind::E4M3), Encoding::Fp8(Fp8Kind::E5M2)])
        .collect();
    for enc in encodings {
        let w = match enc {
            Encoding::Gguf(t) => {
                PackedWeight::quantize(t, &values(out * inp, 9), out, inp).unwrap()
            }
            Encoding::Fp8(k) => {
                let bytes: Vec<u8> = (0..out * inp).map(|i| (i * 7 % 120) as u8).collect();
                let scale: Vec<f32> = (0..out).map(|r| 0.01 * (1 + r % 3) as f32).collect();
                let _ = k;
                PackedWeight::new(enc, bytes, out, inp, scale).unwrap()
            }
        };
        let dense = Tensor::from_vec(w.dequantize().unwrap(), (out, inp), &Device::Cpu).unwrap();
        let twin = Linear::new(dense, Some(bias.clone())).unwrap();
        let packed = Linear::from_weight(
            LinearWeight::Packed(w.clone()),
            Some(bias.clone()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        assert_eq!(packed.dims(), (inp, out));
        let a = packed.forward(&x).unwrap();
        let b = twin.forward(&x).unwrap();
        let diff = flux_golden::max_abs_diff(&a, &b);
        let size = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0) as f64;
        assert!(
            diff < 1e-6 * size,
            "{enc}: packed vs dense {diff} (outputs up to {size})"
        );
        // the plain path (bf16 activations) decodes the same weight
        let b16 = bias.to_dtype(DType::BF16).unwrap();
        let packed16 = Linear::from_weight(
            LinearWeight::Packed(w.clone()),
            Some(b16),
            &Device::Cpu,
            DType::BF16,
        )
        .unwrap();
        let p16 = packed16.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(p16.dtype(), DType::BF16);
        let d16 = flux_golden::max_abs_diff(&p16.to_dtype(DType::F32).unwrap(), &b);
        assert!(d16 < 0.02 * size, "{enc}: bf16 packed vs f32 dense {d16}");
        // the path of other devices (candle's dequantization kernels, the fp8 table as a
        // tensor), run here on the CPU
        let dev = Linear::from_weight_device_path(
            w.clone(),
            Some(bias.clone()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let d = flux_golden::max_abs_diff(&dev.forward(&x).unwrap(), &b);
        assert!(d < 1e-5 * size, "{enc}: device path vs dense {d}");
        // and the weight accessor hands back the decoded (out, in) weight
        assert_eq!(packed.weight().unwrap().dims(), [out, inp]);
    }
}

#[test]
fn packed_weight_checks_its_sizes() {
    assert!(PackedWeight::new(
        Encoding::Gguf(QuantType::Q4_K),
        vec![0; 144],
        2,
        256,
        vec![]
    )
    .is_err());
    assert!(PackedWeight::new(
        Encoding::Gguf(QuantType::Q4_K),
        vec![0; 144],
        1,
        255,
        vec![]
    )
    .is_err());
    assert!(
        PackedWeight::new(Encoding::Fp8(Fp8Kind::E4M3), vec![0; 6], 2, 3, vec![1.0; 3]).is_err()
    );
    assert!(
        PackedWeight::new(Encoding::Fp8(Fp8Kind::E4M3), vec![0; 6], 2, 3, vec![1.0; 2]).is_ok()
    );
    assert!(PackedWeight::new(
        Encoding::Gguf(QuantType::Q8_0),
        vec![0; 34],
        1,
        32,
        vec![2.0]
    )
    .is_err());
    assert!(PackedWeight::new(
        Encoding::Gguf(QuantType::Q8_0),
        vec![0; 34],
        usize::MAX,
        32,
        vec![]
    )
    .is_err());
}
