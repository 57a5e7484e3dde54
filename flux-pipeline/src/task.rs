//! Where each image's sampling starts, and what happens after each step. Text-to-image starts
//! from seeded noise at the top of the schedule; img2img starts from the encoded picture noised
//! to the schedule value its strength picks; inpainting is img2img whose kept region (mask 0) is
//! put back, re-noised to the current schedule value, after every step (diffusers'
//! `FluxInpaintPipeline`); FLUX.1-Fill joins the masked picture's latent and the mask to every
//! step's input channels; Kontext joins the picture to edit as extra tokens. The pipeline's loop
//! (transformer steps, decode) is the same for every task; a task only supplies its start, its
//! after-step blend and its extra inputs.

use candle::{Device, Tensor};
use flux_dit::{img_ids, pack};
use flux_sampler::{
    img2img_start_index, noise_latents, seeded_noise, seeded_noise_with, NoiseOptions, Reference,
    StepInfo, TorchGenerator,
};
use flux_vae::{from_rgb8, AutoEncoder, Rgb8};

use crate::resize::{resize, Filter};
use crate::{Error, GenerateRequest, Result};

/// What a transformer can do, from its input channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelKind {
    /// dev, schnell, Kontext, Krea (64: the packed latent).
    Base,
    /// FLUX.1-Fill (384: latent, masked picture latent, 8×8 mask).
    Fill,
    /// FLUX.1-Canny / FLUX.1-Depth (128: latent, control picture latent).
    Control,
}

impl ModelKind {
    /// The kind of a transformer with `in_channels` inputs, if the pipeline runs it.
    pub(crate) fn of(in_channels: usize) -> Option<Self> {
        match in_channels {
            64 => Some(ModelKind::Base),
            384 => Some(ModelKind::Fill),
            128 => Some(ModelKind::Control),
            _ => None,
        }
    }
}

/// img2img: the picture to start from and how much of it to change.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    /// The picture, 8-bit RGB; resized to the requested size if it has another (PIL's
    /// LANCZOS, aspect not kept, as diffusers' image processor), with a warning.
    pub image: Rgb8,
    /// How far it is noised before sampling, in (0, 1]: 1 starts from pure noise and runs every
    /// step; lower keeps more of the picture and runs fewer steps (diffusers' default is 0.6).
    pub strength: f64,
    /// Inpainting: white (≥ 50 % grey) = repaint, black = keep; the picture's size (resized
    /// with it, in grey, as diffusers' mask processor). Binarized
    /// as diffusers does; each latent pixel takes the mask pixel at the top-left of its 8×8
    /// block (PyTorch's `nearest`).
    pub mask: Option<Rgb8>,
}

/// The first schedule index and the packed start latent of one image, and for inpainting what
/// the blend after each step needs.
pub(crate) struct Start {
    pub x: Tensor,
    pub first: usize,
    blend: Option<Blend>,
}

/// Inpainting's blend: the kept region comes back from the clean latent re-noised (with the
/// image's own noise) to where the sample now is.
struct Blend {
    x0: Tensor,
    noise: Tensor,
    mask: Tensor,
    reference: Reference,
}

impl Start {
    /// Given start latents (packed), at the top of the schedule.
    pub(crate) fn given(x: Tensor) -> Self {
        Start {
            x,
            first: 0,
            blend: None,
        }
    }

    /// After step `info` (of the sliced schedule): the kept region re-noised to `t_prev` (clean
    /// at the last step), the repainted region as sampled.
    pub(crate) fn after_step(&self, info: &StepInfo, x: Tensor) -> flux_sampler::Result<Tensor> {
        let Some(b) = &self.blend else {
            return Ok(x);
        };
        let proper = if info.index + 1 < info.num_steps {
            noise_latents(&b.x0, &b.noise, info.t_prev as f64, b.reference)?
        } else {
            b.x0.to_dtype(x.dtype())?
        };
        // mask ∈ {0, 1}: a selection, exact in every dtype
        Ok(b.mask.where_cond(&x, &proper.to_dtype(x.dtype())?)?)
    }
}

