//! The integer-kernel path for packed GGUF weights (`set_quant_matmul(Integer)`), alone in its
//! test binary because the policy is process-wide.

use candle::{DType, Device, Tensor};
use flux_kernels::{set_quant_matmul, Linear, LinearWeight, PackedWeight, QuantMatmul, QuantType};

#[test]
fn integer_kernels_agree_with_decoding() {
    let (out, inp, rows) = (32, 512, 6);
    let v: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.1)
        .collect();
    let x: Vec<f32> = (0..rows * inp)
        .map(|i| ((i * 104729 % 997) as f32 / 997.0 - 0.5) * 2.0)
        .collect();
    let x = Tensor::from_vec(x, (rows, inp), &Device::Cpu).unwrap();
    let bias = Tensor::from_vec(
        (0..out).map(|i| i as f32 * 0.01).collect::<Vec<_>>(),
        out,
        &Device::Cpu,
    )
    .unwrap();
    for ty in [
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q6_K,
        QuantType::Q5_0,
    ] {
        let w = PackedWeight::quantize(ty, &v, out, inp).unwrap();
        let make = |p: QuantMatmul| {
            set_quant_matmul(p);
            Linear::from_weight(
                LinearWeight::Packed(w.clone()),
                Some(bias.clone()),
                &Device::Cpu,
                DType::F32,
            )
            .unwrap()
        };
        let decode = make(QuantMatmul::Decode);
        let integer = make(QuantMatmul::Integer);
        set_quant_matmul(QuantMatmul::Decode);
        assert_eq!(decode.encoding(), ty.name());
        let a = decode.forward(&x).unwrap();
        let b = integer.forward(&x).unwrap();
        assert_eq!(b.dims(), [rows, out]);
        // the integer path quantizes the activations to 8 bits: a small relative error
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let diff = flux_golden::max_abs_diff(&a, &b);
        assert!(
            diff <= 0.02 * scale,
            "{ty}: integer vs decode {diff} (outputs up to {scale})"
        );
        assert_eq!(integer.weight().unwrap().dims(), [out, inp]);
        eprintln!(
            "{ty}: {} — max diff {diff:.2e} of {scale:.2e}",
            integer.encoding()
        );
    }
}
