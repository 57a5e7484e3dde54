//! The FLUX transformer, module by module as BFL's `src/flux/model.py` and
//! `src/flux/modules/layers.py` define it. Field and prefix names equal the BFL checkpoint keys.

use std::sync::{Arc, Mutex};

use candle::{DType, Device, Tensor, TensorId, D};
use flux_kernels::{
    attention_composite, attention_tokens, cat_gelu_tanh, gated_residual, layer_norm_modulate,
    qk_norm_rope, rope_table, silu, AngleMode, AttnOpts, Linear, RopeTable,
};

use crate::config::Config;
use crate::weights::Weights;
use crate::{Error, Result};

const NORM_EPS: f64 = 1e-6;
const TIME_DIM: usize = 256;

/// The sinusoidal embedding of `1000·t` (BFL `timestep_embedding`): `t` and `1000·t` are rounded
/// to the reduced dtype when either `t` or the model `dtype` is bf16/f16 (as the references do,
/// whose `t` is a tensor of the model dtype), the sinusoid is computed in f32 with
/// `f_j = exp(f32(−ln 10000)·j / half)`, laid out `[cos, sin]`, and cast to `dtype`.
///
/// # Shapes
/// `t`: `(B)`. Returns `(B, dim)`.
pub fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    if t.rank() != 1 {
        return Err(Error::InputShape {
            name: "timesteps",
            expected: "(B)".into(),
            got: t.dims().to_vec(),
        });
    }
    let round = if t.dtype() == DType::F32 || t.dtype() == DType::F64 {
        dtype
    } else {
        t.dtype()
    };
    let mut scaled = (t.to_dtype(round)?.to_dtype(DType::F32)? * 1000.0)?;
    if round != DType::F32 {
        scaled = scaled.to_dtype(round)?.to_dtype(DType::F32)?;
    }
    let half = dim / 2;
    let neg_log = -(10_000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|j| ((neg_log * j as f32) / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = scaled.unsqueeze(1)?.broadcast_mul(&freqs)?; // (b, half)
    let mut parts = vec![args.cos()?, args.sin()?];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((t.dim(0)?, 1), DType::F32, t.device())?);
    }
    Ok(Tensor::cat(&parts, D::Minus1)?.to_dtype(dtype)?)
}

/// `out_layer(SiLU(in_layer(x)))` (time_in, guidance_in, vector_in).
#[derive(Debug, Clone)]
pub struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn load(w: &Weights, p: &str, inp: usize, hidden: usize) -> Result<Self> {
        Ok(MlpEmbedder {
            in_layer: w.linear(&format!("{p}.in_layer"), inp, hidden, true)?,
            out_layer: w.linear(&format!("{p}.out_layer"), hidden, hidden, true)?,
        })
    }

    /// # Shapes
    /// `x`: `(B, in)`. Returns `(B, hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.out_layer.forward(&silu(&self.in_layer.forward(x)?)?)?)
    }
}

/// A modulation layer's outputs for every step [`Flux::prepare_steps`] prepared: one product
/// over all the steps' rows instead of one small product per step. Shared by the model's clones
/// (like its RoPE cache); found by the id of the step's SiLU(vec) rows.
#[derive(Debug, Clone, Default)]
struct Prepared(Arc<Mutex<Option<PreparedRows>>>);

#[derive(Debug)]
struct PreparedRows {
    /// per prepared step: the id of its SiLU(vec) view, and where its rows start
    steps: Vec<(TensorId, usize, usize)>,
    /// `lin(SiLU(vec))` for every step's rows
    out: Tensor,
}

impl Prepared {
    /// Computes `lin(all)` once; `steps` are the views of `all` the forward passes will bring.
    fn fill(&self, lin: &Linear, all: &Tensor, steps: Vec<(TensorId, usize, usize)>) -> Result<()> {
        let out = lin.forward(all)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(PreparedRows { steps, out });
        Ok(())
    }

    fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// `lin(vec_act)` when `vec_act` is a prepared step's rows, else computed now.
    fn forward(&self, lin: &Linear, vec_act: &Tensor) -> Result<Tensor> {
        let id = vec_act.id();
        if let Some(p) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if let Some(&(_, start, rows)) = p.steps.iter().find(|s| s.0 == id) {
                return Ok(p.out.narrow(0, start, rows)?);
            }
        }
        Ok(lin.forward(vec_act)?)
    }
}

/// adaLN modulation: `lin(SiLU(vec))` split into 3 (single) or 6 (double) chunks
/// `(shift, scale, gate[, shift2, scale2, gate2])`.
#[derive(Debug, Clone)]
pub struct Modulation {
    lin: Linear,
    chunks: usize,
    prepared: Prepared,
}

