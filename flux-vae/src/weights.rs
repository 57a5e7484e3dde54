//! Checkpoint layouts of the autoencoder and strict loading.
//!
//! The model uses BFL's key names (`ae.safetensors`). diffusers' `vae/` folder is read through a
//! key mapping (spec §4.5): renamed blocks, decoder up-block indices reversed, `conv_shortcut`
//! for `nin_shortcut`, `conv_norm_out` for `norm_out`, and mid-attention 1×1 convolutions stored
//! as `[c, c]` linears (reshaped to `[c, c, 1, 1]` on load).

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use flux_kernels::Checkpoint;

use crate::config::Config;
use crate::{Error, Result};

/// An autoencoder checkpoint layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// BFL's `ae.safetensors`.
    Bfl,
    /// diffusers' `vae/` folder (`AutoencoderKL`).
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

fn resnet(out: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, cout: usize) {
    out.push((format!("{p}.norm1.weight"), vec![cin]));
    out.push((format!("{p}.norm1.bias"), vec![cin]));
    out.push((format!("{p}.conv1.weight"), vec![cout, cin, 3, 3]));
    out.push((format!("{p}.conv1.bias"), vec![cout]));
    out.push((format!("{p}.norm2.weight"), vec![cout]));
    out.push((format!("{p}.norm2.bias"), vec![cout]));
    out.push((format!("{p}.conv2.weight"), vec![cout, cout, 3, 3]));
    out.push((format!("{p}.conv2.bias"), vec![cout]));
    if cin != cout {
        out.push((format!("{p}.nin_shortcut.weight"), vec![cout, cin, 1, 1]));
        out.push((format!("{p}.nin_shortcut.bias"), vec![cout]));
    }
}

fn conv(out: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, cout: usize, k: usize) {
    out.push((format!("{p}.weight"), vec![cout, cin, k, k]));
    out.push((format!("{p}.bias"), vec![cout]));
}

fn mid(out: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize) {
    resnet(out, &format!("{p}.mid.block_1"), c, c);
    out.push((format!("{p}.mid.attn_1.norm.weight"), vec![c]));
    out.push((format!("{p}.mid.attn_1.norm.bias"), vec![c]));
    for n in ["q", "k", "v", "proj_out"] {
        conv(out, &format!("{p}.mid.attn_1.{n}"), c, c, 1);
    }
    resnet(out, &format!("{p}.mid.block_2"), c, c);
}

/// Every tensor of a BFL-layout autoencoder for `cfg`, with its shape, in module order.
pub fn bfl_tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![];
    let levels = cfg.ch_mult.len();
    // encoder
    conv(&mut out, "encoder.conv_in", cfg.in_channels, cfg.ch, 3);
    let mut cin = cfg.ch;
    for (l, m) in cfg.ch_mult.iter().enumerate() {
        let cout = cfg.ch * m;
        for b in 0..cfg.num_res_blocks {
            resnet(&mut out, &format!("encoder.down.{l}.block.{b}"), cin, cout);
            cin = cout;
        }
        if l + 1 != levels {
            conv(
                &mut out,
                &format!("encoder.down.{l}.downsample.conv"),
                cin,
                cin,
                3,
            );
        }
    }
    mid(&mut out, "encoder", cin);
    out.push(("encoder.norm_out.weight".into(), vec![cin]));
    out.push(("encoder.norm_out.bias".into(), vec![cin]));
    conv(&mut out, "encoder.conv_out", cin, 2 * cfg.z_channels, 3);
    // decoder
    let mut cin = cfg.ch * cfg.ch_mult[levels - 1];
    conv(&mut out, "decoder.conv_in", cfg.z_channels, cin, 3);
    mid(&mut out, "decoder", cin);
    for l in (0..levels).rev() {
        let cout = cfg.ch * cfg.ch_mult[l];
        for b in 0..=cfg.num_res_blocks {
            resnet(&mut out, &format!("decoder.up.{l}.block.{b}"), cin, cout);
            cin = cout;
        }
        if l != 0 {
            conv(
                &mut out,
                &format!("decoder.up.{l}.upsample.conv"),
                cin,
                cin,
                3,
            );
        }
    }
    out.push(("decoder.norm_out.weight".into(), vec![cin]));
    out.push(("decoder.norm_out.bias".into(), vec![cin]));
    conv(&mut out, "decoder.conv_out", cin, cfg.out_ch, 3);
    out
}

/// How a BFL tensor is read from a diffusers checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// One diffusers tensor, renamed.
    Rename(String),
    /// One diffusers tensor, renamed, stored as a `[c, c]` linear for a `[c, c, 1, 1]` conv.
    Squeezed(String),
}

impl Recipe {
    /// The diffusers key read.
    pub fn source(&self) -> &str {
        match self {
            Recipe::Rename(s) | Recipe::Squeezed(s) => s,
        }
    }
}

