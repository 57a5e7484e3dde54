//! The autoencoder, module by module as BFL's `src/flux/modules/autoencoder.py` defines it.
//! Field and prefix names equal the BFL checkpoint keys.

use candle::{DType, Device, Tensor, D};
use flux_kernels::{attention, group_norm, silu, AttnOpts, Linear};

use crate::config::Config;
use crate::weights::{Layout, Weights};
use crate::{Error, Result};

const EPS: f64 = 1e-6;

/// A 2-D convolution `[out, in, k, k]` with bias.
#[derive(Debug, Clone)]
struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    fn load(
        w: &Weights,
        p: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: w.get(&format!("{p}.weight"), &[cout, cin, k, k])?,
            bias: w.get(&format!("{p}.bias"), &[cout])?,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's CPU convolution has no bf16/f16 kernel: there, convolve in f32 (as PyTorch
        // accumulates) and round the result back.
        let dtype = x.dtype();
        let (x, w) = if x.device().is_cpu() && dtype != DType::F32 {
            (x.to_dtype(DType::F32)?, self.weight.to_dtype(DType::F32)?)
        } else {
            (x.clone(), self.weight.clone())
        };
        let y = x
            .conv2d(&w, self.padding, self.stride, 1, 1)?
            .to_dtype(dtype)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
    }
}

/// GroupNorm with affine parameters.
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl Norm {
    fn load(w: &Weights, p: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Norm {
            weight: w.get(&format!("{p}.weight"), &[c])?,
            bias: w.get(&format!("{p}.bias"), &[c])?,
            groups,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(group_norm(x, self.groups, &self.weight, &self.bias, EPS)?)
    }
}

/// `x + conv2(swish(norm2(conv1(swish(norm1(x))))))`, with a 1×1 `nin_shortcut` when the width
/// changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: Norm,
    conv1: Conv2d,
    norm2: Norm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(w: &Weights, p: &str, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: Norm::load(w, &format!("{p}.norm1"), cin, groups)?,
            conv1: Conv2d::load(w, &format!("{p}.conv1"), cin, cout, 3, 1, 1)?,
            norm2: Norm::load(w, &format!("{p}.norm2"), cout, groups)?,
            conv2: Conv2d::load(w, &format!("{p}.conv2"), cout, cout, 3, 1, 1)?,
            nin_shortcut: if cin != cout {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.nin_shortcut"),
                    cin,
                    cout,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    /// # Shapes
    /// `(B, C_in, H, W)` → `(B, C_out, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        let x = match &self.nin_shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((x + h)?)
    }
}

/// Single-head self-attention over the `H·W` positions (mid block only), through the shared
/// attention op; q, k, v and proj_out are 1×1 convolutions, applied as linears on tokens.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj_out: Linear,
}

impl AttnBlock {
    fn load(w: &Weights, p: &str, c: usize, groups: usize) -> Result<Self> {
        let lin = |n: &str| -> Result<Linear> {
            let weight = w
                .get(&format!("{p}.{n}.weight"), &[c, c, 1, 1])?
                .reshape((c, c))?;
            let bias = w.get(&format!("{p}.{n}.bias"), &[c])?;
            Ok(Linear::new(weight, Some(bias))?)
        };
        Ok(AttnBlock {
            norm: Norm::load(w, &format!("{p}.norm"), c, groups)?,
            q: lin("q")?,
            k: lin("k")?,
            v: lin("v")?,
            proj_out: lin("proj_out")?,
        })
    }

    /// # Shapes
    /// `(B, C, H, W)` → `(B, C, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?; // (b, hw, c)
        let q = self.q.forward(&tokens)?.unsqueeze(1)?; // (b, 1, hw, c)
        let k = self.k.forward(&tokens)?.unsqueeze(1)?;
        let v = self.v.forward(&tokens)?.unsqueeze(1)?;
        let a = attention(&q, &k, &v, AttnOpts::default())?.squeeze(1)?; // (b, hw, c)
        let o = self
            .proj_out
            .forward(&a)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((x + o)?)
    }
}

/// Pad right and bottom by one zero, then a stride-2 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// # Shapes
    /// `(B, C, H, W)` → `(B, C, H/2, W/2)` for even `H`, `W`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x
            .pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?;
        self.conv.forward(&x)
    }
}

/// Nearest-neighbour ×2, then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// # Shapes
    /// `(B, C, H, W)` → `(B, C, 2H, 2W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

#[derive(Debug, Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn load(w: &Weights, p: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::load(w, &format!("{p}.block_1"), c, c, groups)?,
            attn_1: AttnBlock::load(w, &format!("{p}.attn_1"), c, groups)?,
            block_2: ResnetBlock::load(w, &format!("{p}.block_2"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block_2
            .forward(&self.attn_1.forward(&self.block_1.forward(x)?)?)
    }
}

/// One resolution level: resnet blocks and an optional resampler.
#[derive(Debug, Clone)]
struct Level<S> {
    block: Vec<ResnetBlock>,
    resample: Option<S>,
}