/// One `(shift, scale, gate)` triple, each `(B, 1, C)`.
#[derive(Debug, Clone)]
pub struct ModulationOut {
    /// Added after the norm.
    pub shift: Tensor,
    /// Multiplies the norm as `1 + scale`.
    pub scale: Tensor,
    /// Multiplies the residual branch.
    pub gate: Tensor,
}

impl Modulation {
    fn load(w: &Weights, p: &str, hidden: usize, double: bool) -> Result<Self> {
        let chunks = if double { 6 } else { 3 };
        Ok(Modulation {
            lin: w.linear(&format!("{p}.lin"), hidden, chunks * hidden, true)?,
            chunks,
            prepared: Prepared::default(),
        })
    }

    /// Takes `SiLU(vec)` (computed once per forward) and returns the triples.
    fn forward(&self, vec_act: &Tensor) -> Result<Vec<ModulationOut>> {
        let out = self.prepared.forward(&self.lin, vec_act)?.unsqueeze(1)?; // (b, 1, m·c)
        let c = out.chunk(self.chunks, D::Minus1)?;
        Ok(c.chunks(3)
            .map(|t| ModulationOut {
                shift: t[0].clone(),
                scale: t[1].clone(),
                gate: t[2].clone(),
            })
            .collect())
    }
}

/// QK-norm: RMSNorm with learnable scales on q and k per head.
#[derive(Debug, Clone)]
pub struct QkNorm {
    query_norm: Tensor,
    key_norm: Tensor,
}

impl QkNorm {
    fn load(w: &Weights, p: &str, head_dim: usize) -> Result<Self> {
        Ok(QkNorm {
            query_norm: w.get(&format!("{p}.query_norm.scale"), &[head_dim])?,
            key_norm: w.get(&format!("{p}.key_norm.scale"), &[head_dim])?,
        })
    }

    /// RMSNorm of q and k, then RoPE with `pe` (one fused pass each on CUDA).
    ///
    /// # Shapes
    /// `q`, `k`: `(B, H, L, D)`, any strides; `pe` over the same `L`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, pe: &RopeTable) -> Result<(Tensor, Tensor)> {
        Ok((
            qk_norm_rope(q, &self.query_norm, NORM_EPS, pe)?,
            qk_norm_rope(k, &self.key_norm, NORM_EPS, pe)?,
        ))
    }
}

/// The text rows and the image rows of a `[txt; img]` RoPE table (contiguous copies).
fn split_rope(pe: &RopeTable, l_txt: usize, l_img: usize) -> Result<(RopeTable, RopeTable)> {
    let rows = |start: usize, len: usize| -> Result<RopeTable> {
        Ok(RopeTable {
            cos: pe.cos.narrow(2, start, len)?.contiguous()?,
            sin: pe.sin.narrow(2, start, len)?.contiguous()?,
        })
    };
    Ok((rows(0, l_txt)?, rows(l_txt, l_img)?))
}

/// q, k, v as `(B, H, L, D)` views (no copies) of the first `3·H·D` channels of a contiguous
/// `(B, L, N)` projection (layout "(K H D)", K outermost).
fn split_qkv(x: &Tensor, heads: usize, head_dim: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, n) = x.dims3()?;
    let x = if n % head_dim == 0 {
        x.reshape((b, l, n / head_dim, head_dim))?
    } else {
        x.narrow(2, 0, 3 * heads * head_dim)?
            .contiguous()?
            .reshape((b, l, 3 * heads, head_dim))?
    };
    let part = |i: usize| -> Result<Tensor> { Ok(x.narrow(2, i * heads, heads)?.transpose(1, 2)?) };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// Attention (BFL `math.attention` after RoPE) into `(B, L, H·D)`; the composite path when
/// `composite` (benchmarks), else the fused kernel where the device has one.
fn joint_attention(q: &Tensor, k: &Tensor, v: &Tensor, composite: bool) -> Result<Tensor> {
    if composite {
        let x = attention_composite(q, k, v, AttnOpts::default())?; // (b, h, l, d)
        let (b, h, l, d) = x.dims4()?;
        return Ok(x.transpose(1, 2)?.reshape((b, l, h * d))?);
    }
    Ok(attention_tokens(q, k, v, AttnOpts::default())?)
}

/// `fc2(GELU_tanh(fc0(x)))`, keys `.0` and `.2`.
#[derive(Debug, Clone)]
struct Mlp {
    fc0: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(w: &Weights, p: &str, hidden: usize, mlp: usize) -> Result<Self> {
        Ok(Mlp {
            fc0: w.linear(&format!("{p}.0"), hidden, mlp, true)?,
            fc2: w.linear(&format!("{p}.2"), mlp, hidden, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.fc0.forward_gelu(x)?)?)
    }
}

/// One stream's half of a double block: modulation, attention projections, MLP.
#[derive(Debug, Clone)]
struct Stream {
    modulation: Modulation,
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
    mlp: Mlp,
}

impl Stream {
    fn load(w: &Weights, p: &str, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Stream {
            modulation: Modulation::load(w, &format!("{p}_mod"), h, true)?,
            qkv: w.linear(&format!("{p}_attn.qkv"), h, 3 * h, cfg.qkv_bias)?,
            norm: QkNorm::load(w, &format!("{p}_attn.norm"), cfg.head_dim())?,
            proj: w.linear(&format!("{p}_attn.proj"), h, h, true)?,
            mlp: Mlp::load(w, &format!("{p}_mlp"), h, cfg.mlp_hidden())?,
        })
    }