/// A request's starts, prepared once (the init image encoded once for all its images).
pub(crate) struct Starts {
    shape: Vec<usize>,
    noise: NoiseOptions,
    reference: Reference,
    device: Device,
    image: Option<Box<ImageStart>>,
    /// diffusers: the first seed's generator after the posterior draw of the init or control
    /// picture (image 0's noise is its next draw; other images' noise is their own generator's
    /// first draw).
    after_posterior: Option<TorchGenerator>,
    /// Kontext: the packed latent of the picture to edit and its ids `(1, r, c)`.
    edit: Option<(Tensor, Tensor)>,
    /// Joined to every step's input channels: FLUX.1-Fill's masked picture latent and packed
    /// 8×8 mask `(1, L, 320)`, or FLUX.1-Canny/Depth's control picture latent `(1, L, 64)`.
    channels: Option<Tensor>,
}

/// img2img's part of [`Starts`].
struct ImageStart {
    /// The encoded picture `(1, 16, h, w)`, scaled and shifted.
    x0: Tensor,
    /// The schedule index sampling starts at.
    first: usize,
    /// Inpainting: the packed picture latent and the packed mask (u8, 1 = repaint).
    inpaint: Option<(Tensor, Tensor)>,
}

/// Checks an init image against the request before anything loads.
pub(crate) fn check(init: &InitImage, steps: usize, reference: Reference) -> Result<()> {
    let (w, h) = (init.image.width, init.image.height);
    if w == 0 || h == 0 || init.image.data.len() != w * h * 3 {
        return Err(Error::InvalidRequest(
            "the init image's pixels do not match its size".into(),
        ));
    }
    if let Some(m) = &init.mask {
        if (m.width, m.height) != (w, h) {
            return Err(Error::InvalidRequest(format!(
                "the mask is {}×{} but the image is {w}×{h}",
                m.width, m.height
            )));
        }
        if m.data.len() != w * h * 3 {
            return Err(Error::InvalidRequest(
                "the mask's pixels do not match its size".into(),
            ));
        }
    }
    if !(init.strength > 0.0 && init.strength <= 1.0) {
        return Err(Error::InvalidRequest(format!(
            "strength must be in (0, 1], got {}",
            init.strength
        )));
    }
    // a strength in (0, 1] always leaves at least one step in both references
    img2img_start_index(steps, init.strength, reference)?;
    Ok(())
}

