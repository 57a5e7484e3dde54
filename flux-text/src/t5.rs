//! The T5 v1.1 encoder (transformers `T5EncoderModel`), whose last hidden state is FLUX's `txt`.

use std::path::Path;

use candle::{DType, Device, Tensor};
use flux_kernels::{attention, gelu_tanh, rms_norm, AttnOpts, Checkpoint, Linear};
use serde::Deserialize;

use crate::clip::read_config;
use crate::{Error, Result};

/// The encoder fields of a transformers `T5Config`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    /// Vocabulary (32128).
    pub vocab_size: usize,
    /// Width (4096 for XXL).
    pub d_model: usize,
    /// Head dimension (64).
    pub d_kv: usize,
    /// Feed-forward width (10240).
    pub d_ff: usize,
    /// Encoder blocks (24).
    pub num_layers: usize,
    /// Heads (64).
    pub num_heads: usize,
    /// Relative-position buckets (32).
    #[serde(default = "buckets")]
    pub relative_attention_num_buckets: usize,
    /// Largest distance with its own buckets (128).
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMSNorm epsilon (1e-6).
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` for T5 v1.1.
    #[serde(default = "gated")]
    pub feed_forward_proj: String,
}

fn buckets() -> usize {
    32
}
fn max_distance() -> usize {
    128
}
fn eps() -> f64 {
    1e-6
}
fn gated() -> String {
    "gated-gelu".into()
}

impl T5Config {
    /// google/t5-v1_1-xxl.
    pub fn v1_1_xxl() -> Self {
        T5Config {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    /// Reads a transformers `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: T5Config = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("T5 config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants.
    pub fn validate(&self) -> Result<()> {
        // bounds far above T5-XXL (4096 wide, 64 per head, 10240 ff, 24 layers, 32128 tokens)
        if let Some(m) = flux_kernels::over_limit(&[
            ("vocab_size", self.vocab_size, 1 << 20),
            ("d_model", self.d_model, 1 << 16),
            ("d_kv", self.d_kv, 1 << 12),
            ("d_ff", self.d_ff, 1 << 18),
            ("num_layers", self.num_layers, 1024),
            ("num_heads", self.num_heads, 1024),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
                1 << 12,
            ),
        ]) {
            return Err(Error::InvalidConfig(m));
        }
        if self.feed_forward_proj != "gated-gelu" {
            return Err(Error::InvalidConfig(format!(
                "feed_forward_proj {} is not supported (T5 v1.1 uses gated-gelu)",
                self.feed_forward_proj
            )));
        }
        if self.d_model == 0
            || self.d_kv == 0
            || self.num_heads == 0
            || self.relative_attention_num_buckets < 4
        {
            return Err(Error::InvalidConfig(
                "sizes must be positive, buckets at least 4".into(),
            ));
        }
        Ok(())
    }

    /// Every tensor of the encoder, with its shape. The embedding is listed as `shared.weight`;
    /// files may hold it as `encoder.embed_tokens.weight` instead (tied weights).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, inner, f) = (self.d_model, self.d_kv * self.num_heads, self.d_ff);
        let mut v = vec![("shared.weight".to_string(), vec![self.vocab_size, d])];
        for i in 0..self.num_layers {
            let p = format!("encoder.block.{i}.layer");
            for n in ["q", "k", "v"] {
                v.push((format!("{p}.0.SelfAttention.{n}.weight"), vec![inner, d]));
            }
            v.push((format!("{p}.0.SelfAttention.o.weight"), vec![d, inner]));
            if i == 0 {
                v.push((
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    vec![self.relative_attention_num_buckets, self.num_heads],
                ));
            }
            v.push((format!("{p}.0.layer_norm.weight"), vec![d]));
            v.push((format!("{p}.1.DenseReluDense.wi_0.weight"), vec![f, d]));
            v.push((format!("{p}.1.DenseReluDense.wi_1.weight"), vec![f, d]));
            v.push((format!("{p}.1.DenseReluDense.wo.weight"), vec![d, f]));
            v.push((format!("{p}.1.layer_norm.weight"), vec![d]));
        }
        v.push(("encoder.final_layer_norm.weight".into(), vec![d]));
        v
    }
}