    /// Modulated norm → qkv → QK-norm + RoPE (`pe` over this stream's tokens). Returns the two
    /// modulations and q, k, v.
    fn prepare(
        &self,
        x: &Tensor,
        vec_act: &Tensor,
        heads: usize,
        pe: &RopeTable,
    ) -> Result<(Vec<ModulationOut>, [Tensor; 3])> {
        let m = self.modulation.forward(vec_act)?;
        let xm = layer_norm_modulate(x, &m[0].shift, &m[0].scale, NORM_EPS)?;
        let qkv = self.qkv.forward(&xm)?;
        let head_dim = qkv.dim(2)? / (3 * heads);
        let (q, k, v) = split_qkv(&qkv, heads, head_dim)?;
        let (q, k) = self.norm.forward(&q, &k, pe)?;
        Ok((m, [q, k, v]))
    }

    /// Attention and MLP residuals.
    fn finish(&self, x: &Tensor, attn: &Tensor, m: &[ModulationOut]) -> Result<Tensor> {
        let x = gated_residual(x, &m[0].gate, &self.proj.forward(attn)?)?;
        let h = layer_norm_modulate(&x, &m[1].shift, &m[1].scale, NORM_EPS)?;
        Ok(gated_residual(&x, &m[1].gate, &self.mlp.forward(&h)?)?)
    }
}

/// BFL `DoubleStreamBlock`: separate image and text weights, joint attention (text first).
#[derive(Debug, Clone)]
pub struct DoubleStreamBlock {
    img: Stream,
    txt: Stream,
    num_heads: usize,
    composite_attention: bool,
}

impl DoubleStreamBlock {
    /// Loads `double_blocks.{i}`.
    pub fn load(w: &Weights, p: &str, cfg: &Config) -> Result<Self> {
        Ok(DoubleStreamBlock {
            img: Stream::load(w, &format!("{p}.img"), cfg)?,
            txt: Stream::load(w, &format!("{p}.txt"), cfg)?,
            num_heads: cfg.num_heads,
            composite_attention: false,
        })
    }

    /// # Shapes
    /// `img`: `(B, L_img, C)`, `txt`: `(B, L_txt, C)`, `vec_act` = SiLU(vec): `(B, C)`,
    /// `pe` over `L_txt + L_img`. Returns `(img, txt)`.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec_act: &Tensor,
        pe: &RopeTable,
    ) -> Result<(Tensor, Tensor)> {
        let (l_txt, l_img) = (txt.dim(1)?, img.dim(1)?);
        let pe = split_rope(pe, l_txt, l_img)?;
        self.forward_split(img, txt, vec_act, &pe)
    }

    /// [`Self::forward`] with the table already split into text and image rows (once per
    /// model forward, not once per block).
    fn forward_split(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec_act: &Tensor,
        (pe_txt, pe_img): &(RopeTable, RopeTable),
    ) -> Result<(Tensor, Tensor)> {
        let l_txt = txt.dim(1)?;
        // prepare image and text for attention
        let heads = self.num_heads;
        let (img_m, [img_q, img_k, img_v]) = self.img.prepare(img, vec_act, heads, pe_img)?;
        let (txt_m, [txt_q, txt_k, txt_v]) = self.txt.prepare(txt, vec_act, heads, pe_txt)?;
        // run joint attention, text first
        let q = Tensor::cat(&[txt_q, img_q], 2)?;
        let k = Tensor::cat(&[txt_k, img_k], 2)?;
        let v = Tensor::cat(&[txt_v, img_v], 2)?;
        let attn = joint_attention(&q, &k, &v, self.composite_attention)?; // (b, l, c)
        let txt_attn = attn.narrow(1, 0, l_txt)?;
        let img_attn = attn.narrow(1, l_txt, attn.dim(1)? - l_txt)?;
        // image and text residuals
        let img = self.img.finish(img, &img_attn, &img_m)?;
        let txt = self.txt.finish(txt, &txt_attn, &txt_m)?;
        Ok((img, txt))
    }
}

/// BFL `SingleStreamBlock`: fused qkv+MLP input projection, parallel attention and MLP.
#[derive(Debug, Clone)]
pub struct SingleStreamBlock {
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    modulation: Modulation,
    num_heads: usize,
    hidden: usize,
    mlp_hidden: usize,
    composite_attention: bool,
}