/// The encoder: image `(B, 3, H, W)` → moments `(B, 2·z, H/8, W/8)` (mean ‖ logvar).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level<Downsample>>,
    mid: Mid,
    norm_out: Norm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        let g = cfg.norm_groups;
        let levels = cfg.ch_mult.len();
        let mut cin = cfg.ch;
        let mut down = vec![];
        for (l, m) in cfg.ch_mult.iter().enumerate() {
            let cout = cfg.ch * m;
            let mut block = vec![];
            for b in 0..cfg.num_res_blocks {
                block.push(ResnetBlock::load(
                    w,
                    &format!("encoder.down.{l}.block.{b}"),
                    cin,
                    cout,
                    g,
                )?);
                cin = cout;
            }
            let resample = if l + 1 != levels {
                Some(Downsample {
                    conv: Conv2d::load(
                        w,
                        &format!("encoder.down.{l}.downsample.conv"),
                        cin,
                        cin,
                        3,
                        2,
                        0,
                    )?,
                })
            } else {
                None
            };
            down.push(Level { block, resample });
        }
        Ok(Encoder {
            conv_in: Conv2d::load(w, "encoder.conv_in", cfg.in_channels, cfg.ch, 3, 1, 1)?,
            down,
            mid: Mid::load(w, "encoder.mid", cin, g)?,
            norm_out: Norm::load(w, "encoder.norm_out", cin, g)?,
            conv_out: Conv2d::load(w, "encoder.conv_out", cin, 2 * cfg.z_channels, 3, 1, 1)?,
        })
    }

    /// Resnet block `b` of level `l` (`encoder.down.{l}.block.{b}`).
    pub fn block(&self, l: usize, b: usize) -> Option<&ResnetBlock> {
        self.down.get(l)?.block.get(b)
    }

    /// The downsampler after level `l` (`encoder.down.{l}.downsample`).
    pub fn downsample(&self, l: usize) -> Option<&Downsample> {
        self.down.get(l)?.resample.as_ref()
    }

    /// The mid-block attention (`encoder.mid.attn_1`).
    pub fn mid_attention(&self) -> &AttnBlock {
        &self.mid.attn_1
    }

    /// # Shapes
    /// `(B, in_channels, H, W)` → `(B, 2·z_channels, H/f, W/f)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for b in &level.block {
                h = b.forward(&h)?;
            }
            if let Some(d) = &level.resample {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&silu(&self.norm_out.forward(&h)?)?)
    }
}

/// The decoder: latent `(B, z, h, w)` → image `(B, 3, 8h, 8w)`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    /// Stored low index = high resolution, as the checkpoint; processed from the last.
    up: Vec<Level<Upsample>>,
    norm_out: Norm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        let g = cfg.norm_groups;
        let levels = cfg.ch_mult.len();
        let mut cin = cfg.ch * cfg.ch_mult[levels - 1];
        let conv_in = Conv2d::load(w, "decoder.conv_in", cfg.z_channels, cin, 3, 1, 1)?;
        let mid = Mid::load(w, "decoder.mid", cin, g)?;
        let mut up = vec![];
        for l in (0..levels).rev() {
            let cout = cfg.ch * cfg.ch_mult[l];
            let mut block = vec![];
            for b in 0..=cfg.num_res_blocks {
                block.push(ResnetBlock::load(
                    w,
                    &format!("decoder.up.{l}.block.{b}"),
                    cin,
                    cout,
                    g,
                )?);
                cin = cout;
            }
            let resample = if l != 0 {
                Some(Upsample {
                    conv: Conv2d::load(
                        w,
                        &format!("decoder.up.{l}.upsample.conv"),
                        cin,
                        cin,
                        3,
                        1,
                        1,
                    )?,
                })
            } else {
                None
            };
            up.push(Level { block, resample });
        }
        up.reverse();
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out: Norm::load(w, "decoder.norm_out", cin, g)?,
            conv_out: Conv2d::load(w, "decoder.conv_out", cin, cfg.out_ch, 3, 1, 1)?,
        })
    }

    /// The upsampler of level `l` (`decoder.up.{l}.upsample`; diffusers `up_blocks.{L−1−l}`).
    pub fn upsample(&self, l: usize) -> Option<&Upsample> {
        self.up.get(l)?.resample.as_ref()
    }

    /// # Shapes
    /// `(B, z_channels, h, w)` → `(B, out_ch, f·h, f·w)`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for level in self.up.iter().rev() {
            for b in &level.block {
                h = b.forward(&h)?;
            }
            if let Some(u) = &level.resample {
                h = u.forward(&h)?;
            }
        }
        self.conv_out.forward(&silu(&self.norm_out.forward(&h)?)?)
    }
}

/// Counts NaN and infinite values; an error names the tensor when there are any.
pub(crate) fn check_finite(what: &'static str, x: &Tensor) -> Result<()> {
    let xf = x.to_dtype(DType::F32)?;
    let nan = xf
        .ne(&xf)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize;
    let inf = xf
        .abs()?
        .eq(f32::INFINITY as f64)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize;
    if nan + inf > 0 {
        return Err(Error::NonFinite { what, nan, inf });
    }
    Ok(())
}

