//! flux-kernels against PyTorch and diffusers (`cargo xtask golden gen kernels`).

use candle::{DType, Tensor};
use flux_golden::{Golden, Tolerance};
use flux_kernels::*;

fn golden() -> Golden {
    Golden::open(env!("CARGO_MANIFEST_DIR"), "ops")
}

#[test]
fn attention_plain_bias_causal_and_bf16() {
    let g = golden();
    let (q, k, v) = (g.tensor("attn/q"), g.tensor("attn/k"), g.tensor("attn/v"));
    let out = attention(&q, &k, &v, AttnOpts::default()).unwrap();
    g.check("attn/plain", &out, &g.tensor("attn/plain"), Tolerance::F32);
    let bias = g.tensor("attn/bias");
    let out = attention(
        &q,
        &k,
        &v,
        AttnOpts {
            bias: Some(&bias),
            scale: Some(1.0),
            ..Default::default()
        },
    )
    .unwrap();
    g.check(
        "attn/bias_scale1",
        &out,
        &g.tensor("attn/bias_scale1"),
        Tolerance::F32,
    );
    let out = attention(
        &q,
        &g.tensor("attn/kc"),
        &g.tensor("attn/vc"),
        AttnOpts {
            causal: true,
            ..Default::default()
        },
    )
    .unwrap();
    g.check(
        "attn/causal",
        &out,
        &g.tensor("attn/causal"),
        Tolerance::F32,
    );
    let b = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let out = attention(&b(&q), &b(&k), &b(&v), AttnOpts::default()).unwrap();
    g.check("attn/bf16", &out, &g.tensor("attn/bf16"), Tolerance::BF16);
}

#[test]
fn rope_tables_f64_and_f32_and_application() {
    let g = golden();
    let ids = g.tensor("rope/ids").unsqueeze(0).unwrap();
    let l = ids.dim(1).unwrap();
    let axes: Vec<usize> = g.meta()["axes_dim"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    for (mode, tag) in [(AngleMode::F64, "f64"), (AngleMode::F32, "f32")] {
        let pe = rope_table(&ids, &axes, 10_000.0, mode).unwrap();
        let cos = pe.cos.reshape((l, ())).unwrap();
        let sin = pe.sin.reshape((l, ())).unwrap();
        g.check(
            &format!("rope/{tag}_cos"),
            &cos,
            &g.tensor(&format!("rope/{tag}_cos")),
            Tolerance::F32,
        );
        g.check(
            &format!("rope/{tag}_sin"),
            &sin,
            &g.tensor(&format!("rope/{tag}_sin")),
            Tolerance::F32,
        );
        if mode == AngleMode::F64 {
            let x = apply_rope(&g.tensor("rope/x"), &pe).unwrap();
            g.check(
                "rope/x_rotated",
                &x,
                &g.tensor("rope/x_rotated"),
                Tolerance::F32,
            );
        }
    }
}

#[test]
fn norms_activations_and_modulation() {
    let g = golden();
    let x = g.tensor("norm/x");
    let xb = x.to_dtype(DType::BF16).unwrap();
    let scale = g.tensor("norm/rms_scale");
    g.check(
        "norm/rms",
        &rms_norm(&x, &scale, 1e-6).unwrap(),
        &g.tensor("norm/rms"),
        Tolerance::F32,
    );
    let sb = scale.to_dtype(DType::BF16).unwrap();
    g.check(
        "norm/rms_bf16",
        &rms_norm(&xb, &sb, 1e-6).unwrap(),
        &g.tensor("norm/rms_bf16"),
        Tolerance::BF16,
    );
    g.check(
        "norm/layer",
        &layer_norm(&x, 1e-6).unwrap(),
        &g.tensor("norm/layer"),
        Tolerance::F32,
    );
    g.check(
        "norm/layer_bf16",
        &layer_norm(&xb, 1e-6).unwrap(),
        &g.tensor("norm/layer_bf16"),
        Tolerance::BF16,
    );
    g.check(
        "act/gelu_tanh",
        &gelu_tanh(&x).unwrap(),
        &g.tensor("act/gelu_tanh"),
        Tolerance::F32,
    );
    g.check(
        "act/gelu_tanh_bf16",
        &gelu_tanh(&xb).unwrap(),
        &g.tensor("act/gelu_tanh_bf16"),
        Tolerance::BF16,
    );
    g.check(
        "act/silu",
        &silu(&x).unwrap(),
        &g.tensor("act/silu"),
        Tolerance::F32,
    );
    let out = modulate(&x, &g.tensor("mod/shift"), &g.tensor("mod/scale")).unwrap();
    g.check("mod/out", &out, &g.tensor("mod/out"), Tolerance::F32);
}