impl SingleStreamBlock {
    /// Loads `single_blocks.{j}`.
    pub fn load(w: &Weights, p: &str, cfg: &Config) -> Result<Self> {
        let (h, mlp) = (cfg.hidden_size, cfg.mlp_hidden());
        Ok(SingleStreamBlock {
            linear1: w.linear(&format!("{p}.linear1"), h, 3 * h + mlp, true)?,
            linear2: w.linear(&format!("{p}.linear2"), h + mlp, h, true)?,
            norm: QkNorm::load(w, &format!("{p}.norm"), cfg.head_dim())?,
            modulation: Modulation::load(w, &format!("{p}.modulation"), h, false)?,
            num_heads: cfg.num_heads,
            hidden: h,
            mlp_hidden: mlp,
            composite_attention: false,
        })
    }

    /// # Shapes
    /// `x` = `[txt; img]`: `(B, L, C)`, `vec_act` = SiLU(vec): `(B, C)`. Returns `(B, L, C)`.
    pub fn forward(&self, x: &Tensor, vec_act: &Tensor, pe: &RopeTable) -> Result<Tensor> {
        let m = self.modulation.forward(vec_act)?.remove(0);
        let xm = layer_norm_modulate(x, &m.shift, &m.scale, NORM_EPS)?;
        let h = self.linear1.forward(&xm)?;
        let mlp = h.narrow(D::Minus1, 3 * self.hidden, self.mlp_hidden)?;
        let (q, k, v) = split_qkv(&h, self.num_heads, self.hidden / self.num_heads)?;
        let (q, k) = self.norm.forward(&q, &k, pe)?;
        let attn = joint_attention(&q, &k, &v, self.composite_attention)?;
        // attention output first, MLP activation second
        let o = self.linear2.forward(&cat_gelu_tanh(&attn, &mlp)?)?;
        Ok(gated_residual(x, &m.gate, &o)?)
    }
}

/// BFL `LastLayer`: adaLN with **(shift, scale)** halves, then the output projection.
#[derive(Debug, Clone)]
pub struct LastLayer {
    linear: Linear,
    ada_ln: Linear,
    prepared: Prepared,
}

impl LastLayer {
    fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(LastLayer {
            linear: w.linear("final_layer.linear", h, cfg.out_channels, true)?,
            ada_ln: w.linear("final_layer.adaLN_modulation.1", h, 2 * h, true)?,
            prepared: Prepared::default(),
        })
    }

    /// # Shapes
    /// `x`: `(B, L_img, C)`, `vec_act` = SiLU(vec): `(B, C)`. Returns `(B, L_img, out_channels)`.
    pub fn forward(&self, x: &Tensor, vec_act: &Tensor) -> Result<Tensor> {
        let m = self.prepared.forward(&self.ada_ln, vec_act)?.unsqueeze(1)?;
        let c = m.chunk(2, D::Minus1)?;
        let x = layer_norm_modulate(x, &c[0], &c[1], NORM_EPS)?;
        Ok(self.linear.forward(&x)?)
    }
}

/// The inputs of one transformer evaluation (BFL `Flux.forward`'s arguments).
#[derive(Debug, Clone)]
pub struct DitInput<'a> {
    /// Packed image tokens `(B, L_img, in_channels)`.
    pub img: &'a Tensor,
    /// Image position ids `(B, L_img, 3)`.
    pub img_ids: &'a Tensor,
    /// Text tokens (T5 states) `(B, L_txt, context_in_dim)`.
    pub txt: &'a Tensor,
    /// Text position ids `(B, L_txt, 3)` (zeros).
    pub txt_ids: &'a Tensor,
    /// Timesteps `t ∈ [0, 1]`, `(B)`. The model embeds `1000·t` formed in this tensor's dtype:
    /// pass bf16 to reproduce the reference's rounding.
    pub timesteps: &'a Tensor,
    /// Pooled text vector (CLIP) `(B, vec_in_dim)`.
    pub y: &'a Tensor,
    /// Guidance scale `(B)`: required by guidance-distilled models (dev); ignored by models
    /// without a guidance embedder, as in BFL.
    pub guidance: Option<&'a Tensor>,
}

/// Options of the model that are not part of the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FluxOptions {
    /// RoPE angle precision: f32 as BFL today, f64 as diffusers.
    pub rope: AngleMode,
    /// Run attention as the composite matmul + softmax + matmul even where a fused kernel exists
    /// (CUDA bf16/f16): for comparisons and benchmarks. Default `false`.
    pub composite_attention: bool,
    /// Encode the blocks' dense weights while loading (`--quantize q8_0|q4_k|…|fp8`; see
    /// [`Weights::set_quantize`]). Default `None`: weights as stored.
    pub quantize: Option<flux_kernels::Encoding>,
    /// Multiply the blocks' linear layers in fp8 (`--fp8-gemm`; see [`Weights::set_fp8_gemm`]):
    /// e4m3 weights with one scale each, activations quantized per tensor before each product;
    /// on CUDA cuBLASLt's fp8 GEMM, elsewhere an emulation of its rounding. `quantize` may then
    /// only be fp8 e4m3 (or `None`). Default `false`.
    pub fp8_gemm: bool,
}

