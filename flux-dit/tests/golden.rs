//! flux-dit against diffusers' FluxTransformer2DModel (tiny random weights), per module and
//! end to end, loaded from the diffusers folder and from the BFL single file
//! (`cargo xtask golden gen dit`).

use std::path::PathBuf;

use candle::{DType, Device, Tensor};
use flux_dit::*;
use flux_golden::{max_abs_diff, Golden, Tolerance};

fn golden(file: &str) -> Golden {
    Golden::open(env!("CARGO_MANIFEST_DIR"), file)
}

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(name)
}

/// The diffusers goldens use f64 RoPE angles.
const DIFFUSERS: FluxOptions = FluxOptions {
    rope: AngleMode::F64,
    composite_attention: false,
    quantize: None,
    fp8_gemm: false,
};

fn load_both(name: &str, dtype: DType) -> (Flux, Flux) {
    let a = Flux::from_diffusers_folder(
        dir(&format!("{name}_diffusers")),
        dtype,
        &Device::Cpu,
        DIFFUSERS,
    )
    .unwrap();
    let b = Flux::from_bfl_file(
        dir(&format!("{name}_bfl.safetensors")),
        a.config(),
        dtype,
        &Device::Cpu,
        DIFFUSERS,
    )
    .unwrap();
    (a, b)
}

struct Inputs {
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: Tensor,
    y: Tensor,
    guidance: Option<Tensor>,
}

fn inputs(g: &Golden, dtype: DType) -> Inputs {
    let img = g.tensor("input/img");
    let b = img.dim(0).unwrap();
    let names = g.names();
    let expand = |t: Tensor| t.unsqueeze(0).unwrap().repeat((b, 1, 1)).unwrap();
    Inputs {
        img: img.to_dtype(dtype).unwrap(),
        img_ids: expand(g.tensor("input/img_ids")),
        txt: g.tensor("input/txt").to_dtype(dtype).unwrap(),
        txt_ids: expand(g.tensor("input/txt_ids")),
        timesteps: g.tensor("input/timesteps").to_dtype(dtype).unwrap(),
        y: g.tensor("input/y").to_dtype(dtype).unwrap(),
        guidance: names
            .iter()
            .any(|n| n == "input/guidance")
            .then(|| g.tensor("input/guidance")),
    }
}

fn run(model: &Flux, i: &Inputs) -> Tensor {
    model
        .forward(&DitInput {
            img: &i.img,
            img_ids: &i.img_ids,
            txt: &i.txt,
            txt_ids: &i.txt_ids,
            timesteps: &i.timesteps,
            y: &i.y,
            guidance: i.guidance.as_ref(),
        })
        .unwrap()
}

