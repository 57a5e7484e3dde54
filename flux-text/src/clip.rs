//! The CLIP ViT-L/14 text model (transformers `CLIPTextModel`), whose pooled output is FLUX's
//! `y`.

use std::path::Path;

use candle::{DType, Device, IndexOp, Tensor};
use std::collections::HashMap;

use flux_kernels::lora::{
    attach, plan_file, AdapterFile, KeyMap, LoraOptions, Patch, CLIP_PREFIXES,
};
use flux_kernels::{quick_gelu, Checkpoint, Linear};

use crate::encoder::{EncoderLayer, Norm};
use serde::Deserialize;

use crate::{Error, Result};

/// The text-model fields of a transformers `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipConfig {
    /// Vocabulary (49408).
    pub vocab_size: usize,
    /// Width (768 for ViT-L/14).
    pub hidden_size: usize,
    /// MLP width (3072).
    pub intermediate_size: usize,
    /// Layers (12).
    pub num_hidden_layers: usize,
    /// Heads (12).
    pub num_attention_heads: usize,
    /// Context length (77).
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon (1e-5).
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Activation; FLUX's CLIP uses `quick_gelu`.
    #[serde(default = "quick")]
    pub hidden_act: String,
}

fn eps() -> f64 {
    1e-5
}
fn quick() -> String {
    "quick_gelu".into()
}

