//! Transformer configurations: BFL's `FluxParams`, the presets, and diffusers' `config.json`.

use serde::Deserialize;

use crate::{Error, Result};

/// The transformer's hyper-parameters, named as BFL's `FluxParams`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Channels of a packed input token (64 = 16 latent channels × 2×2; 128 canny/depth; 384 fill).
    pub in_channels: usize,
    /// Channels of a packed output token.
    pub out_channels: usize,
    /// Width of the pooled text vector `y` (CLIP-L: 768).
    pub vec_in_dim: usize,
    /// Width of the text tokens `txt` (T5-XXL: 4096).
    pub context_in_dim: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width ratio (MLP hidden = `int(hidden_size · mlp_ratio)`).
    pub mlp_ratio: f64,
    /// Attention heads.
    pub num_heads: usize,
    /// Double-stream blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single_blocks: usize,
    /// RoPE dimensions per position axis; they sum to the head dimension.
    pub axes_dim: Vec<usize>,
    /// RoPE base.
    pub theta: f64,
    /// Whether the qkv projections have biases.
    pub qkv_bias: bool,
    /// Whether the model embeds a guidance scale (the dev family).
    pub guidance_embed: bool,
}

impl Config {
    /// FLUX.1-dev (BFL `src/flux/util.py`, `configs["flux-dev"]`).
    pub fn dev() -> Self {
        Config {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// FLUX.1-schnell (BFL `configs["flux-schnell"]`): dev without the guidance embedder.
    pub fn schnell() -> Self {
        Config {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    /// FLUX.1-Fill-dev (BFL `configs["flux-dev-fill"]`): 384 input channels (latent ‖ masked-image
    /// latent ‖ packed mask), 64 out.
    pub fn fill() -> Self {
        Config {
            in_channels: 384,
            out_channels: 64,
            ..Self::dev()
        }
    }

    /// FLUX.1-Canny-dev and FLUX.1-Depth-dev (BFL `configs["flux-dev-canny"]`, `["flux-dev-depth"]`):
    /// 128 input channels (latent ‖ control-image latent), 64 out.
    pub fn canny_depth() -> Self {
        Config {
            in_channels: 128,
            out_channels: 64,
            ..Self::dev()
        }
    }

    /// The released model these shapes belong to: `"dev"` (guidance-distilled text-to-image:
    /// also Kontext and Krea, which share its shapes), `"schnell"`, `"fill"` (384 input
    /// channels), `"canny/depth"` (128), or `"custom"`.
    pub fn variant(&self) -> &'static str {
        let full = self.hidden_size == 3072 && self.depth == 19 && self.depth_single_blocks == 38;
        match (self.in_channels, self.guidance_embed) {
            _ if !full => "custom",
            (64, true) => "dev",
            (64, false) => "schnell",
            (384, _) => "fill",
            (128, _) => "canny/depth",
            _ => "custom",
        }
    }

    /// Head dimension `hidden_size / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// MLP hidden width `int(hidden_size · mlp_ratio)`.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Checks the invariants BFL's constructor checks, and the implicit ones.
    pub fn validate(&self) -> Result<()> {
        const MAX_WIDTH: usize = 1 << 16;
        const MAX_BLOCKS: usize = 1024;
        let bad = |m: String| Err(Error::InvalidConfig(m));
        let sizes = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("vec_in_dim", self.vec_in_dim),
            ("context_in_dim", self.context_in_dim),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
        ];
        if let Some((n, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{n} must be positive"));
        }
        // bounds far above any FLUX (3072 wide, 24 heads, 19 + 38 blocks), so that a corrupt
        // config fails here, not in a huge allocation
        let mut limits: Vec<(&str, usize, usize)> =
            sizes.iter().map(|&(n, v)| (n, v, MAX_WIDTH)).collect();
        limits.push(("depth (num_layers)", self.depth, MAX_BLOCKS));
        limits.push((
            "depth_single_blocks (num_single_layers)",
            self.depth_single_blocks,
            MAX_BLOCKS,
        ));
        if let Some(m) = flux_kernels::over_limit(&limits) {
            return bad(m);
        }
        if self.axes_dim.len() != 3 {
            return bad(format!(
                "axes_dim needs exactly 3 entries (FLUX's position ids have 3 axes), got {:?}",
                self.axes_dim
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        let sum = self
            .axes_dim
            .iter()
            .try_fold(0usize, |a, &d| a.checked_add(d))
            .unwrap_or(usize::MAX);
        if sum != self.head_dim() {
            return bad(format!(
                "axes_dim {:?} sums to {sum}, but the head dimension is {}",
                self.axes_dim,
                self.head_dim()
            ));
        }
        if self.axes_dim.iter().any(|d| d % 2 != 0) {
            return bad(format!(
                "every axes_dim entry must be even, got {:?}",
                self.axes_dim
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0)
            || self.mlp_hidden() == 0
        {
            return bad(format!(
                "mlp_ratio must be in (0, 64], got {}",
                self.mlp_ratio
            ));
        }
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return bad(format!("theta must be positive, got {}", self.theta));
        }
        Ok(())
    }

    /// Reads a diffusers `transformer/config.json` (`FluxTransformer2DModel`).
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let d: DiffusersConfig = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("transformer config.json: {e}")))?;
        d.into_config()
    }
}

/// The fields of diffusers' `FluxTransformer2DModel` config (defaults as in its constructor).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DiffusersConfig {
    /// Patch size inside the model (FLUX: 1; packing happens outside).
    pub patch_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (`None` = `in_channels`).
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    /// Head dimension.
    pub attention_head_dim: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Text token width.
    pub joint_attention_dim: usize,
    /// Pooled text width.
    pub pooled_projection_dim: usize,
    /// Guidance embedder present.
    pub guidance_embeds: bool,
    /// RoPE axes.
    pub axes_dims_rope: Vec<usize>,
}

impl Default for DiffusersConfig {
    fn default() -> Self {
        DiffusersConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: false,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

impl DiffusersConfig {
    /// The equivalent BFL config (theta 10000, mlp_ratio 4 and qkv bias are fixed in diffusers).
    pub fn into_config(self) -> Result<Config> {
        if self.patch_size != 1 {
            return Err(Error::InvalidConfig(format!(
                "patch_size {} is not supported (FLUX uses 1)",
                self.patch_size
            )));
        }
        let cfg = Config {
            in_channels: self.in_channels,
            out_channels: self.out_channels.unwrap_or(self.in_channels),
            vec_in_dim: self.pooled_projection_dim,
            context_in_dim: self.joint_attention_dim,
            hidden_size: self
                .attention_head_dim
                .checked_mul(self.num_attention_heads)
                .ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "attention_head_dim {} × num_attention_heads {} overflows",
                        self.attention_head_dim, self.num_attention_heads
                    ))
                })?,
            mlp_ratio: 4.0,
            num_heads: self.num_attention_heads,
            depth: self.num_layers,
            depth_single_blocks: self.num_single_layers,
            axes_dim: self.axes_dims_rope,
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: self.guidance_embeds,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for c in [
            Config::dev(),
            Config::schnell(),
            Config::fill(),
            Config::canny_depth(),
        ] {
            c.validate().unwrap();
            assert_eq!(c.head_dim(), 128);
            assert_eq!(c.mlp_hidden(), 12288);
        }
    }

    #[test]
    fn invariants_are_typed_errors() {
        let bad = [
            Config {
                num_heads: 5,
                ..Config::dev()
            },
            Config {
                axes_dim: vec![16, 56, 54],
                ..Config::dev()
            },
            Config {
                axes_dim: vec![15, 57, 56],
                ..Config::dev()
            },
            Config {
                hidden_size: 0,
                ..Config::dev()
            },
            Config {
                mlp_ratio: f64::NAN,
                ..Config::dev()
            },
        ];
        for c in bad {
            assert!(
                matches!(c.validate(), Err(Error::InvalidConfig(_))),
                "{c:?}"
            );
        }
    }

    #[test]
    fn diffusers_json_round_trip() {
        let dev = r#"{"_class_name": "FluxTransformer2DModel", "guidance_embeds": true, "in_channels": 64,
                      "attention_head_dim": 128, "num_attention_heads": 24, "num_layers": 19,
                      "num_single_layers": 38, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                      "axes_dims_rope": [16, 56, 56], "patch_size": 1, "out_channels": null}"#;
        assert_eq!(Config::from_diffusers_json(dev).unwrap(), Config::dev());
        assert_eq!(
            Config::from_diffusers_json("{}").unwrap(),
            Config::schnell()
        );
        let fill = r#"{"in_channels": 384, "out_channels": 64, "guidance_embeds": true}"#;
        assert_eq!(Config::from_diffusers_json(fill).unwrap(), Config::fill());
        assert!(matches!(
            Config::from_diffusers_json("{\"patch_size\": 2}"),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            Config::from_diffusers_json("not json"),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            Config::from_diffusers_json("{\"axes_dims_rope\": [16, 56, 50]}"),
            Err(Error::InvalidConfig(_))
        ));
    }
}
