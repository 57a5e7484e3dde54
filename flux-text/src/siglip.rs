//! FLUX.1-Redux's image conditioning: SigLIP's vision transformer (transformers'
//! `SiglipVisionModel`, `google/siglip-so400m-patch14-384` in FLUX.1-Redux) and BFL's Redux
//! embedder, which maps each patch's hidden state to a T5-width token: the picture becomes extra
//! text tokens for the transformer.

use std::path::Path;

use candle::{DType, Device, Tensor};
use flux_kernels::{gelu_tanh, silu, Checkpoint, Linear};
use serde::Deserialize;

use crate::encoder::{EncoderLayer, Norm};
use crate::{Error, Result};

/// The vision model's config (transformers' `SiglipVisionConfig`; a full `SiglipConfig`'s
/// `vision_config` is read too). Missing fields take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SiglipVisionConfig {
    /// Width (1152 for so400m).
    pub hidden_size: usize,
    /// MLP width (4304).
    pub intermediate_size: usize,
    /// Encoder layers (27).
    pub num_hidden_layers: usize,
    /// Attention heads (16).
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input side in pixels (384).
    pub image_size: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// MLP activation; SigLIP uses `gelu_pytorch_tanh`.
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for SiglipVisionConfig {
    fn default() -> Self {
        SiglipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }
}

impl SiglipVisionConfig {
    /// FLUX.1-Redux's vision model, `google/siglip-so400m-patch14-384`.
    pub fn so400m_patch14_384() -> Self {
        SiglipVisionConfig {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            image_size: 384,
            patch_size: 14,
            ..Default::default()
        }
    }