/// The diffusers recipe for a BFL key, for a model with `levels` resolution levels.
pub fn diffusers_recipe(bfl: &str, levels: usize) -> Option<Recipe> {
    let (side, rest) = bfl.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let shortcut = |s: &str| s.replace("nin_shortcut", "conv_shortcut");
    let r = |s: String| Some(Recipe::Rename(format!("{side}.{s}")));
    if let Some(x) = rest.strip_prefix("norm_out.") {
        return r(format!("conv_norm_out.{x}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return r(rest.to_string());
    }
    if let Some(x) = rest.strip_prefix("mid.block_1.") {
        return r(format!("mid_block.resnets.0.{x}"));
    }
    if let Some(x) = rest.strip_prefix("mid.block_2.") {
        return r(format!("mid_block.resnets.1.{x}"));
    }
    if let Some(x) = rest.strip_prefix("mid.attn_1.") {
        let (name, param) = x.split_once('.')?;
        let new = match name {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let key = format!("{side}.mid_block.attentions.0.{new}.{param}");
        return Some(if name != "norm" && param == "weight" {
            Recipe::Squeezed(key)
        } else {
            Recipe::Rename(key)
        });
    }
    if let Some(x) = rest.strip_prefix("down.") {
        let (l, x) = x.split_once('.')?;
        if let Some(y) = x.strip_prefix("block.") {
            return r(format!("down_blocks.{l}.resnets.{}", shortcut(y)));
        }
        if let Some(y) = x.strip_prefix("downsample.") {
            return r(format!("down_blocks.{l}.downsamplers.0.{y}"));
        }
        return None;
    }
    if let Some(x) = rest.strip_prefix("up.") {
        let (l, x) = x.split_once('.')?;
        let l: usize = l.parse().ok()?;
        let u = levels.checked_sub(1)?.checked_sub(l)?;
        if let Some(y) = x.strip_prefix("block.") {
            return r(format!("up_blocks.{u}.resnets.{}", shortcut(y)));
        }
        if let Some(y) = x.strip_prefix("upsample.") {
            return r(format!("up_blocks.{u}.upsamplers.0.{y}"));
        }
    }
    None
}

/// Every tensor of a diffusers-layout autoencoder for `cfg`, with its shape.
pub fn diffusers_tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let levels = cfg.ch_mult.len();
    bfl_tensor_shapes(cfg)
        .into_iter()
        .filter_map(|(k, s)| {
            diffusers_recipe(&k, levels).map(|r| match r {
                Recipe::Rename(n) => (n, s),
                Recipe::Squeezed(n) => (n, s[..2].to_vec()),
            })
        })
        .collect()
}

/// A checkpoint read through a layout's key mapping.
#[derive(Debug)]
pub struct Weights {
    ckpt: Checkpoint,
    layout: Layout,
    levels: usize,
}

impl Weights {
    /// Maps checkpoint `files` (safetensors or GGUF) read in `layout` for a model with
    /// `cfg`'s levels; tensors are converted to `dtype` on `device`. In the BFL layout the
    /// `vae.` part of an all-in-one file (ComfyUI's layout) is read without its prefix.
    pub fn open(
        files: &[PathBuf],
        layout: Layout,
        cfg: &Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut ckpt = Checkpoint::open(files, dtype, device)?;
        if layout == Layout::Bfl && !ckpt.strip_common_prefix("vae.") {
            ckpt.restrict_to_prefix("vae.");
        }
        Ok(Weights {
            ckpt,
            layout,
            levels: cfg.ch_mult.len(),
        })
    }

    /// The stored shape of `key` (in this layout's names), if present.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.ckpt.shape(key)
    }

    /// Whether the file's first convolution has the shape `cfg` expects (a cheap check of
    /// which config a BFL-layout file was made for, before anything is loaded).
    pub fn fits(&self, cfg: &Config) -> bool {
        let want = bfl_tensor_shapes(cfg)
            .into_iter()
            .find(|(k, _)| k == "encoder.conv_in.weight");
        matches!((want, self.shape("encoder.conv_in.weight")), (Some((_, w)), Some(s)) if w == s)
    }

    /// Maps a diffusers `vae/` folder: its `config.json` and safetensors file(s).
    pub fn open_diffusers_folder(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<(Config, Self)> {
        let path = dir.join("config.json");
        let text = flux_kernels::read_text(&path, flux_kernels::MAX_CONFIG_BYTES)?;
        let cfg = Config::from_diffusers_json(&text)?;
        let files = flux_kernels::sharded_files(dir, "diffusion_pytorch_model")?;
        let w = Self::open(&files, Layout::Diffusers, &cfg, dtype, device)?;
        Ok((cfg, w))
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.ckpt.dtype()
    }

    /// The tensor named `bfl` (BFL key) with `shape`, read per the layout.
    pub fn get(&self, bfl: &str, shape: &[usize]) -> Result<Tensor> {
        match self.layout {
            Layout::Bfl => Ok(self.ckpt.get(bfl, Some(shape))?),
            Layout::Diffusers => match diffusers_recipe(bfl, self.levels) {
                Some(Recipe::Rename(k)) => Ok(self.ckpt.get(&k, Some(shape))?),
                Some(Recipe::Squeezed(k)) => {
                    Ok(self.ckpt.get(&k, Some(&shape[..2]))?.reshape(shape)?)
                }
                None => Err(Error::InvalidConfig(format!(
                    "no diffusers mapping for `{bfl}`"
                ))),
            },
        }
    }

    /// Fails with [`Error::NotAnAutoencoder`] when the file has none of the expected keys.
    pub fn check_looks_like(&self, cfg: &Config) -> Result<()> {
        let expected = match self.layout {
            Layout::Bfl => bfl_tensor_shapes(cfg),
            Layout::Diffusers => diffusers_tensor_shapes(cfg),
        };
        if !expected.iter().any(|(k, _)| self.ckpt.contains(k)) {
            return Err(Error::NotAnAutoencoder {
                source_desc: self.ckpt.desc().to_string(),
                layout: self.layout.name(),
                sample_keys: self.ckpt.sample_keys(6),
            });
        }
        Ok(())
    }

    /// Fails with [`flux_kernels::LoadError::UnexpectedTensors`] if tensors were left unused.
    pub fn finish(&self) -> Result<()> {
        Ok(self.ckpt.finish(|_| false)?)
    }
}
