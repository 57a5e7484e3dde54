//! Checkpoint layouts and strict loading.
//!
//! The model is defined once, with BFL's key names. Every other layout is a key mapping applied
//! at load time: a diffusers tensor may be renamed, several may be concatenated along dim 0
//! (qkv, single-block linear1), or its halves may be swapped (the last layer's adaLN, which
//! diffusers orders (scale, shift)). Loading is strict: each expected tensor must be present
//! with the expected shape, and tensors the model does not use are an error, so a file of a
//! different model or variant is caught. Files are memory-mapped, never read whole.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use flux_kernels::Checkpoint;

use crate::config::Config;
use crate::{Error, Result};

/// A transformer checkpoint layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// BFL's single file (`flux1-dev.safetensors`), optionally with every key prefixed by
    /// `model.diffusion_model.` (as some repackagings ship it).
    Bfl,
    /// diffusers' `transformer/` folder (`FluxTransformer2DModel`).
    Diffusers,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Bfl => "BFL",
            Layout::Diffusers => "diffusers",
        }
    }
}

/// Every tensor of a BFL-layout transformer for `cfg`, with its shape, in module order.
pub fn bfl_tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let hd = cfg.head_dim();
    let mlp = cfg.mlp_hidden();
    let mut out = vec![];
    let mut lin = |name: String, i: usize, o: usize, bias: bool| {
        out.push((format!("{name}.weight"), vec![o, i]));
        if bias {
            out.push((format!("{name}.bias"), vec![o]));
        }
    };
    lin("img_in".into(), cfg.in_channels, h, true);
    lin("time_in.in_layer".into(), 256, h, true);
    lin("time_in.out_layer".into(), h, h, true);
    if cfg.guidance_embed {
        lin("guidance_in.in_layer".into(), 256, h, true);
        lin("guidance_in.out_layer".into(), h, h, true);
    }
    lin("vector_in.in_layer".into(), cfg.vec_in_dim, h, true);
    lin("vector_in.out_layer".into(), h, h, true);
    lin("txt_in".into(), cfg.context_in_dim, h, true);
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            lin(format!("{p}_mod.lin"), h, 6 * h, true);
            lin(format!("{p}_attn.qkv"), h, 3 * h, cfg.qkv_bias);
            lin(format!("{p}_attn.proj"), h, h, true);
            lin(format!("{p}_mlp.0"), h, mlp, true);
            lin(format!("{p}_mlp.2"), mlp, h, true);
        }
    }
    for j in 0..cfg.depth_single_blocks {
        let p = format!("single_blocks.{j}");
        lin(format!("{p}.linear1"), h, 3 * h + mlp, true);
        lin(format!("{p}.linear2"), h + mlp, h, true);
        lin(format!("{p}.modulation.lin"), h, 3 * h, true);
    }
    lin("final_layer.linear".into(), h, cfg.out_channels, true);
    lin("final_layer.adaLN_modulation.1".into(), h, 2 * h, true);
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                out.push((
                    format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"),
                    vec![hd],
                ));
            }
        }
    }
    for j in 0..cfg.depth_single_blocks {
        for n in ["query_norm", "key_norm"] {
            out.push((format!("single_blocks.{j}.norm.{n}.scale"), vec![hd]));
        }
    }
    out
}

/// How a BFL tensor is assembled from a diffusers checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// One diffusers tensor, renamed.
    Rename(String),
    /// Several diffusers tensors concatenated along dim 0, in order.
    Concat(Vec<String>),
    /// One diffusers tensor whose two halves along dim 0 are swapped.
    SwapHalves(String),
}