fn full_model_case(name: &str) {
    let g = golden(name);
    let (from_diffusers, from_bfl) = load_both(name, DType::F32);
    let i = inputs(&g, DType::F32);
    let a = run(&from_diffusers, &i);
    let b = run(&from_bfl, &i);
    // The timestep/guidance sinusoid dominates the end-to-end error: PyTorch's vectorised exp
    // gives 2 of the 128 frequencies one ulp away from the correctly rounded value we compute,
    // which at guidance 4.0 (t' = 4000) moves an argument by ~2e-4 rad. Hence abs 1e-4 here.
    g.check(
        "output/f32 (diffusers folder)",
        &a,
        &g.tensor("output/f32"),
        Tolerance::F32_SINUSOID,
    );
    g.check(
        "output/f32 (BFL file)",
        &b,
        &g.tensor("output/f32"),
        Tolerance::F32_SINUSOID,
    );
    // One model definition: both layouts give the very same numbers.
    g.check(
        "output/f32 BFL vs diffusers layout",
        &b,
        &a,
        Tolerance::EXACT,
    );
    // Every step's modulations prepared at once (this pass among others with other timesteps
    // and batch sizes) give the reference's output too, and what they were computed for only.
    let other_t = (&i.timesteps * 0.5).unwrap();
    let other_g = i.guidance.as_ref().map(|g| (g * 2.0).unwrap());
    let one_t = i.timesteps.narrow(0, 0, 1).unwrap();
    let one_g = i.guidance.as_ref().map(|g| g.narrow(0, 0, 1).unwrap());
    let one_y = i.y.narrow(0, 0, 1).unwrap();
    from_bfl
        .prepare_steps(&[
            (&other_t, other_g.as_ref(), &i.y),
            (&i.timesteps, i.guidance.as_ref(), &i.y),
            (&one_t, one_g.as_ref(), &one_y),
        ])
        .unwrap();
    let p = run(&from_bfl, &i);
    g.check(
        "output/f32 (modulations of several steps prepared at once)",
        &p,
        &g.tensor("output/f32"),
        Tolerance::F32_SINUSOID,
    );
    g.check(
        "prepared vs per-pass modulations",
        &p,
        &b,
        Tolerance::new(1e-5, 1e-6),
    );
    // and the prepared rows are what the pass used: a Var keeps its tensor's id when its
    // values change, so a pass that still matches b after the change used the prepared rows
    let t_var = candle::Var::from_tensor(&i.timesteps).unwrap();
    from_bfl
        .prepare_steps(&[(t_var.as_tensor(), i.guidance.as_ref(), &i.y)])
        .unwrap();
    t_var.set(&other_t).unwrap();
    let moved = Inputs {
        timesteps: t_var.as_tensor().clone(),
        y: i.y.clone(),
        guidance: i.guidance.clone(),
        ..inputs(&g, DType::F32)
    };
    g.check(
        "a prepared pass uses the prepared rows",
        &run(&from_bfl, &moved),
        &b,
        Tolerance::new(1e-5, 1e-6),
    );
    from_bfl.clear_prepared();
    let unprepared = run(&from_bfl, &moved);
    assert!(
        flux_golden::max_abs_diff(&unprepared, &b) > 1e-3,
        "the changed timesteps must change an unprepared pass"
    );
    // the same values in other tensors are not what was prepared: computed per pass
    from_bfl
        .prepare_steps(&[(&i.timesteps, i.guidance.as_ref(), &i.y)])
        .unwrap();
    let fresh = Inputs {
        timesteps: i.timesteps.copy().unwrap(),
        ..inputs(&g, DType::F32)
    };
    g.check(
        "unprepared pass beside prepared ones",
        &run(&from_bfl, &fresh),
        &b,
        Tolerance::EXACT,
    );
    from_bfl.clear_prepared();
    g.check(
        "after clear_prepared",
        &run(&from_bfl, &i),
        &b,
        Tolerance::EXACT,
    );
}

#[test]
fn dev_guidance_batch2_nonsquare_2_double_2_single() {
    full_model_case("dev");
}

#[test]
fn schnell_no_guidance_in48_out16() {
    full_model_case("schnell");
}

#[test]
fn dev_bf16_weights_and_activations() {
    let g = golden("dev");
    let (model, _) = load_both("dev", DType::BF16);
    let i = inputs(&g, DType::BF16);
    let out = run(&model, &i);
    assert_eq!(out.dtype(), DType::BF16);
    // Different summation orders in bf16 matmuls: cosine ≥ 0.999 and max-abs ≤ 0.1 on outputs of
    // magnitude ~3 (measured: see the golden report).
    let c = g.check(
        "output/bf16",
        &out,
        &g.tensor("output/bf16"),
        Tolerance::new(0.1, 0.0).with_min_cosine(0.999),
    );
    assert!(c.cosine >= 0.999);
}