/// A RoPE table and the ids it was built from.
#[derive(Debug)]
struct RopeCache {
    key: (TensorId, TensorId),
    table: RopeTable,
}

/// One step [`Flux::prepare_steps`] prepared.
#[derive(Debug, Clone)]
struct PreparedStep {
    key: (TensorId, TensorId, Option<TensorId>),
    vec_act: Tensor,
}

/// What adapters may change besides the linear layers (which keep their own originals): the
/// config (a control LoRA widens `img_in`) and the QK-norm scales (which it replaces).
pub(crate) type LoraBase = (Config, Vec<(String, Tensor)>);

/// The FLUX transformer.
#[derive(Debug, Clone)]
pub struct Flux {
    img_in: Linear,
    time_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    vector_in: MlpEmbedder,
    txt_in: Linear,
    double_blocks: Vec<DoubleStreamBlock>,
    single_blocks: Vec<SingleStreamBlock>,
    final_layer: LastLayer,
    cfg: Config,
    opts: FluxOptions,
    /// The RoPE table of the last `(txt_ids, img_ids)` pair: a sampler passes the same id
    /// tensors at every step, so the table is built once per image, not once per step.
    rope_cache: Arc<Mutex<Option<RopeCache>>>,
    /// The steps [`Flux::prepare_steps`] prepared: their (timesteps, y, guidance) ids and
    /// SiLU(vec) rows.
    prepared_steps: Arc<Mutex<Vec<PreparedStep>>>,
    dtype: DType,
    device: Device,
    /// While adapters are attached: the config and QK-norm scales as loaded.
    pub(crate) lora_base: Option<Arc<LoraBase>>,
    /// Adapters were merged without keeping the weights as loaded.
    pub(crate) lora_merged_for_good: bool,
}

impl Flux {
    /// Builds the model from `w` (any layout); strict: every tensor must be present with its
    /// shape and none may be left over.
    pub fn load(cfg: &Config, w: &Weights, opts: FluxOptions) -> Result<Self> {
        cfg.validate()?;
        w.check_looks_like(cfg)?;
        let e4m3 = flux_kernels::Encoding::Fp8(flux_kernels::Fp8Kind::E4M3);
        if let (true, Some(q)) = (opts.fp8_gemm, opts.quantize.filter(|q| *q != e4m3)) {
            return Err(Error::InvalidConfig(format!(
                "fp8 GEMMs take e4m3 weights: they cannot be combined with quantizing to {q}"
            )));
        }
        w.set_quantize(opts.quantize);
        w.set_fp8_gemm(opts.fp8_gemm);
        let h = cfg.hidden_size;
        let mut model = Flux {
            img_in: w.linear("img_in", cfg.in_channels, h, true)?,
            time_in: MlpEmbedder::load(w, "time_in", TIME_DIM, h)?,
            guidance_in: if cfg.guidance_embed {
                Some(MlpEmbedder::load(w, "guidance_in", TIME_DIM, h)?)
            } else {
                None
            },
            vector_in: MlpEmbedder::load(w, "vector_in", cfg.vec_in_dim, h)?,
            txt_in: w.linear("txt_in", cfg.context_in_dim, h, true)?,
            double_blocks: (0..cfg.depth)
                .map(|i| DoubleStreamBlock::load(w, &format!("double_blocks.{i}"), cfg))
                .collect::<Result<_>>()?,
            single_blocks: (0..cfg.depth_single_blocks)
                .map(|j| SingleStreamBlock::load(w, &format!("single_blocks.{j}"), cfg))
                .collect::<Result<_>>()?,
            final_layer: LastLayer::load(w, cfg)?,
            cfg: cfg.clone(),
            opts,
            rope_cache: Arc::default(),
            prepared_steps: Arc::default(),
            dtype: w.dtype(),
            device: w.device().clone(),
            lora_base: None,
            lora_merged_for_good: false,
        };
        w.finish()?;
        for b in &mut model.double_blocks {
            b.composite_attention = opts.composite_attention;
        }
        for b in &mut model.single_blocks {
            b.composite_attention = opts.composite_attention;
        }
        Ok(model)
    }

    /// Loads a single-file transformer in BFL's key names, in any format (safetensors in f32,
    /// bf16, f16 or fp8 with or without ComfyUI scales; GGUF of any supported type; keys may
    /// carry the `model.diffusion_model.` prefix, as in all-in-one files), detecting the
    /// config from the tensors ([`Weights::detect_config`]): dev, schnell, Fill or
    /// Canny/Depth need no [`Config`]. Quantized and fp8 weights stay packed; activations run
    /// in `dtype`.
    pub fn from_file(
        path: impl AsRef<std::path::Path>,
        dtype: DType,
        device: &Device,
        opts: FluxOptions,
    ) -> Result<Self> {
        let w = Weights::open_file(path.as_ref(), dtype, device)?;
        let cfg = w.detect_config()?;
        Self::load(&cfg, &w, opts)
    }