    /// Parses a `config.json` of a `SiglipVisionModel` or a full `SiglipModel`.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("SigLIP config: {e}")))?;
        let v = v.get("vision_config").cloned().unwrap_or(v);
        let cfg: Self = serde_json::from_value(v)
            .map_err(|e| Error::InvalidConfig(format!("SigLIP config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Checks the invariants (and bounds, so a hostile config allocates nothing large).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("SigLIP: {m}")));
        for (what, v, max) in [
            ("hidden_size", self.hidden_size, 16384),
            ("intermediate_size", self.intermediate_size, 65536),
            ("num_hidden_layers", self.num_hidden_layers, 256),
            ("num_attention_heads", self.num_attention_heads, 256),
            ("image_size", self.image_size, 4096),
            ("patch_size", self.patch_size, 256),
        ] {
            if v == 0 || v > max {
                return bad(format!("{what} {v} must be in 1..={max}"));
            }
        }
        if self.num_channels != 3 {
            return bad(format!("{} input channels (RGB has 3)", self.num_channels));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu_tanh") {
            return bad(format!(
                "hidden_act {} is not supported (SigLIP uses gelu_pytorch_tanh)",
                self.hidden_act
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return bad(format!("layer_norm_eps {}", self.layer_norm_eps));
        }
        Ok(())
    }
}

/// SigLIP's vision transformer up to its last hidden state (after `post_layernorm`; the
/// pooling head is not used by Redux and its weights are ignored).
#[derive(Debug, Clone)]
pub struct SiglipVisionModel {
    /// The 3×p×p patch convolution as a linear map over flattened patches (`c, y, x` order).
    patch: Linear,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: Norm,
    cfg: SiglipVisionConfig,
}

/// Tensors of a SigLIP file besides the vision tower: the text tower of a full `SiglipModel`,
/// the pooling head, logit scale and bias, the position-ids buffer.
fn ignorable(key: &str) -> bool {
    key.starts_with("text_model.")
        || key.starts_with("head.")
        || key.starts_with("vision_model.head.")
        || key == "logit_scale"
        || key == "logit_bias"
        || key.ends_with("embeddings.position_ids")
}

impl SiglipVisionModel {
    /// Loads a transformers folder (`config.json` and `model*.safetensors`).
    pub fn from_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = SiglipVisionConfig::from_json(&crate::clip::read_config(dir)?)?;
        let files = flux_kernels::sharded_files(dir, "model")?;
        let ck = Checkpoint::open(&files, dtype, device)?;
        Self::load(&cfg, &ck)
    }

    /// Loads the vision tower from `ck`, with or without the `vision_model.` prefix; strict
    /// (the ignorable parts of [`ignorable`] aside).
    pub fn load(cfg: &SiglipVisionConfig, ck: &Checkpoint) -> Result<Self> {
        cfg.validate()?;
        let (d, f, p) = (cfg.hidden_size, cfg.intermediate_size, cfg.patch_size);
        let prefix = if ck.contains("embeddings.patch_embedding.weight") {
            ""
        } else {
            "vision_model."
        };
        let get = |k: &str, s: &[usize]| -> Result<Tensor> {
            Ok(ck.get(&format!("{prefix}{k}"), Some(s))?)
        };
        let lin = |k: &str, i: usize, o: usize| -> Result<Linear> {
            let (w, b) = (format!("{prefix}{k}.weight"), format!("{prefix}{k}.bias"));
            Ok(ck.linear(&w, Some(&b), i, o)?)
        };
        let norm = |k: &str| -> Result<Norm> {
            Ok(Norm {
                weight: get(&format!("{k}.weight"), &[d])?,
                bias: get(&format!("{k}.bias"), &[d])?,
                eps: cfg.layer_norm_eps,
            })
        };
        let w = get(
            "embeddings.patch_embedding.weight",
            &[d, cfg.num_channels, p, p],
        )?
        .reshape((d, cfg.num_channels * p * p))?;
        let b = get("embeddings.patch_embedding.bias", &[d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(&format!("encoder.layers.{i}"), d, f, lin, norm))
            .collect::<Result<Vec<_>>>()?;
        let model = SiglipVisionModel {
            patch: Linear::new(w, Some(b))?,
            position: get(
                "embeddings.position_embedding.weight",
                &[cfg.grid() * cfg.grid(), d],
            )?,
            layers,
            post_layernorm: norm("post_layernorm")?,
            cfg: cfg.clone(),
        };
        ck.finish(ignorable)?;
        Ok(model)
    }

    /// The config.
    pub fn config(&self) -> &SiglipVisionConfig {
        &self.cfg
    }

    /// The last hidden state `(B, grid², D)` of normalised pixels `(B, 3, S, S)`, S the
    /// config's `image_size`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (s, p, g) = (self.cfg.image_size, self.cfg.patch_size, self.cfg.grid());
        let (b, c, h, w) = pixels.dims4().map_err(|_| {
            Error::InvalidConfig(format!("pixels {:?}: expected (B, 3, S, S)", pixels.dims()))
        })?;
        if (c, h, w) != (self.cfg.num_channels, s, s) {
            return Err(Error::InvalidConfig(format!(
                "pixels {:?}: the model takes (B, {}, {s}, {s})",
                pixels.dims(),
                self.cfg.num_channels
            )));
        }
        // (B, C, g, p, g, p) → (B, g, g, C, p, p): each patch flattened as the kernel is
        let patches = pixels
            .to_dtype(self.position.dtype())?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        let mut x = self
            .patch
            .forward(&patches)?
            .broadcast_add(&self.position)?;
        for layer in &self.layers {
            x = layer.forward(&x, self.cfg.num_attention_heads, false, gelu_tanh)?;
        }
        self.post_layernorm.forward(&x)
    }
}

/// BFL's Redux embedder (`ReduxImageEncoder`): `redux_down(silu(redux_up(x)))`, SigLIP width
/// → 3 × T5 width → T5 width.
#[derive(Debug, Clone)]
pub struct ReduxEmbedder {
    up: Linear,
    down: Linear,
}

impl ReduxEmbedder {
    /// Loads `flux1-redux-dev.safetensors` (`redux_up`, `redux_down`); the widths come from
    /// the file and must be SigLIP's width in and a 3:1 hidden width out.
    pub fn from_file(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let ck = Checkpoint::open(&[path.as_ref().to_path_buf()], dtype, device)?;
        let shape = |k: &str| {
            ck.shape(k).map(<[usize]>::to_vec).ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "{}: no `{k}`: not a FLUX.1-Redux embedder file",
                    ck.desc()
                ))
            })
        };
        let up = shape("redux_up.weight")?;
        let [hidden, width] = <[usize; 2]>::try_from(up.clone()).map_err(|_| {
            Error::InvalidConfig(format!("redux_up.weight has shape {up:?}, expected 2-D"))
        })?;
        if hidden % 3 != 0 || hidden == 0 || width == 0 {
            return Err(Error::InvalidConfig(format!(
                "redux_up.weight {up:?}: the hidden width must be 3 × the output width"
            )));
        }
        let out = hidden / 3;
        let e = ReduxEmbedder {
            up: ck.linear("redux_up.weight", Some("redux_up.bias"), width, hidden)?,
            down: ck.linear("redux_down.weight", Some("redux_down.bias"), hidden, out)?,
        };
        ck.finish(|_| false)?;
        Ok(e)
    }

    /// `(in, out)` widths: SigLIP's and T5's.
    pub fn dims(&self) -> (usize, usize) {
        (self.up.dims().0, self.down.dims().1)
    }

    /// The image tokens `(B, L, T5 width)` of SigLIP hidden states `(B, L, width)`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self.up.forward(hidden)?;
        Ok(self.down.forward(&silu(&h)?)?)
    }
}
