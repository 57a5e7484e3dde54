//! Autoencoder configurations: BFL's `AutoEncoderParams` and diffusers' `AutoencoderKL` config.

use serde::Deserialize;

use crate::{Error, Result};

/// The autoencoder's hyper-parameters, named as BFL's `AutoEncoderParams`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Base width (128).
    pub ch: usize,
    /// Image channels out (3).
    pub out_ch: usize,
    /// Width multiplier per level (`[1, 2, 4, 4]`); one downsample between levels.
    pub ch_mult: Vec<usize>,
    /// Resnet blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Latent channels (16).
    pub z_channels: usize,
    /// Latent scale (0.3611).
    pub scale_factor: f64,
    /// Latent shift (0.1159).
    pub shift_factor: f64,
    /// GroupNorm groups (BFL hard-codes 32; tiny test configs use fewer).
    pub norm_groups: usize,
}

impl Config {
    /// The FLUX.1 autoencoder (BFL `src/flux/util.py` `ae_params`, identical for every FLUX.1
    /// variant).
    pub fn flux() -> Self {
        Config {
            in_channels: 3,
            ch: 128,
            out_ch: 3,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            scale_factor: 0.3611,
            shift_factor: 0.1159,
            norm_groups: 32,
        }
    }

    /// Spatial downsampling factor `2^(levels − 1)` (8 for FLUX).
    pub fn downsample_factor(&self) -> usize {
        1 << self.ch_mult.len().saturating_sub(1)
    }

    /// Checks the invariants: positive sizes, GroupNorm groups dividing every width.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.ch == 0 || self.in_channels == 0 || self.out_ch == 0 || self.z_channels == 0 {
            return bad("channel counts must be positive".into());
        }
        // bounds far above FLUX's (128 × [1, 2, 4, 4], 2 blocks, 16 latent channels)
        if let Some(m) = flux_kernels::over_limit(&[
            ("ch", self.ch, 1 << 12),
            ("in_channels", self.in_channels, 1 << 10),
            ("out_ch", self.out_ch, 1 << 10),
            ("z_channels", self.z_channels, 1 << 10),
            ("num_res_blocks", self.num_res_blocks, 64),
            ("levels (ch_mult)", self.ch_mult.len(), 8),
            (
                "largest ch_mult",
                self.ch_mult.iter().copied().max().unwrap_or(0),
                64,
            ),
        ]) {
            return bad(m);
        }
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad(format!(
                "ch_mult must be non-empty and positive, got {:?}",
                self.ch_mult
            ));
        }
        if self.num_res_blocks == 0 {
            return bad("num_res_blocks must be positive".into());
        }
        if self.norm_groups == 0 {
            return bad("norm_groups must be positive".into());
        }
        for m in &self.ch_mult {
            if !(self.ch * m).is_multiple_of(self.norm_groups) {
                return bad(format!(
                    "GroupNorm groups {} do not divide width {} (ch {} × {m})",
                    self.norm_groups,
                    self.ch * m,
                    self.ch
                ));
            }
        }
        if !(self.scale_factor.is_finite()
            && self.scale_factor != 0.0
            && self.shift_factor.is_finite())
        {
            return bad(format!(
                "scale_factor {} must be finite and non-zero, shift_factor {} finite",
                self.scale_factor, self.shift_factor
            ));
        }
        Ok(())
    }

    /// Reads a diffusers `vae/config.json` (`AutoencoderKL` with the FLUX block structure).
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let d: DiffusersConfig = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("vae config.json: {e}")))?;
        d.into_config()
    }
}

/// The fields of diffusers' `AutoencoderKL` config that FLUX uses.
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusersConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Width per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level.
    pub layers_per_block: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latent scale.
    pub scaling_factor: f64,
    /// Latent shift (FLUX: 0.1159).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// FLUX has none.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// FLUX has none.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// FLUX has mid-block attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}

impl DiffusersConfig {
    /// The equivalent BFL config; refuses structures FLUX does not use.
    pub fn into_config(self) -> Result<Config> {
        if self.use_quant_conv || self.use_post_quant_conv {
            return Err(Error::InvalidConfig(
                "quant_conv/post_quant_conv are not part of the FLUX autoencoder".into(),
            ));
        }
        if !self.mid_block_add_attention {
            return Err(Error::InvalidConfig(
                "the FLUX autoencoder has mid-block attention".into(),
            ));
        }
        let ch = *self
            .block_out_channels
            .first()
            .ok_or_else(|| Error::InvalidConfig("block_out_channels is empty".into()))?;
        if ch == 0 || self.block_out_channels.iter().any(|c| c % ch != 0) {
            return Err(Error::InvalidConfig(format!(
                "block_out_channels {:?} are not multiples of the first",
                self.block_out_channels
            )));
        }
        let cfg = Config {
            in_channels: self.in_channels,
            ch,
            out_ch: self.out_channels,
            ch_mult: self.block_out_channels.iter().map(|c| c / ch).collect(),
            num_res_blocks: self.layers_per_block,
            z_channels: self.latent_channels,
            scale_factor: self.scaling_factor,
            shift_factor: self.shift_factor.unwrap_or(0.0),
            norm_groups: self.norm_num_groups,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