    /// Loads a BFL single-file checkpoint (`flux1-dev.safetensors`, or any format
    /// [`Flux::from_file`] reads) with an explicit config, memory-mapped, converting weights to
    /// `dtype`.
    pub fn from_bfl_file(
        path: impl AsRef<std::path::Path>,
        cfg: &Config,
        dtype: DType,
        device: &Device,
        opts: FluxOptions,
    ) -> Result<Self> {
        let w = Weights::open_file(path.as_ref(), dtype, device)?;
        Self::load(cfg, &w, opts)
    }

    /// Loads a diffusers `transformer/` folder (config.json + one or more safetensors shards).
    pub fn from_diffusers_folder(
        dir: impl AsRef<std::path::Path>,
        dtype: DType,
        device: &Device,
        opts: FluxOptions,
    ) -> Result<Self> {
        let (cfg, w) = Weights::open_diffusers_folder(dir.as_ref(), dtype, device)?;
        Self::load(&cfg, &w, opts)
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The weights' dtype (activations run in it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn check_inputs(&self, x: &DitInput) -> Result<(usize, usize, usize)> {
        let c = &self.cfg;
        let shape = |name: &'static str,
                     t: &Tensor,
                     want: &[Option<usize>],
                     words: String|
         -> Result<Vec<usize>> {
            let d = t.dims();
            let ok =
                d.len() == want.len() && d.iter().zip(want).all(|(g, w)| w.is_none_or(|w| w == *g));
            if !ok {
                return Err(Error::InputShape {
                    name,
                    expected: words,
                    got: d.to_vec(),
                });
            }
            Ok(d.to_vec())
        };
        let img = shape(
            "img",
            x.img,
            &[None, None, Some(c.in_channels)],
            format!("(B, L_img, {})", c.in_channels),
        )?;
        let (b, l_img) = (img[0], img[1]);
        shape(
            "img_ids",
            x.img_ids,
            &[Some(b), Some(l_img), Some(3)],
            format!("({b}, {l_img}, 3)"),
        )?;
        let txt = shape(
            "txt",
            x.txt,
            &[Some(b), None, Some(c.context_in_dim)],
            format!("({b}, L_txt, {})", c.context_in_dim),
        )?;
        let l_txt = txt[1];
        shape(
            "txt_ids",
            x.txt_ids,
            &[Some(b), Some(l_txt), Some(3)],
            format!("({b}, {l_txt}, 3) matching txt"),
        )?;
        shape("timesteps", x.timesteps, &[Some(b)], format!("({b})"))?;
        shape(
            "y",
            x.y,
            &[Some(b), Some(c.vec_in_dim)],
            format!("({b}, {})", c.vec_in_dim),
        )?;
        if self.guidance_in.is_some() {
            let g = x.guidance.ok_or(Error::MissingGuidance)?;
            shape("guidance", g, &[Some(b)], format!("({b})"))?;
        }
        if l_img == 0 {
            return Err(Error::InputShape {
                name: "img",
                expected: "at least one image token".into(),
                got: img,
            });
        }
        Ok((b, l_txt, l_img))
    }