impl Starts {
    /// Noise of latent `shape` drawn as `noise` says on `device`; with the request's init image,
    /// that picture encoded by `vae` (diffusers: a posterior sample drawn from the first seed's
    /// generator, before its noise; BFL: the posterior mean) and its strength's start index;
    /// with its picture to edit (Kontext), that picture's tokens.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare(
        req: &GenerateRequest,
        model: ModelKind,
        vae: &AutoEncoder,
        shape: &[usize],
        first_seed: u64,
        steps: usize,
        noise: NoiseOptions,
        reference: Reference,
        device: &Device,
    ) -> Result<Self> {
        // diffusers encodes the init or control picture with a posterior sample drawn from the
        // first seed's generator, before its noise; BFL takes the posterior mean
        let mut after_posterior = None;
        let mut encode = |picture: &Rgb8| -> Result<Tensor> {
            let picture = from_rgb8(picture, device)?;
            Ok(match reference {
                Reference::Diffusers => {
                    let mut gen = TorchGenerator::new(first_seed);
                    let eps = seeded_noise_with(&mut gen, shape, noise, device)?;
                    after_posterior = Some(gen);
                    vae.encode_sample(&picture, &eps)?
                }
                Reference::Bfl => vae.encode(&picture)?,
            })
        };
        let image = match &req.image {
            None => None,
            Some(init) => {
                let first = img2img_start_index(steps, init.strength, reference)?;
                let x0 = encode(&init.image)?;
                // base-model inpainting blends after each step; Fill's model regenerates all
                let inpaint = match &init.mask {
                    Some(m) if model != ModelKind::Fill => {
                        Some((pack(&x0)?, latent_mask(m, shape, device)?))
                    }
                    _ => None,
                };
                Some(Box::new(ImageStart { x0, first, inpaint }))
            }
        };
        let channels = match (model, &req.image, &req.control_image) {
            (ModelKind::Fill, Some(init), _) => Some(fill_condition(
                init, vae, shape, first_seed, noise, reference, device,
            )?),
            // FLUX.1-Canny/Depth: the control picture's latent (diffusers'
            // FluxControlPipeline: sampled before the noise; BFL: the mean)
            (ModelKind::Control, _, Some(c)) => Some(pack(&encode(c)?)?),
            _ => None,
        };
        // Kontext: the picture to edit as extra image tokens (posterior mean, as diffusers'
        // argmax and BFL), ids (1, r, c) on its own grid
        let edit = match &req.edit_image {
            Some(e) => {
                let z = vae.encode(&from_rgb8(e, device)?)?;
                let ids = img_ids(1, z.dim(2)?, z.dim(3)?, 1.0, device)?;
                Some((pack(&z)?, ids))
            }
            None => None,
        };
        Ok(Starts {
            shape: shape.to_vec(),
            noise,
            reference,
            device: device.clone(),
            image,
            after_posterior,
            edit,
            channels,
        })
    }

    /// The transformer's image tokens for latent `x`: `x`, or (Kontext) `x` and then the
    /// picture's tokens; the prediction for the first `x.dim(1)` tokens is the one to use.
    pub(crate) fn tokens(&self, x: &Tensor) -> Result<Tensor> {
        // the conditions are one picture's: the same for every image of a batch
        let rows = x.dim(0)?;
        let each = |c: &Tensor| c.to_dtype(x.dtype())?.repeat((rows, 1, 1));
        let x = match &self.channels {
            None => x.clone(),
            Some(c) => Tensor::cat(&[x, &each(c)?], 2)?,
        };
        Ok(match &self.edit {
            None => x,
            Some((c, _)) => Tensor::cat(&[&x, &each(c)?], 1)?,
        })
    }

    /// The ids of [`Starts::tokens`] for the generated image's `ids` (computed once).
    pub(crate) fn token_ids(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match &self.edit {
            None => ids.clone(),
            Some((_, c_ids)) => Tensor::cat(&[ids, c_ids], 1)?,
        })
    }

    /// The start of image `index` with `seed`; `ts` is the full schedule.
    pub(crate) fn start(&self, index: usize, seed: u64, ts: &[f32]) -> Result<Start> {
        let (shape, opts, dev) = (&self.shape, self.noise, &self.device);
        let n = match (index, &self.after_posterior) {
            (0, Some(gen)) => seeded_noise_with(&mut gen.clone(), shape, opts, dev)?,
            _ => seeded_noise(seed, shape, opts, dev)?,
        };
        let Some(img) = &self.image else {
            return Ok(Start {
                x: pack(&n)?,
                first: 0,
                blend: None,
            });
        };
        let t = ts[img.first] as f64;
        let blend = match &img.inpaint {
            Some((x0, mask)) => Some(Blend {
                x0: x0.clone(),
                noise: pack(&n)?,
                mask: mask.clone(),
                reference: self.reference,
            }),
            None => None,
        };
        Ok(Start {
            x: pack(&noise_latents(&img.x0, &n, t, self.reference)?)?,
            first: img.first,
            blend,
        })
    }
}

/// The request with its pictures resized to its size where they have another (PIL's LANCZOS,
/// aspect not kept: diffusers' image and mask processors, BFL's control picture), and a
/// warning for each; `None` when every picture already fits. Kontext's picture keeps its size.
pub(crate) fn fit_pictures(
    req: &GenerateRequest,
    warnings: &mut Vec<String>,
) -> Result<Option<GenerateRequest>> {
    let (w, h) = (req.width, req.height);
    let wrong = |p: &Rgb8| (p.width, p.height) != (w, h);
    let needs = req.image.as_ref().is_some_and(|i| wrong(&i.image))
        || req.control_image.as_ref().is_some_and(wrong);
    if !needs {
        return Ok(None);
    }
    let mut out = req.clone();
    let mut fit = |what: &str, p: &Rgb8| -> Result<Rgb8> {
        if !wrong(p) {
            return Ok(p.clone());
        }
        warnings.push(format!(
            "the {what} is {}×{}; resized to {w}×{h} (LANCZOS, aspect not kept)",
            p.width, p.height
        ));
        resize(p, w, h, Filter::Lanczos)
    };
    if let Some(init) = out.image.as_mut() {
        init.image = fit("init image", &init.image)?;
        if let Some(m) = init.mask.as_mut() {
            // diffusers' mask processor: grey first, then the resize
            let grey = Rgb8 {
                width: m.width,
                height: m.height,
                data: m
                    .data
                    .chunks_exact(3)
                    .flat_map(|px| [luma(px); 3])
                    .collect(),
            };
            *m = if wrong(&grey) {
                resize(&grey, w, h, Filter::Lanczos)?
            } else {
                grey
            };
        }
    }
    if let Some(c) = out.control_image.as_mut() {
        *c = fit("control picture", c)?;
    }
    Ok(Some(out))
}