impl Recipe {
    /// The diffusers keys this recipe reads.
    pub fn sources(&self) -> Vec<&str> {
        match self {
            Recipe::Rename(s) | Recipe::SwapHalves(s) => vec![s.as_str()],
            Recipe::Concat(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// The diffusers recipe for a BFL key (the inverse of diffusers' converter, spec §3.3).
pub fn diffusers_recipe(bfl: &str) -> Option<Recipe> {
    let (stem, param) = bfl.rsplit_once('.')?;
    let p = |s: &str| format!("{s}.{param}");
    let rename = |s: &str| Some(Recipe::Rename(p(s)));
    let direct = match stem {
        "img_in" => return rename("x_embedder"),
        "txt_in" => return rename("context_embedder"),
        "time_in.in_layer" => return rename("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => return rename("time_text_embed.timestep_embedder.linear_2"),
        "guidance_in.in_layer" => return rename("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer" => return rename("time_text_embed.guidance_embedder.linear_2"),
        "vector_in.in_layer" => return rename("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer" => return rename("time_text_embed.text_embedder.linear_2"),
        "final_layer.linear" => return rename("proj_out"),
        "final_layer.adaLN_modulation.1" => return Some(Recipe::SwapHalves(p("norm_out.linear"))),
        _ => None,
    };
    if direct.is_some() {
        return direct;
    }
    let norm_param = |s: &str| format!("{s}.weight");
    if let Some(rest) = stem.strip_prefix("double_blocks.") {
        let (i, sub) = rest.split_once('.')?;
        let b = format!("transformer_blocks.{i}");
        let r = |s: &str| Some(Recipe::Rename(format!("{b}.{s}.{param}")));
        return match (sub, param) {
            ("img_mod.lin", _) => r("norm1.linear"),
            ("txt_mod.lin", _) => r("norm1_context.linear"),
            ("img_attn.qkv", _) => Some(Recipe::Concat(
                ["to_q", "to_k", "to_v"]
                    .iter()
                    .map(|s| format!("{b}.attn.{s}.{param}"))
                    .collect(),
            )),
            ("txt_attn.qkv", _) => Some(Recipe::Concat(
                ["add_q_proj", "add_k_proj", "add_v_proj"]
                    .iter()
                    .map(|s| format!("{b}.attn.{s}.{param}"))
                    .collect(),
            )),
            ("img_attn.norm.query_norm", "scale") => {
                Some(Recipe::Rename(norm_param(&format!("{b}.attn.norm_q"))))
            }
            ("img_attn.norm.key_norm", "scale") => {
                Some(Recipe::Rename(norm_param(&format!("{b}.attn.norm_k"))))
            }
            ("txt_attn.norm.query_norm", "scale") => Some(Recipe::Rename(norm_param(&format!(
                "{b}.attn.norm_added_q"
            )))),
            ("txt_attn.norm.key_norm", "scale") => Some(Recipe::Rename(norm_param(&format!(
                "{b}.attn.norm_added_k"
            )))),
            ("img_attn.proj", _) => r("attn.to_out.0"),
            ("txt_attn.proj", _) => r("attn.to_add_out"),
            ("img_mlp.0", _) => r("ff.net.0.proj"),
            ("img_mlp.2", _) => r("ff.net.2"),
            ("txt_mlp.0", _) => r("ff_context.net.0.proj"),
            ("txt_mlp.2", _) => r("ff_context.net.2"),
            _ => None,
        };
    }
    if let Some(rest) = stem.strip_prefix("single_blocks.") {
        let (j, sub) = rest.split_once('.')?;
        let b = format!("single_transformer_blocks.{j}");
        return match (sub, param) {
            ("modulation.lin", _) => Some(Recipe::Rename(format!("{b}.norm.linear.{param}"))),
            ("linear1", _) => Some(Recipe::Concat(
                ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                    .iter()
                    .map(|s| format!("{b}.{s}.{param}"))
                    .collect(),
            )),
            ("linear2", _) => Some(Recipe::Rename(format!("{b}.proj_out.{param}"))),
            ("norm.query_norm", "scale") => {
                Some(Recipe::Rename(norm_param(&format!("{b}.attn.norm_q"))))
            }
            ("norm.key_norm", "scale") => {
                Some(Recipe::Rename(norm_param(&format!("{b}.attn.norm_k"))))
            }
            _ => None,
        };
    }
    None
}

/// Every tensor of a diffusers-layout transformer for `cfg`, with its shape (derived from the
/// BFL list through [`diffusers_recipe`]).
pub fn diffusers_tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut out = vec![];
    for (bfl, shape) in bfl_tensor_shapes(cfg) {
        let Some(recipe) = diffusers_recipe(&bfl) else {
            continue;
        };
        match recipe {
            Recipe::Rename(s) | Recipe::SwapHalves(s) => out.push((s, shape)),
            Recipe::Concat(parts) => {
                // qkv: three equal parts of h rows; linear1: q, k, v (h rows each) then the MLP.
                for (k, s) in parts.into_iter().enumerate() {
                    let rows = if k < 3 { h } else { shape[0] - 3 * h };
                    let mut sh = shape.clone();
                    sh[0] = rows;
                    out.push((s, sh));
                }
            }
        }
    }
    out
}

const BFL_PREFIX: &str = "model.diffusion_model.";

/// A checkpoint read through a layout's key mapping (strictness and mmap come from
/// [`flux_kernels::Checkpoint`]).
#[derive(Debug)]
pub struct Weights {
    ckpt: Checkpoint,
    layout: Layout,
    quantize: std::cell::Cell<Option<flux_kernels::Encoding>>,
    fp8_gemm: std::cell::Cell<bool>,
}

impl Weights {
    /// Maps checkpoint `files` (one file, or every shard; safetensors or GGUF) read in
    /// `layout`; tensors are converted to `dtype` on `device` as they are loaded. In the BFL
    /// layout, keys carrying the `model.diffusion_model.` prefix are read without it: a file
    /// whose every key has it (stable-diffusion.cpp's converter, repackagings), or the
    /// transformer part of an all-in-one file (its other parts are left to their loaders).
    pub fn open(files: &[PathBuf], layout: Layout, dtype: DType, device: &Device) -> Result<Self> {
        let mut ckpt = Checkpoint::open(files, dtype, device)?;
        if layout == Layout::Bfl && !ckpt.strip_common_prefix(BFL_PREFIX) {
            ckpt.restrict_to_prefix(BFL_PREFIX);
        }
        Ok(Weights {
            ckpt,
            layout,
            quantize: Default::default(),
            fp8_gemm: Default::default(),
        })
    }

    /// One single-file checkpoint in the BFL layout (any format; see [`Weights::open`]).
    pub fn open_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::open(&[path.to_path_buf()], Layout::Bfl, dtype, device)
    }

    /// The underlying checkpoint (shapes, stored types, GGUF metadata).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The config a BFL-layout checkpoint was made for, read from its tensors' shapes (any
    /// format: safetensors, fp8, GGUF). Shapes tell dev from schnell (`guidance_in`), the
    /// input channels (64 t2i, 128 Canny/Depth, 384 Fill), the width, depth and head size;
    /// they cannot tell dev from Kontext or Krea (same shapes): that is the caller's to say.
    pub fn detect_config(&self) -> Result<Config> {
        let ck = &self.ckpt;
        let not_flux = || Error::NotAFluxTransformer {
            source_desc: ck.desc().to_string(),
            layout: self.layout.name(),
            sample_keys: ck.sample_keys(6),
        };
        if self.layout != Layout::Bfl {
            return Err(Error::InvalidConfig(
                "configs are detected from BFL-layout files; diffusers folders carry config.json"
                    .into(),
            ));
        }
        let dims2 = |k: &str| -> Option<(usize, usize)> {
            match ck.shape(k)? {
                [a, b] => Some((*a, *b)),
                _ => None,
            }
        };
        let (hidden, in_channels) = dims2("img_in.weight").ok_or_else(not_flux)?;
        let (_, context_in_dim) = dims2("txt_in.weight").ok_or_else(not_flux)?;
        let (_, vec_in_dim) = dims2("vector_in.in_layer.weight").ok_or_else(not_flux)?;
        let (out_channels, _) = dims2("final_layer.linear.weight").ok_or_else(not_flux)?;
        let count = |prefix: &str| {
            let mut n = 0;
            while ck.contains(&format!("{prefix}.{n}.norm.query_norm.scale"))
                || ck.contains(&format!("{prefix}.{n}.img_attn.norm.query_norm.scale"))
            {
                n += 1;
            }
            n
        };
        let depth = count("double_blocks");
        let depth_single_blocks = count("single_blocks");
        let head_dim = ck
            .shape("double_blocks.0.img_attn.norm.query_norm.scale")
            .or_else(|| ck.shape("single_blocks.0.norm.query_norm.scale"))
            .and_then(|s| s.first().copied())
            .ok_or_else(not_flux)?;
        let mlp = dims2("double_blocks.0.img_mlp.0.weight")
            .map(|(m, _)| m)
            .or_else(|| dims2("single_blocks.0.linear1.weight").map(|(r, _)| r - 3 * hidden))
            .ok_or_else(not_flux)?;
        if head_dim == 0 || hidden % head_dim != 0 || hidden == 0 {
            return Err(Error::InvalidConfig(format!(
                "{}: width {hidden} is not a whole number of heads of {head_dim}",
                ck.desc()
            )));
        }
        // FLUX's RoPE axes for its 128-wide heads (BFL `configs`); other head sizes are not
        // a released model and need an explicit config.
        let axes_dim = match head_dim {
            128 => vec![16, 56, 56],
            _ => {
                return Err(Error::InvalidConfig(format!(
                    "{}: head size {head_dim} is not FLUX's 128; pass the config explicitly",
                    ck.desc()
                )))
            }
        };
        let cfg = Config {
            in_channels,
            out_channels,
            vec_in_dim,
            context_in_dim,
            hidden_size: hidden,
            mlp_ratio: mlp as f64 / hidden as f64,
            num_heads: hidden / head_dim,
            depth,
            depth_single_blocks,
            axes_dim,
            theta: 10_000.0,
            qkv_bias: ck.contains("double_blocks.0.img_attn.qkv.bias")
                || (depth == 0 && ck.contains("single_blocks.0.linear1.bias")),
            guidance_embed: ck.contains("guidance_in.in_layer.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Weights from any [`Checkpoint`] (for example [`Checkpoint::from_tensors`]: weights made
    /// in memory or on a GPU), read in `layout`.
    pub fn from_checkpoint(ckpt: Checkpoint, layout: Layout) -> Self {
        Weights {
            ckpt,
            layout,
            quantize: Default::default(),
            fp8_gemm: Default::default(),
        }
    }

    /// Encodes the blocks' dense linear weights into `q` while loading (`--quantize`): the 2-D
    /// weights of `double_blocks.*` and `single_blocks.*`, as city96's and
    /// stable-diffusion.cpp's converters choose; the embedders, the last layer, biases and
    /// norms stay as stored. Weights already packed in the file are kept as they are.
    pub fn set_quantize(&self, q: Option<flux_kernels::Encoding>) {
        self.quantize.set(q);
    }

    /// Makes the blocks' linear layers (the same ones as [`Weights::set_quantize`]) multiply in
    /// fp8 while loading (`--fp8-gemm`): dense weights encoded to e4m3 with one scale each,
    /// fp8 weights re-encoded so where they have another kind or a scale per row (see
    /// [`flux_kernels::LinearWeight::for_fp8_gemm`] and [`flux_kernels::Linear::set_fp8_gemm`]).
    /// GGUF weights keep their path. Takes precedence over [`Weights::set_quantize`].
    pub fn set_fp8_gemm(&self, on: bool) {
        self.fp8_gemm.set(on);
    }

    /// Maps a diffusers `transformer/` folder: its `config.json`, and either
    /// `diffusion_pytorch_model.safetensors` or the shards listed in
    /// `diffusion_pytorch_model.safetensors.index.json`.
    pub fn open_diffusers_folder(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<(Config, Self)> {
        let (config, files) = diffusers_folder_files(dir)?;
        let cfg = Config::from_diffusers_json(&config)?;
        let w = Self::open(&files, Layout::Diffusers, dtype, device)?;
        Ok((cfg, w))
    }

    /// The layout being read.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.ckpt.dtype()
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        self.ckpt.device()
    }

    fn raw(&self, key: &str, expected: Option<&[usize]>) -> Result<Tensor> {
        Ok(self.ckpt.get(key, expected)?)
    }

    /// The tensor named `bfl` (BFL key) with `shape`, assembled per the layout.
    pub fn get(&self, bfl: &str, shape: &[usize]) -> Result<Tensor> {
        match self.layout {
            Layout::Bfl => self.raw(bfl, Some(shape)),
            Layout::Diffusers => {
                let recipe = diffusers_recipe(bfl).ok_or_else(|| {
                    Error::InvalidConfig(format!("no diffusers mapping for `{bfl}`"))
                })?;
                let t = match &recipe {
                    Recipe::Rename(s) => self.raw(s, Some(shape))?,
                    Recipe::SwapHalves(s) => {
                        let t = self.raw(s, Some(shape))?;
                        let half = shape[0] / 2;
                        Tensor::cat(
                            &[t.narrow(0, half, shape[0] - half)?, t.narrow(0, 0, half)?],
                            0,
                        )?
                    }
                    Recipe::Concat(parts) => {
                        let ts = parts
                            .iter()
                            .map(|s| self.raw(s, None))
                            .collect::<Result<Vec<_>>>()?;
                        let t = Tensor::cat(&ts, 0)?;
                        if t.dims() != shape {
                            return Err(flux_kernels::LoadError::TensorShape {
                                name: format!("{} (concatenated)", parts.join(" + ")),
                                expected: shape.to_vec(),
                                got: t.dims().to_vec(),
                            }
                            .into());
                        }
                        t
                    }
                };
                Ok(t)
            }
        }
    }

    /// A linear layer `{name}.weight` `(out, in)` and, if `bias`, `{name}.bias` `(out)`. In the
    /// BFL layout a weight stored packed (GGUF blocks, fp8) stays packed.
    pub fn linear(
        &self,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<flux_kernels::Linear> {
        let (wk, bk) = (format!("{name}.weight"), format!("{name}.bias"));
        let block = name.starts_with("double_blocks.") || name.starts_with("single_blocks.");
        let fp8 = block && self.fp8_gemm.get();
        let w = match self.layout {
            Layout::Bfl => self.ckpt.get_weight(&wk, &[out, inp])?,
            Layout::Diffusers => flux_kernels::LinearWeight::Dense(self.get(&wk, &[out, inp])?),
        };
        let b = if bias {
            Some(self.get(&bk, &[out])?)
        } else {
            None
        };
        let (device, dtype) = (self.device(), self.dtype());
        Ok(if fp8 {
            flux_kernels::Linear::from_weight_fp8(w, b, device, dtype)?
        } else {
            let q = self.quantize.get().filter(|_| block);
            flux_kernels::Linear::from_weight(w.encoded(q)?, b, device, dtype)?
        })
    }

    /// Before any tensor is read: fails with [`Error::NotAFluxTransformer`] when the file has
    /// none of the keys this layout expects for `cfg` (a VAE, a text encoder, another layout).
    pub fn check_looks_like(&self, cfg: &Config) -> Result<()> {
        let expected: Vec<String> = match self.layout {
            Layout::Bfl => bfl_tensor_shapes(cfg).into_iter().map(|(k, _)| k).collect(),
            Layout::Diffusers => diffusers_tensor_shapes(cfg)
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
        };
        if !expected.iter().any(|k| self.ckpt.contains(k)) {
            return Err(Error::NotAFluxTransformer {
                source_desc: self.ckpt.desc().to_string(),
                layout: self.layout.name(),
                sample_keys: self.ckpt.sample_keys(6),
            });
        }
        Ok(())
    }

    /// After loading: fails with [`flux_kernels::LoadError::UnexpectedTensors`] if the file holds tensors that
    /// were not used.
    pub fn finish(&self) -> Result<()> {
        Ok(self.ckpt.finish(|_| false)?)
    }
}

/// The `config.json` text and the safetensors files of a diffusers model folder.
pub fn diffusers_folder_files(dir: &Path) -> Result<(String, Vec<PathBuf>)> {
    let path = dir.join("config.json");
    let config = flux_kernels::read_text(&path, flux_kernels::MAX_CONFIG_BYTES)?;
    let files = flux_kernels::sharded_files(dir, "diffusion_pytorch_model")?;
    Ok((config, files))
}