    /// The conditioning vector `time_in(emb(t)) [+ guidance_in(emb(g))] + vector_in(y)`, before SiLU.
    ///
    /// # Shapes
    /// `timesteps`, `guidance`: `(B)`; `y`: `(B, vec_in_dim)`. Returns `(B, hidden_size)`.
    pub fn embed_vec(
        &self,
        timesteps: &Tensor,
        guidance: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Tensor> {
        let dt = self.dtype;
        let mut vec = self
            .time_in
            .forward(&timestep_embedding(timesteps, TIME_DIM, dt)?)?;
        if let Some(g_in) = &self.guidance_in {
            let g = guidance.ok_or(Error::MissingGuidance)?;
            vec = (vec + g_in.forward(&timestep_embedding(g, TIME_DIM, dt)?)?)?;
        }
        Ok((vec + self.vector_in.forward(&y.to_dtype(dt)?)?)?)
    }

    /// Computes the conditioning of many forward passes at once: for each `(timesteps,
    /// guidance, y)` (the tensors the passes will bring in their [`DitInput`]), SiLU(vec) and
    /// every modulation layer's output, as one product per layer over all the passes' rows
    /// instead of one small product per pass (the adaLN weights, about 3.2 B parameters at full
    /// size, are read once per image instead of once per step). Forward passes whose three
    /// tensors are one of these, by identity, use them; others compute their own. Replaces what
    /// an earlier call prepared; [`Flux::clear_prepared`] frees it.
    ///
    /// # Shapes
    /// Each entry: `timesteps`, `guidance` `(B)`, `y` `(B, vec_in_dim)` (B may differ between
    /// entries).
    pub fn prepare_steps(&self, steps: &[(&Tensor, Option<&Tensor>, &Tensor)]) -> Result<()> {
        self.clear_prepared();
        if steps.is_empty() {
            return Ok(());
        }
        let with_guidance = steps[0].1.is_some();
        if steps.iter().any(|s| s.1.is_some() != with_guidance) {
            return Err(Error::Kernels(flux_kernels::Error::InvalidArgument(
                "prepare_steps: give a guidance for every step or for none".into(),
            )));
        }
        // timesteps and guidance keep the dtype the passes give (the embedding's rounding
        // follows it), the rows of all steps side by side
        fn cat(parts: Vec<&Tensor>) -> Result<Tensor> {
            let dtype = parts[0].dtype();
            let parts = parts
                .iter()
                .map(|p| p.to_dtype(dtype))
                .collect::<candle::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        }
        let t = cat(steps.iter().map(|s| s.0).collect())?;
        let y = cat(steps.iter().map(|s| s.2).collect())?;
        let g = if with_guidance {
            Some(cat(steps.iter().filter_map(|s| s.1).collect())?)
        } else {
            None
        };
        let all = silu(&self.embed_vec(&t, g.as_ref(), &y)?)?;
        let mut rows = vec![];
        let mut prepared = vec![];
        let mut start = 0;
        for (ts, gd, y) in steps {
            let b = ts.dim(0)?;
            let vec_act = all.narrow(0, start, b)?;
            rows.push((vec_act.id(), start, b));
            prepared.push(PreparedStep {
                key: (ts.id(), y.id(), gd.map(Tensor::id)),
                vec_act,
            });
            start += b;
        }
        for m in self.modulations() {
            m.prepared.fill(&m.lin, &all, rows.clone())?;
        }
        self.final_layer
            .prepared
            .fill(&self.final_layer.ada_ln, &all, rows)?;
        *self
            .prepared_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = prepared;
        Ok(())
    }

    /// Frees what [`Flux::prepare_steps`] prepared.
    pub fn clear_prepared(&self) {
        self.prepared_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for m in self.modulations() {
            m.prepared.clear();
        }
        self.final_layer.prepared.clear();
    }

    /// Every block's modulation layers.
    fn modulations(&self) -> Vec<&Modulation> {
        let mut v = vec![];
        for b in &self.double_blocks {
            v.extend([&b.img.modulation, &b.txt.modulation]);
        }
        v.extend(self.single_blocks.iter().map(|b| &b.modulation));
        v
    }

    /// The RoPE table for `[txt_ids; img_ids]` with this model's axes, theta and angle mode.
    ///
    /// # Shapes
    /// `txt_ids`: `(B, L_txt, 3)`, `img_ids`: `(B, L_img, 3)`. Returns `(B, 1, L, head_dim/2)` tables.
    pub fn rope(&self, txt_ids: &Tensor, img_ids: &Tensor) -> Result<RopeTable> {
        let ids = Tensor::cat(&[txt_ids, img_ids], 1)?;
        Ok(rope_table(
            &ids,
            &self.cfg.axes_dim,
            self.cfg.theta,
            self.opts.rope,
        )?)
    }

    /// [`Self::rope`], reusing the last table when the same id tensors come again (candle
    /// tensors are immutable and their ids never reused).
    fn rope_cached(&self, txt_ids: &Tensor, img_ids: &Tensor) -> Result<RopeTable> {
        let key = (txt_ids.id(), img_ids.id());
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.key == key) {
            return Ok(c.table.clone());
        }
        let table = self.rope(txt_ids, img_ids)?;
        *cache = Some(RopeCache {
            key,
            table: table.clone(),
        });
        Ok(table)
    }