/// PIL's `convert("L")` of one RGB pixel (ITU-R 601, rounded).
fn luma(px: &[u8]) -> u8 {
    ((px[0] as u32 * 19595 + px[1] as u32 * 38470 + px[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// The packed latent mask `(1, L, 64)` (u8, 1 = repaint) of a pixel mask for latent `shape`
/// `(1, 16, h, w)`: grey as PIL's `convert("L")` (ITU-R 601, rounded), binarized at 0.5 as
/// diffusers' mask processor does, then PyTorch's `nearest` downscale (the top-left pixel of
/// each 8×8 block), repeated over the 16 channels.
fn latent_mask(mask: &Rgb8, shape: &[usize], device: &Device) -> Result<Tensor> {
    let (c, h, w) = (shape[1], shape[2], shape[3]);
    let scale = mask.width / w;
    let m = pixel_mask(mask);
    let mut v = vec![0u8; c * h * w];
    for r in 0..h {
        for col in 0..w {
            let on = m[(r * scale) * mask.width + col * scale] as u8;
            for ch in 0..c {
                v[(ch * h + r) * w + col] = on;
            }
        }
    }
    Ok(pack(&Tensor::from_vec(v, (1, c, h, w), device)?)?)
}

/// The binarized pixel mask (1 = repaint), one value per pixel: grey as PIL's
/// `convert("L")` (ITU-R 601, rounded), then ≥ 0.5 as diffusers' mask processor.
fn pixel_mask(mask: &Rgb8) -> Vec<f32> {
    mask.data
        .chunks_exact(3)
        .map(|px| (luma(px) as f32 / 255.0 >= 0.5) as u8 as f32)
        .collect()
}

/// FLUX.1-Fill's condition `(1, L, 320)` (diffusers' `FluxFillPipeline.prepare_mask_latents`;
/// BFL's `prepare_fill` with the mask's grey levels kept instead of binarized): the picture
/// with the repainted region blacked out (`image·(1 − mask)`), encoded (diffusers:
/// a posterior sample drawn from the first seed's generator after the image's posterior and
/// the noise; BFL: the mean) and packed, then the pixel mask with each latent pixel's 8×8
/// block as 64 channels, packed 2×2 (channel `(py·8 + px)·4 + qy·2 + qx` of token `(r, c)` is
/// pixel `(16r + 8qy + py, 16c + 8qx + px)`).
fn fill_condition(
    init: &InitImage,
    vae: &AutoEncoder,
    shape: &[usize],
    first_seed: u64,
    noise: NoiseOptions,
    reference: Reference,
    device: &Device,
) -> Result<Tensor> {
    let mask = init
        .mask
        .as_ref()
        .ok_or_else(|| Error::InvalidRequest("FLUX.1-Fill needs a mask".into()))?;
    let (w, h) = (init.image.width, init.image.height);
    // BFL's prepare_fill keeps the grey levels; diffusers binarizes
    let m = match reference {
        Reference::Bfl => mask
            .data
            .chunks_exact(3)
            .map(|px| luma(px) as f32 / 255.0)
            .collect(),
        Reference::Diffusers => pixel_mask(mask),
    };
    let keep = Tensor::from_vec(
        m.iter().map(|v| 1.0 - v).collect::<Vec<f32>>(),
        (1, 1, h, w),
        device,
    )?;
    let masked = from_rgb8(&init.image, device)?.broadcast_mul(&keep)?;
    let z = match reference {
        Reference::Diffusers => {
            // the generator's draws: image posterior, noise, then this posterior
            let mut gen = TorchGenerator::new(first_seed);
            seeded_noise_with(&mut gen, shape, noise, device)?;
            seeded_noise_with(&mut gen, shape, noise, device)?;
            let eps = seeded_noise_with(&mut gen, shape, noise, device)?;
            vae.encode_sample(&masked, &eps)?
        }
        Reference::Bfl => vae.encode(&masked)?,
    };
    let latent = pack(&z)?;
    let (gh, gw) = (h / 16, w / 16);
    let mut v = vec![0f32; gh * gw * 256];
    for r in 0..gh {
        for c in 0..gw {
            let token = &mut v[(r * gw + c) * 256..(r * gw + c + 1) * 256];
            for py in 0..8 {
                for px in 0..8 {
                    for qy in 0..2 {
                        for qx in 0..2 {
                            let (y, x) = (16 * r + 8 * qy + py, 16 * c + 8 * qx + px);
                            token[(py * 8 + px) * 4 + qy * 2 + qx] = m[y * w + x];
                        }
                    }
                }
            }
        }
    }
    let mask_tokens = Tensor::from_vec(v, (1, gh * gw, 256), device)?.to_dtype(latent.dtype())?;
    Ok(Tensor::cat(&[&latent, &mask_tokens], 2)?)
}

/// Outpainting's inputs (BFL's `add_border_and_mask`): `image` pasted onto a black canvas grown
/// by `[left, top, right, bottom]` pixels, and the mask that repaints exactly the border (white
/// outside the picture, black on it). Used with FLUX.1-Fill (or base-model inpainting).
pub fn outpaint(image: &Rgb8, border: [usize; 4]) -> Result<(Rgb8, Rgb8)> {
    let [l, t, r, b] = border;
    let (w, h) = (image.width + l + r, image.height + t + b);
    if w % 16 != 0 || h % 16 != 0 || w > 8192 || h > 8192 {
        return Err(Error::InvalidRequest(format!(
            "outpainting to {w}×{h}: the sides must be multiples of 16 up to 8192 (adjust the border)"
        )));
    }
    if image.data.len() != image.width * image.height * 3 {
        return Err(Error::InvalidRequest(
            "the picture's pixels do not match its size".into(),
        ));
    }
    let mut canvas = vec![0u8; w * h * 3];
    let mut mask = vec![255u8; w * h * 3];
    for y in 0..image.height {
        let src = &image.data[y * image.width * 3..(y + 1) * image.width * 3];
        let at = ((y + t) * w + l) * 3;
        canvas[at..at + src.len()].copy_from_slice(src);
        mask[at..at + src.len()].fill(0);
    }
    let rgb = |data| Rgb8 {
        width: w,
        height: h,
        data,
    };
    Ok((rgb(canvas), rgb(mask)))
}

/// BFL's preferred Kontext resolutions `(width, height)` (`PREFERED_KONTEXT_RESOLUTIONS`; the
/// same list in diffusers' `FluxKontextPipeline`).
pub const KONTEXT_RESOLUTIONS: [(usize, usize); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// The Kontext resolution a picture of `width × height` is resized to: the listed one whose
/// aspect ratio is closest (ties: the smaller width, then height). BFL takes the ratio of the
/// picture's own size; diffusers that of its size floored to multiples of 16 (so pictures near
/// a boundary can differ, e.g. 444×1000: BFL 688×1504, diffusers 672×1568).
pub fn kontext_size(width: usize, height: usize, reference: Reference) -> (usize, usize) {
    let (w, h) = match reference {
        Reference::Bfl => (width, height),
        Reference::Diffusers => (width - width % 16, height - height % 16),
    };
    let ar = w as f64 / h.max(1) as f64;
    let mut best = KONTEXT_RESOLUTIONS[0];
    let mut best_d = f64::INFINITY;
    for &(bw, bh) in &KONTEXT_RESOLUTIONS {
        let d = (ar - bw as f64 / bh as f64).abs();
        // the list is sorted by width, so the first of equal distances is the tuple minimum
        if d < best_d {
            (best, best_d) = ((bw, bh), d);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kontext_sizes_follow_both_references() {
        for ((w, h), want) in [
            ((1024, 768), (1184, 880)),
            ((1920, 1080), (1392, 752)),
            ((512, 512), (1024, 1024)),
            ((2000, 1000), (1456, 720)),
            ((96, 64), (1248, 832)),
        ] {
            assert_eq!(kontext_size(w, h, Reference::Bfl), want, "{w}×{h}");
            assert_eq!(kontext_size(w, h, Reference::Diffusers), want, "{w}×{h}");
        }
        // near a boundary the two rules differ (ratio of the raw vs the 16-floored size)
        assert_eq!(kontext_size(444, 1000, Reference::Bfl), (688, 1504));
        assert_eq!(kontext_size(444, 1000, Reference::Diffusers), (672, 1568));
    }
}