impl ClipConfig {
    /// openai/clip-vit-large-patch14's text tower.
    pub fn vit_l_14() -> Self {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
        }
    }

    /// Reads `dir/config.json` (a transformers `text_encoder/` folder).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(&read_config(dir.as_ref())?)
    }

    /// Reads a `config.json` of a `CLIPTextModel` (or the `text_config` of a `CLIPModel`).
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("CLIP config.json: {e}")))?;
        let v = if v.get("text_config").is_some() {
            v["text_config"].clone()
        } else {
            v
        };
        let cfg: ClipConfig = serde_json::from_value(v)
            .map_err(|e| Error::InvalidConfig(format!("CLIP config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants.
    pub fn validate(&self) -> Result<()> {
        // bounds far above CLIP-L (768 wide, 3072 ff, 12 layers, 49408 tokens, 77 positions)
        if let Some(m) = flux_kernels::over_limit(&[
            ("vocab_size", self.vocab_size, 1 << 20),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 16,
            ),
        ]) {
            return Err(Error::InvalidConfig(m));
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::InvalidConfig(format!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.hidden_act != "quick_gelu" {
            return Err(Error::InvalidConfig(format!(
                "hidden_act {} is not supported (CLIP-L uses quick_gelu)",
                self.hidden_act
            )));
        }
        Ok(())
    }

    /// Every tensor of the text model, with its shape, under `prefix`: `"text_model."` in the
    /// released checkpoints and full `CLIPModel` files, `""` in files written by transformers 5.
    pub fn tensor_shapes(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let mut v = vec![
            (
                format!("{prefix}embeddings.token_embedding.weight"),
                vec![self.vocab_size, d],
            ),
            (
                format!("{prefix}embeddings.position_embedding.weight"),
                vec![self.max_position_embeddings, d],
            ),
        ];
        for i in 0..self.num_hidden_layers {
            v.extend(EncoderLayer::tensor_shapes(
                &format!("{prefix}encoder.layers.{i}"),
                d,
                f,
            ));
        }
        v.push((format!("{prefix}final_layer_norm.weight"), vec![d]));
        v.push((format!("{prefix}final_layer_norm.bias"), vec![d]));
        v
    }
}

/// Keys a checkpoint may hold besides the text model: the rest of a full `CLIPModel` file and
/// the `position_ids` buffer of older checkpoints. They are ignored.
fn ignorable(key: &str) -> bool {
    key.starts_with("vision_model.")
        || key.starts_with("visual_projection.")
        || key.starts_with("text_projection.")
        || key == "logit_scale"
        || key.ends_with("embeddings.position_ids")
}

/// The CLIP text transformer: token + position embeddings, pre-LN causal layers, final LN.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: Norm,
    cfg: ClipConfig,
    /// LoRAs were merged without keeping the weights as loaded.
    merged_for_good: bool,
}

/// What [`ClipTextModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// Final-LN hidden states `(B, L, D)`.
    pub last_hidden_state: Tensor,
    /// The hidden state at each row's first end-of-text (highest id) position, `(B, D)`:
    /// FLUX's `y`.
    pub pooled: Tensor,
}

impl ClipTextModel {
    /// Loads the text model from memory-mapped safetensors `files` (a `text_encoder/` folder's
    /// files or a full `CLIPModel` file, whose vision keys are ignored), with or without the
    /// `text_model.` key prefix. Strict otherwise.
    pub fn load(
        cfg: &ClipConfig,
        files: &[std::path::PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let ck = open_clip(files, dtype, device)?;
        Self::load_checkpoint(cfg, &ck)
    }

    /// Loads one CLIP file (any format [`ClipTextModel::load`] reads, the CLIP part of an
    /// all-in-one file too). Its config is `config` when the file's width matches it, else
    /// CLIP-L's ([`ClipConfig::vit_l_14`]) for a 768-wide file; other widths need `config`.
    pub fn from_file(
        path: impl AsRef<Path>,
        config: Option<&ClipConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let ck = open_clip(&[path.as_ref().to_path_buf()], dtype, device)?;
        let width = [
            "embeddings.token_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
        ]
        .iter()
        .find_map(|k| ck.shape(k).and_then(|s| s.get(1).copied()));
        let l14 = ClipConfig::vit_l_14();
        let cfg = match (config, width) {
            (Some(c), Some(w)) if c.hidden_size == w => c.clone(),
            (_, Some(w)) if w == l14.hidden_size => l14,
            (_, w) => {
                return Err(Error::InvalidConfig(format!(
                    "{}: a CLIP text model {} wide is not CLIP-L; give its config",
                    ck.desc(),
                    w.map_or("of unknown width".to_string(), |w| w.to_string())
                )))
            }
        };
        Self::load_checkpoint(&cfg, &ck)
    }

    fn load_checkpoint(cfg: &ClipConfig, ck: &Checkpoint) -> Result<Self> {
        cfg.validate()?;
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        // Released checkpoints (and CLIPModel files) prefix the text tower with `text_model.`;
        // transformers 5 writes CLIPTextModel without it. Accept both.
        let prefix = if ck.contains("embeddings.token_embedding.weight") {
            ""
        } else {
            "text_model."
        };
        let get = |k: &str, s: &[usize]| -> Result<Tensor> {
            let k = k.strip_prefix("text_model.").unwrap_or(k);
            Ok(ck.get(&format!("{prefix}{k}"), Some(s))?)
        };
        let lin = |p: &str, i: usize, o: usize| -> Result<Linear> {
            let p = p.strip_prefix("text_model.").unwrap_or(p);
            let (w, b) = (format!("{prefix}{p}.weight"), format!("{prefix}{p}.bias"));
            Ok(ck.linear(&w, Some(&b), i, o)?)
        };
        let norm = |p: &str| -> Result<Norm> {
            Ok(Norm {
                weight: get(&format!("{p}.weight"), &[d])?,
                bias: get(&format!("{p}.bias"), &[d])?,
                eps: cfg.layer_norm_eps,
            })
        };
        let mut layers = vec![];
        for i in 0..cfg.num_hidden_layers {
            let p = format!("text_model.encoder.layers.{i}");
            layers.push(EncoderLayer::load(&p, d, f, lin, norm)?);
        }
        let model = ClipTextModel {
            token_embedding: get(
                "text_model.embeddings.token_embedding.weight",
                &[cfg.vocab_size, d],
            )?,
            position_embedding: get(
                "text_model.embeddings.position_embedding.weight",
                &[cfg.max_position_embeddings, d],
            )?,
            layers,
            final_layer_norm: norm("text_model.final_layer_norm")?,
            cfg: cfg.clone(),
            merged_for_good: false,
        };
        ck.finish(ignorable)?;
        Ok(model)
    }

    /// Loads a transformers `text_encoder/` folder (config.json + model safetensors, sharded or
    /// not).
    pub fn from_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ClipConfig::from_json(&read_config(dir)?)?;
        let files = flux_kernels::sharded_files(dir, "model")?;
        Self::load(&cfg, &files, dtype, device)
    }

    /// The config.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.token_embedding.dtype()
    }

    /// Runs the model on token ids.
    ///
    /// # Shapes
    /// `ids`: `(B, L)` integer, `L ≤ max_position_embeddings`. Returns `(B, L, D)` and `(B, D)`.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let (b, l) = ids
            .dims2()
            .map_err(|_| Error::InvalidIds(format!("expected (B, L), got {:?}", ids.dims())))?;
        if l == 0 || l > self.cfg.max_position_embeddings {
            return Err(Error::InvalidIds(format!(
                "length {l} must be in 1..={}",
                self.cfg.max_position_embeddings
            )));
        }
        let ids_u32 = ids.to_dtype(DType::U32)?;
        let rows = ids_u32.to_vec2::<u32>()?;
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(Error::InvalidIds(format!(
                "id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let (d, h) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let tok = self
            .token_embedding
            .index_select(&ids_u32.flatten_all()?, 0)?
            .reshape((b, l, d))?;
        let mut x = tok.broadcast_add(&self.position_embedding.i(..l)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, h, true, quick_gelu)?;
        }
        let last = self.final_layer_norm.forward(&x)?;
        // The end of text is the first position of each row's highest id (49407).
        let eos: Vec<u32> = rows
            .iter()
            .map(|r| {
                let max = r.iter().copied().max().unwrap_or(0);
                r.iter().position(|&i| i == max).unwrap_or(0) as u32
            })
            .collect();
        let pooled = (0..b)
            .map(|i| last.i((i, eos[i] as usize)))
            .collect::<candle::Result<Vec<_>>>()?;
        Ok(ClipOutput {
            pooled: Tensor::stack(&pooled, 0)?,
            last_hidden_state: last,
        })
    }
}

impl ClipTextModel {
    /// The key map adapter files' CLIP modules are placed with: transformers'
    /// `CLIPTextModel` names (`text_model.encoder.layers.0.self_attn.q_proj`), after the
    /// prefixes of kohya (`lora_te1_`, `lora_te_`), diffusers (`text_encoder.`) and ComfyUI
    /// (`text_encoders.clip_l.transformer.`).
    pub fn lora_key_map(cfg: &ClipConfig) -> KeyMap {
        let mut map = KeyMap::new(CLIP_PREFIXES);
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("text_model.encoder.layers.{i}");
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                map.linear(&format!("{p}.self_attn.{n}"), d, d);
            }
            map.linear(&format!("{p}.mlp.fc1"), f, d);
            map.linear(&format!("{p}.mlp.fc2"), d, f);
        }
        map
    }

    /// Checks the CLIP modules of `files` (each with its strength) against a model of `cfg`:
    /// every module with a CLIP prefix must match a layer and fit it (unless `opts.lenient`).
    /// Returns, per file, the modules placed and the stems skipped.
    pub fn check_loras(
        cfg: &ClipConfig,
        files: &[(&AdapterFile, f32)],
        opts: &LoraOptions,
    ) -> Result<Vec<(usize, Vec<String>)>> {
        let map = Self::lora_key_map(cfg);
        let mut out = vec![];
        for (file, m) in files {
            let fp = plan_file(file, *m, &map, is_clip)?;
            if !fp.unmatched.is_empty() && !opts.lenient {
                return Err(Error::InvalidConfig(format!(
                    "{}: {} CLIP module(s) match no layer of this text encoder: {} (use lenient mode to skip them)",
                    file.path().display(),
                    fp.unmatched.len(),
                    flux_kernels::preview(&fp.unmatched)
                )));
            }
            out.push((fp.patches.len(), fp.unmatched));
        }
        Ok(out)
    }

    /// Applies the CLIP modules of `files` (a LoRA's `lora_te1_…` part), replacing any applied
    /// before, merged or at run time per `opts` (see [`ClipTextModel::check_loras`] for the
    /// checks). Returns the number of modules placed.
    pub fn apply_loras(
        &mut self,
        files: &[(&AdapterFile, f32)],
        opts: &LoraOptions,
    ) -> Result<usize> {
        self.remove_loras()?;
        Self::check_loras(&self.cfg, files, opts)?;
        let map = Self::lora_key_map(&self.cfg);
        let mut layers: HashMap<String, Vec<Patch>> = HashMap::new();
        let mut n = 0;
        for (file, m) in files {
            for (layer, patch) in plan_file(file, *m, &map, is_clip)?.patches {
                layers.entry(layer).or_default().push(patch);
                n += 1;
            }
        }
        let (dtype, device) = (self.dtype(), self.token_embedding.device().clone());
        let linears = self.linears_mut();
        match attach(linears, &layers, opts, dtype, &device) {
            Ok(for_good) => {
                self.merged_for_good = for_good;
                Ok(n)
            }
            Err(e) => {
                let _ = self.remove_loras();
                Err(e.into())
            }
        }
    }

    /// Removes every adapter: the weights as loaded, bit for bit (an error when they were
    /// merged for good).
    pub fn remove_loras(&mut self) -> Result<()> {
        if self.merged_for_good {
            return Err(Error::InvalidConfig(
                "the CLIP LoRAs were merged for good; reload the text encoder to change them"
                    .into(),
            ));
        }
        for (_, l) in self.linears_mut() {
            l.restore();
        }
        Ok(())
    }

    /// Every linear layer with its transformers name, as it is now (adapters merged or
    /// attached): for inspection and tests (the clones share the weights' memory).
    pub fn linears(&self) -> Vec<(String, Linear)> {
        let mut m = self.clone();
        m.linears_mut()
            .into_iter()
            .map(|(n, l)| (n, l.clone()))
            .collect()
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.layers
            .iter_mut()
            .enumerate()
            .flat_map(|(i, l)| l.linears_mut(&format!("text_model.encoder.layers.{i}")))
            .collect()
    }
}

/// Whether an adapter module stem is a CLIP one.
fn is_clip(stem: &str) -> bool {
    CLIP_PREFIXES.iter().any(|p| stem.starts_with(p))
}

/// The CLIP part of an all-in-one file (ComfyUI's layout).
const AIO_PREFIX: &str = "text_encoders.clip_l.transformer.";

fn open_clip(files: &[std::path::PathBuf], dtype: DType, device: &Device) -> Result<Checkpoint> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::UnsupportedDtype {
            what: "CLIP",
            dtype,
            why: "supported: f32, bf16, f16",
        });
    }
    let mut ck = Checkpoint::open(files, dtype, device)?;
    if !ck.strip_common_prefix(AIO_PREFIX) {
        ck.restrict_to_prefix(AIO_PREFIX);
    }
    Ok(ck)
}

pub(crate) fn read_config(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    Ok(flux_kernels::read_text(
        &path,
        flux_kernels::MAX_CONFIG_BYTES,
    )?)
}