    /// Every linear layer with its BFL module name (`double_blocks.0.img_attn.qkv`), for the
    /// LoRA key map.
    pub(crate) fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        // the prepared modulations were computed with the weights about to change
        self.clear_prepared();
        let mut v: Vec<(String, &mut Linear)> = vec![("img_in".into(), &mut self.img_in)];
        v.push(("time_in.in_layer".into(), &mut self.time_in.in_layer));
        v.push(("time_in.out_layer".into(), &mut self.time_in.out_layer));
        if let Some(g) = &mut self.guidance_in {
            v.push(("guidance_in.in_layer".into(), &mut g.in_layer));
            v.push(("guidance_in.out_layer".into(), &mut g.out_layer));
        }
        v.push(("vector_in.in_layer".into(), &mut self.vector_in.in_layer));
        v.push(("vector_in.out_layer".into(), &mut self.vector_in.out_layer));
        v.push(("txt_in".into(), &mut self.txt_in));
        for (i, b) in self.double_blocks.iter_mut().enumerate() {
            for (s, st) in [("img", &mut b.img), ("txt", &mut b.txt)] {
                let p = format!("double_blocks.{i}.{s}");
                v.push((format!("{p}_mod.lin"), &mut st.modulation.lin));
                v.push((format!("{p}_attn.qkv"), &mut st.qkv));
                v.push((format!("{p}_attn.proj"), &mut st.proj));
                v.push((format!("{p}_mlp.0"), &mut st.mlp.fc0));
                v.push((format!("{p}_mlp.2"), &mut st.mlp.fc2));
            }
        }
        for (j, b) in self.single_blocks.iter_mut().enumerate() {
            let p = format!("single_blocks.{j}");
            v.push((format!("{p}.linear1"), &mut b.linear1));
            v.push((format!("{p}.linear2"), &mut b.linear2));
            v.push((format!("{p}.modulation.lin"), &mut b.modulation.lin));
        }
        v.push(("final_layer.linear".into(), &mut self.final_layer.linear));
        v.push((
            "final_layer.adaLN_modulation.1".into(),
            &mut self.final_layer.ada_ln,
        ));
        v
    }

    /// Every linear layer with its BFL module name, as it is now (adapters merged or attached):
    /// for inspection and tests (the clones share the weights' memory).
    pub fn linears(&self) -> Vec<(String, Linear)> {
        let mut m = self.clone();
        m.linears_mut()
            .into_iter()
            .map(|(n, l)| (n, l.clone()))
            .collect()
    }

    /// Every QK-norm scale with its BFL key, as it is now.
    pub fn norm_scales(&self) -> Vec<(String, Tensor)> {
        let mut m = self.clone();
        m.norm_scales_mut()
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect()
    }

    /// Every QK-norm scale with its BFL key (`double_blocks.0.img_attn.norm.query_norm.scale`).
    pub(crate) fn norm_scales_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = vec![];
        for (i, b) in self.double_blocks.iter_mut().enumerate() {
            for (s, st) in [("img", &mut b.img), ("txt", &mut b.txt)] {
                let p = format!("double_blocks.{i}.{s}_attn.norm");
                v.push((format!("{p}.query_norm.scale"), &mut st.norm.query_norm));
                v.push((format!("{p}.key_norm.scale"), &mut st.norm.key_norm));
            }
        }
        for (j, b) in self.single_blocks.iter_mut().enumerate() {
            let p = format!("single_blocks.{j}.norm");
            v.push((format!("{p}.query_norm.scale"), &mut b.norm.query_norm));
            v.push((format!("{p}.key_norm.scale"), &mut b.norm.key_norm));
        }
        v
    }

    /// The config, for the LoRA code that widens `img_in` (control LoRAs).
    pub(crate) fn config_mut(&mut self) -> &mut Config {
        &mut self.cfg
    }

    /// The double-stream blocks, for per-block checks.
    pub fn double_blocks(&self) -> &[DoubleStreamBlock] {
        &self.double_blocks
    }

    /// The single-stream blocks, for per-block checks.
    pub fn single_blocks(&self) -> &[SingleStreamBlock] {
        &self.single_blocks
    }

    /// The last layer.
    pub fn final_layer(&self) -> &LastLayer {
        &self.final_layer
    }

    /// The velocity prediction (BFL `Flux.forward`).
    ///
    /// # Shapes
    /// See [`DitInput`]. Returns `(B, L_img, out_channels)` in the model dtype.
    pub fn forward(&self, x: &DitInput) -> Result<Tensor> {
        let (_, l_txt, _) = self.check_inputs(x)?;
        let dt = self.dtype;
        let img = self.img_in.forward(&x.img.to_dtype(dt)?)?;
        let txt = self.txt_in.forward(&x.txt.to_dtype(dt)?)?;
        let pe = self.rope_cached(x.txt_ids, x.img_ids)?;
        // SiLU(vec) feeds every modulation: computed once per forward, or once for every step
        // when the caller prepared them
        let key = (x.timesteps.id(), x.y.id(), x.guidance.map(Tensor::id));
        let prepared = self
            .prepared_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.vec_act.clone());
        let vec_act = match prepared {
            Some(v) => v,
            None => silu(&self.embed_vec(x.timesteps, x.guidance, x.y)?)?,
        };
        let (mut img, mut txt) = (img, txt);
        // the table's text and image rows, split once for every double block
        let pe_split = split_rope(&pe, l_txt, img.dim(1)?)?;
        for block in &self.double_blocks {
            (img, txt) = block.forward_split(&img, &txt, &vec_act, &pe_split)?;
        }
        let mut x_all = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            x_all = block.forward(&x_all, &vec_act, &pe)?;
        }
        let img = x_all.narrow(1, l_txt, x_all.dim(1)? - l_txt)?;
        self.final_layer.forward(&img, &vec_act)
    }
}