/// T5's bidirectional relative-position bucket of `rel = key − query` (transformers
/// `T5Attention._relative_position_bucket`): half the buckets per direction, exact below half of
/// those, logarithmic up to `max_distance`, clamped.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if rel > 0 { half } else { 0 };
    let n = rel.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // f32 as PyTorch evaluates it: log(n / max_exact) / ln(max_distance / max_exact) · (half − max_exact)
        let ratio = (n as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

#[derive(Debug, Clone)]
struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm0: Tensor,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
    norm1: Tensor,
}

/// The T5 encoder stack: embedding (no scaling), RMSNorm pre-norm blocks with unscaled attention
/// plus a relative position bias computed once from block 0 and shared by all blocks, gated-GELU
/// feed-forward, final RMSNorm. No attention mask: padding is attended, as in FLUX.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    shared: Tensor,
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: Tensor,
    cfg: T5Config,
}

/// Where the T5 encoder sits in an all-in-one file (ComfyUI's layout).
const AIO_PREFIX: &str = "text_encoders.t5xxl.transformer.";

fn open_checkpoint(
    files: &[std::path::PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<Checkpoint> {
    let mut ck = Checkpoint::open(files, dtype, device)?;
    if !ck.strip_common_prefix(AIO_PREFIX) {
        ck.restrict_to_prefix(AIO_PREFIX);
    }
    Ok(ck)
}

/// f16 is refused: T5's feed-forward overflows it.
fn check_dtype(dtype: DType) -> Result<()> {
    if dtype == DType::F16 {
        return Err(Error::UnsupportedDtype {
            what: "T5",
            dtype,
            why: "T5's feed-forward activations overflow f16 (→ inf/NaN); use bf16 or f32",
        });
    }
    Ok(())
}

/// Whether the checkpoint uses llama.cpp's `t5encoder` names (city96's GGUF files).
fn is_llama_layout(ck: &Checkpoint) -> bool {
    ck.contains("enc.blk.0.attn_q.weight") || ck.contains("token_embd.weight")
}

/// The llama.cpp (`t5encoder`) name of a transformers T5 encoder tensor: the same map as
/// gguf-py's tensor mapping, ComfyUI-GGUF's and stable-diffusion.cpp's.
pub fn llama_name(hf: &str) -> Option<String> {
    match hf {
        "shared.weight" | "encoder.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "encoder.final_layer_norm.weight" => return Some("enc.output_norm.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("encoder.block.")?;
    let (i, sub) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    let part = match sub {
        "layer.0.SelfAttention.q.weight" => "attn_q.weight",
        "layer.0.SelfAttention.k.weight" => "attn_k.weight",
        "layer.0.SelfAttention.v.weight" => "attn_v.weight",
        "layer.0.SelfAttention.o.weight" => "attn_o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b.weight",
        "layer.0.layer_norm.weight" => "attn_norm.weight",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate.weight",
        "layer.1.DenseReluDense.wi_1.weight" => "ffn_up.weight",
        "layer.1.DenseReluDense.wo.weight" => "ffn_down.weight",
        "layer.1.layer_norm.weight" => "ffn_norm.weight",
        _ => return None,
    };
    Some(format!("enc.blk.{i}.{part}"))
}

impl T5Config {
    /// The config of the encoder in `ck`, from its tensors' shapes (either naming), with
    /// T5 v1.1's fixed choices (gated GELU, 32 buckets at most 128 apart, ε = 1e-6) and
    /// llama.cpp's `t5encoder.*` metadata where a GGUF file has it.
    pub fn detect(ck: &Checkpoint) -> Result<Self> {
        let llama = is_llama_layout(ck);
        let name = |k: &str| {
            if llama {
                llama_name(k).unwrap_or_else(|| k.to_string())
            } else {
                k.to_string()
            }
        };
        let dims2 = |k: &str| -> Result<(usize, usize)> {
            let k = name(k);
            match ck.shape(&k) {
                Some([a, b]) => Ok((*a, *b)),
                _ => Err(Error::InvalidConfig(format!(
                    "{}: no 2-D `{k}`: not a T5 encoder (its keys look like: {})",
                    ck.desc(),
                    ck.sample_keys(4).join(", ")
                ))),
            }
        };
        let emb = if ck.contains(&name("shared.weight")) {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let (vocab_size, d_model) = dims2(emb)?;
        let (inner, _) = dims2("encoder.block.0.layer.0.SelfAttention.q.weight")?;
        let (d_ff, _) = dims2("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")?;
        let (buckets, num_heads) =
            dims2("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let mut num_layers = 0;
        while ck.contains(&name(&format!(
            "encoder.block.{num_layers}.layer.0.SelfAttention.q.weight"
        ))) {
            num_layers += 1;
        }
        if num_heads == 0 || inner % num_heads != 0 {
            return Err(Error::InvalidConfig(format!(
                "{}: attention width {inner} is not a whole number of {num_heads} heads",
                ck.desc()
            )));
        }
        let eps = ck
            .gguf_metadata("t5encoder.attention.layer_norm_epsilon")
            .and_then(|v| match v {
                flux_kernels::gguf::Value::F64(e) => Some(*e),
                _ => None,
            })
            .unwrap_or(1e-6);
        let cfg = T5Config {
            vocab_size,
            d_model,
            d_kv: inner / num_heads,
            d_ff,
            num_layers,
            num_heads,
            relative_attention_num_buckets: buckets,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: eps,
            feed_forward_proj: "gated-gelu".into(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Keys of a full T5 checkpoint that the encoder does not use.
fn ignorable(key: &str) -> bool {
    key.starts_with("decoder.") || key.starts_with("lm_head.")
}

impl T5Encoder {
    /// Loads the encoder from memory-mapped checkpoint `files` (a `text_encoder_2/` folder's
    /// shards, or one file: safetensors in any float or fp8 type, or a llama.cpp-layout GGUF
    /// such as city96's). Accepts the embedding as `shared.weight` or
    /// `encoder.embed_tokens.weight`; ignores decoder and LM-head weights of full T5
    /// checkpoints; reads the `text_encoders.t5xxl.transformer.` part of all-in-one files;
    /// strict otherwise. f16 is refused: T5's feed-forward overflows it and would produce NaN.
    pub fn load(
        cfg: &T5Config,
        files: &[std::path::PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        check_dtype(dtype)?;
        let ck = open_checkpoint(files, dtype, device)?;
        Self::load_checkpoint(cfg, &ck, None)
    }

    /// Loads a single T5 encoder file (any format [`T5Encoder::load`] reads), with the config
    /// read from its tensors' shapes ([`T5Config::detect`]).
    pub fn from_file(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_path(path.as_ref(), dtype, device, None)
    }

    /// Loads the encoder from a `text_encoder_2/` folder ([`T5Encoder::from_dir`]) or one file
    /// ([`T5Encoder::from_file`]), encoding its dense linear weights into `quantize` while
    /// loading (`--quantize`; weights already packed in the file are kept, the embedding and
    /// norms stay as stored).
    pub fn from_path(
        path: &Path,
        dtype: DType,
        device: &Device,
        quantize: Option<flux_kernels::Encoding>,
    ) -> Result<Self> {
        check_dtype(dtype)?;
        let (cfg, ck) = if path.is_dir() {
            let cfg = T5Config::from_json(&read_config(path)?)?;
            let files = flux_kernels::sharded_files(path, "model")?;
            (cfg, open_checkpoint(&files, dtype, device)?)
        } else {
            let ck = open_checkpoint(&[path.to_path_buf()], dtype, device)?;
            (T5Config::detect(&ck)?, ck)
        };
        Self::load_checkpoint(&cfg, &ck, quantize)
    }

    fn load_checkpoint(
        cfg: &T5Config,
        ck: &Checkpoint,
        quantize: Option<flux_kernels::Encoding>,
    ) -> Result<Self> {
        cfg.validate()?;
        let llama = is_llama_layout(ck);
        let key = |k: &str| -> String {
            if llama {
                llama_name(k).unwrap_or_else(|| k.to_string())
            } else {
                k.to_string()
            }
        };
        let (d, inner, f) = (cfg.d_model, cfg.d_kv * cfg.num_heads, cfg.d_ff);
        let get = |k: &str, s: &[usize]| -> Result<Tensor> { Ok(ck.get(&key(k), Some(s))?) };
        let lin = |k: &str, i: usize, o: usize| -> Result<Linear> {
            Ok(ck.linear_as(&key(k), None, i, o, quantize)?)
        };
        let emb_shape = [cfg.vocab_size, d];
        let shared = match (
            ck.contains(&key("shared.weight")),
            ck.contains("encoder.embed_tokens.weight"),
        ) {
            (true, both) => {
                let t = get("shared.weight", &emb_shape)?;
                if both {
                    // tied copy: read it so it is not reported as unexpected
                    get("encoder.embed_tokens.weight", &emb_shape)?;
                }
                t
            }
            (false, true) => get("encoder.embed_tokens.weight", &emb_shape)?,
            (false, false) => get("shared.weight", &emb_shape)?, // the MissingTensor error
        };
        let mut blocks = vec![];
        let mut rel = None;
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            if i == 0 {
                rel = Some(get(
                    &format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    &[cfg.relative_attention_num_buckets, cfg.num_heads],
                )?);
            }
            blocks.push(Block {
                q: lin(&format!("{p}.0.SelfAttention.q.weight"), d, inner)?,
                k: lin(&format!("{p}.0.SelfAttention.k.weight"), d, inner)?,
                v: lin(&format!("{p}.0.SelfAttention.v.weight"), d, inner)?,
                o: lin(&format!("{p}.0.SelfAttention.o.weight"), inner, d)?,
                norm0: get(&format!("{p}.0.layer_norm.weight"), &[d])?,
                wi_0: lin(&format!("{p}.1.DenseReluDense.wi_0.weight"), d, f)?,
                wi_1: lin(&format!("{p}.1.DenseReluDense.wi_1.weight"), d, f)?,
                wo: lin(&format!("{p}.1.DenseReluDense.wo.weight"), f, d)?,
                norm1: get(&format!("{p}.1.layer_norm.weight"), &[d])?,
            });
        }
        let relative_attention_bias =
            rel.ok_or_else(|| Error::InvalidConfig("num_layers must be at least 1".into()))?;
        let model = T5Encoder {
            shared,
            relative_attention_bias,
            blocks,
            final_layer_norm: get("encoder.final_layer_norm.weight", &[d])?,
            cfg: cfg.clone(),
        };
        ck.finish(ignorable)?;
        Ok(model)
    }

    /// Loads a transformers `text_encoder_2/` folder (config.json + model safetensors, sharded
    /// or not).
    pub fn from_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_path(dir.as_ref(), dtype, device, None)
    }

    /// The config.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.shared.dtype()
    }

    /// The position bias `(1, H, L, L)` for length `l`, from block 0's table.
    pub fn position_bias(&self, l: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let idx: Vec<u32> = (0..l)
            .flat_map(|i| {
                (0..l).map(move |j| {
                    relative_position_bucket(
                        j as i64 - i as i64,
                        c.relative_attention_num_buckets,
                        c.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let idx = Tensor::from_vec(idx, l * l, self.shared.device())?;
        let bias = self.relative_attention_bias.index_select(&idx, 0)?; // (l·l, h)
        Ok(bias
            .reshape((l, l, c.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    /// The last hidden state for token ids.
    ///
    /// # Shapes
    /// `ids`: `(B, L)` integer. Returns `(B, L, d_model)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids
            .dims2()
            .map_err(|_| Error::InvalidIds(format!("expected (B, L), got {:?}", ids.dims())))?;
        if l == 0 {
            return Err(Error::InvalidIds("empty sequence".into()));
        }
        let ids = ids.to_dtype(DType::U32)?;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(Error::InvalidIds(format!(
                "id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let c = &self.cfg;
        let eps = c.layer_norm_epsilon;
        let mut x = self
            .shared
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, c.d_model))?;
        let bias = self.position_bias(l)?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, c.num_heads, c.d_kv))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let opts = AttnOpts {
            bias: Some(&bias),
            scale: Some(1.0),
            causal: false,
        };
        for blk in &self.blocks {
            let h = rms_norm(&x, &blk.norm0, eps)?;
            let (q, k, v) = (
                heads(blk.q.forward(&h)?)?,
                heads(blk.k.forward(&h)?)?,
                heads(blk.v.forward(&h)?)?,
            );
            let a = attention(&q, &k, &v, opts)?.transpose(1, 2)?.reshape((
                b,
                l,
                c.d_kv * c.num_heads,
            ))?;
            x = (x + blk.o.forward(&a)?)?;
            let h = rms_norm(&x, &blk.norm1, eps)?;
            let g = (gelu_tanh(&blk.wi_0.forward(&h)?)? * blk.wi_1.forward(&h)?)?;
            x = (&x + blk.wo.forward(&g)?)?;
        }
        Ok(rms_norm(&x, &self.final_layer_norm, eps)?)
    }
}