#[test]
fn dev_modules() {
    let g = golden("dev");
    let (model, _) = load_both("dev", DType::F32);
    let i = inputs(&g, DType::F32);
    // timestep + guidance + pooled-text embedding
    let vec = model
        .embed_vec(&i.timesteps, i.guidance.as_ref(), &i.y)
        .unwrap();
    g.check(
        "module/vec",
        &vec,
        &g.tensor("module/vec"),
        Tolerance::F32_SINUSOID,
    );
    // The blocks below get the reference's own vec, so that they are checked tightly.
    let vec = g.tensor("module/vec");
    // RoPE table over [txt; img] (diffusers: f64 angles)
    let pe = model.rope(&i.txt_ids, &i.img_ids).unwrap();
    let l = pe.cos.dim(2).unwrap();
    let cos = pe.cos.get(0).unwrap().reshape((l, ())).unwrap();
    let sin = pe.sin.get(0).unwrap().reshape((l, ())).unwrap();
    g.check(
        "module/pe_cos",
        &cos,
        &g.tensor("module/pe_cos"),
        Tolerance::F32,
    );
    g.check(
        "module/pe_sin",
        &sin,
        &g.tensor("module/pe_sin"),
        Tolerance::F32,
    );
    // first double block, on the captured inputs
    let vec_act = vec.silu().unwrap();
    let (img, txt) = model.double_blocks()[0]
        .forward(
            &g.tensor("module/double0_in_img"),
            &g.tensor("module/double0_in_txt"),
            &vec_act,
            &pe,
        )
        .unwrap();
    g.check(
        "module/double0_out_img",
        &img,
        &g.tensor("module/double0_out_img"),
        Tolerance::F32,
    );
    g.check(
        "module/double0_out_txt",
        &txt,
        &g.tensor("module/double0_out_txt"),
        Tolerance::F32,
    );
    // first single block
    let x = model.single_blocks()[0]
        .forward(&g.tensor("module/single0_in"), &vec_act, &pe)
        .unwrap();
    g.check(
        "module/single0_out",
        &x,
        &g.tensor("module/single0_out"),
        Tolerance::F32,
    );
    // last layer (BFL (shift, scale) order; the diffusers weights were swapped on load)
    let out = model
        .final_layer()
        .forward(&g.tensor("module/last_in"), &vec_act)
        .unwrap();
    g.check(
        "module/last_out",
        &out,
        &g.tensor("module/last_out"),
        Tolerance::F32,
    );
}

#[test]
fn timestep_embedding_f32_and_bf16() {
    let g = golden("modules");
    let t = g.tensor("temb/t");
    let e = timestep_embedding(&t, 256, DType::F32).unwrap();
    g.check(
        "temb/f32",
        &e,
        &g.tensor("temb/f32"),
        Tolerance::F32_SINUSOID,
    );
    // bf16 t: 1000·t is rounded to bf16 (0.75 → 752) before the f32 sinusoid.
    // Rows 0-3 embed t' ≤ 1000; row 4 is guidance 3.5 (t' = 3504), where one ulp of a frequency
    // (PyTorch's vectorised exp vs a correctly rounded exp; 2 of 128 frequencies differ) moves
    // the argument by 3504·ulp ≈ 1.1e-4 rad: checked with abs 2.5e-4 (documented bound).
    let e = timestep_embedding(&t.to_dtype(DType::BF16).unwrap(), 256, DType::F32).unwrap();
    let want = g.tensor("temb/bf16");
    let rows = |t: &Tensor, a: usize, n: usize| t.narrow(0, a, n).unwrap();
    g.check(
        "temb/bf16 t'<=1000",
        &rows(&e, 0, 4),
        &rows(&want, 0, 4),
        Tolerance::F32_SINUSOID,
    );
    g.check(
        "temb/bf16 guidance 3.5",
        &rows(&e, 4, 1),
        &rows(&want, 4, 1),
        Tolerance::new(2.5e-4, 1e-5),
    );
    g.check(
        "temb/bf16 t'=904",
        &rows(&e, 5, 1),
        &rows(&want, 5, 1),
        Tolerance::F32_SINUSOID,
    );
    let scaled = g.tensor("temb/bf16_scaled").to_vec1::<f32>().unwrap();
    assert_eq!(scaled[2], 752.0);
}

#[test]
fn rope_table_reused_only_for_the_same_ids() {
    // The model keeps the RoPE table of the last id tensors (a sampler passes the same ones at
    // every step); new ids must build a new table.
    let g = golden("dev");
    let (model, fresh) = load_both("dev", DType::F32);
    let i = inputs(&g, DType::F32);
    let first = run(&model, &i);
    assert_eq!(max_abs_diff(&run(&model, &i), &first), 0.0);
    let moved = Inputs {
        img_ids: (&i.img_ids + 3.0).unwrap(),
        ..i
    };
    let cached = run(&model, &moved);
    let expect = run(&fresh, &moved);
    assert_eq!(max_abs_diff(&cached, &expect), 0.0);
    assert!(
        max_abs_diff(&cached, &first) > 1e-4,
        "new ids must change the output"
    );
}