/// The FLUX autoencoder. Images are NCHW, RGB, in [−1, 1]; latents are the *scaled* FLUX
/// latents `scale·(z − shift)` that the transformer works on.
#[derive(Debug, Clone)]
pub struct AutoEncoder {
    encoder: Encoder,
    decoder: Decoder,
    cfg: Config,
    dtype: DType,
    device: Device,
}

impl AutoEncoder {
    /// Builds the model from `w` (any layout); strict: every tensor present with its shape,
    /// none left over.
    pub fn load(cfg: &Config, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        w.check_looks_like(cfg)?;
        let encoder = Encoder::load(w, cfg)?;
        let decoder = Decoder::load(w, cfg)?;
        w.finish()?;
        let device = encoder.conv_in.weight.device().clone();
        Ok(AutoEncoder {
            encoder,
            decoder,
            cfg: cfg.clone(),
            dtype: w.dtype(),
            device,
        })
    }

    /// Loads BFL's `ae.safetensors` (memory-mapped), converting weights to `dtype`.
    pub fn from_bfl_file(
        path: impl AsRef<std::path::Path>,
        cfg: &Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let w = Weights::open(
            &[path.as_ref().to_path_buf()],
            Layout::Bfl,
            cfg,
            dtype,
            device,
        )?;
        Self::load(cfg, &w)
    }

    /// Loads a diffusers `vae/` folder (config.json + safetensors).
    pub fn from_diffusers_folder(
        dir: impl AsRef<std::path::Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (cfg, w) = Weights::open_diffusers_folder(dir.as_ref(), dtype, device)?;
        Self::load(&cfg, &w)
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The decoder.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    fn check_image(&self, image: &Tensor) -> Result<()> {
        let f = self.cfg.downsample_factor();
        let dims = image.dims();
        let ok = dims.len() == 4
            && dims[1] == self.cfg.in_channels
            && dims[2].is_multiple_of(f)
            && dims[3].is_multiple_of(f)
            && dims[2] > 0
            && dims[3] > 0;
        if !ok {
            return Err(Error::InputShape {
                name: "image",
                expected: format!(
                    "(B, {}, H, W) with H and W positive multiples of {f}",
                    self.cfg.in_channels
                ),
                got: dims.to_vec(),
            });
        }
        check_finite("image", image)
    }

    fn check_latent(&self, z: &Tensor) -> Result<()> {
        let dims = z.dims();
        if dims.len() != 4 || dims[1] != self.cfg.z_channels || dims[2] == 0 || dims[3] == 0 {
            return Err(Error::InputShape {
                name: "latent",
                expected: format!("(B, {}, h, w)", self.cfg.z_channels),
                got: dims.to_vec(),
            });
        }
        check_finite("latent", z)
    }

    /// The posterior's `(mean, logvar)`, unscaled.
    ///
    /// # Shapes
    /// `image`: `(B, 3, H, W)`, H and W multiples of 8. Returns two `(B, z, H/8, W/8)`.
    pub fn encode_moments(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_image(image)?;
        let m = self.encoder.forward(&image.to_dtype(self.dtype)?)?;
        let c = m.chunk(2, 1)?;
        Ok((c[0].clone(), c[1].clone()))
    }

    /// BFL HEAD's encode: the posterior mean, scaled: `scale·(mean − shift)`.
    ///
    /// # Shapes
    /// `image`: `(B, 3, H, W)` in [−1, 1]. Returns `(B, z, H/8, W/8)`.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let (mean, _) = self.encode_moments(image)?;
        self.scale_latent(&mean)
    }

    /// diffusers' posterior sample `mean + exp(0.5·clamp(logvar, −30, 20))·ε`, scaled, with `ε`
    /// supplied by the caller (e.g. `flux_sampler::seeded_noise`), so the draw is explicit.
    ///
    /// # Shapes
    /// `eps`: the latent's shape `(B, z, H/8, W/8)`.
    pub fn encode_sample(&self, image: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (mean, logvar) = self.encode_moments(image)?;
        if eps.dims() != mean.dims() {
            return Err(Error::InputShape {
                name: "eps",
                expected: format!("{:?} (the latent's shape)", mean.dims()),
                got: eps.dims().to_vec(),
            });
        }
        let std = (logvar.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
        let z = (mean + std.mul(&eps.to_dtype(self.dtype)?)?)?;
        self.scale_latent(&z)
    }

    fn scale_latent(&self, z: &Tensor) -> Result<Tensor> {
        Ok(((z - self.cfg.shift_factor)? * self.cfg.scale_factor)?)
    }

    /// Decodes a scaled latent: `z / scale + shift`, then the decoder. Output is the f32-range
    /// image before clamping (≈ [−1, 1]); NaN/inf in the input or output is an error.
    ///
    /// # Shapes
    /// `latent`: `(B, z, h, w)`. Returns `(B, 3, 8h, 8w)`.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        self.check_latent(latent)?;
        let z = ((latent.to_dtype(self.dtype)? / self.cfg.scale_factor)? + self.cfg.shift_factor)?;
        let out = self.decoder.forward(&z)?;
        check_finite("decoded image", &out)?;
        Ok(out)
    }
}
