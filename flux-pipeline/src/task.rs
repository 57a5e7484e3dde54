//! Where each image's sampling starts. Text-to-image starts from seeded noise at the top of the
//! schedule; img2img starts from the encoded picture noised to the schedule value its strength
//! picks. The pipeline's loop (transformer steps, decode) is the same for every task; a task
//! only supplies this start.

use candle::{Device, Tensor};
use flux_dit::pack;
use flux_sampler::{
    img2img_start_index, noise_latents, seeded_noise, seeded_noise_with, NoiseOptions, Reference,
    TorchGenerator,
};
use flux_vae::{from_rgb8, AutoEncoder, Rgb8};

use crate::{Error, Result};

/// img2img: the picture to start from and how much of it to change.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    /// The picture, 8-bit RGB, exactly the requested width × height (it is not resized).
    pub image: Rgb8,
    /// How far it is noised before sampling, in (0, 1]: 1 starts from pure noise and runs every
    /// step; lower keeps more of the picture and runs fewer steps (diffusers' default is 0.6).
    pub strength: f64,
}

/// The first schedule index and the packed start latent of one image.
pub(crate) struct Start {
    pub x: Tensor,
    pub first: usize,
}

/// A request's starts, prepared once (the init image encoded once for all its images).
pub(crate) struct Starts {
    shape: Vec<usize>,
    noise: NoiseOptions,
    reference: Reference,
    device: Device,
    image: Option<Box<ImageStart>>,
}

/// img2img's part of [`Starts`].
struct ImageStart {
    /// The encoded picture `(1, 16, h, w)`, scaled and shifted.
    x0: Tensor,
    /// The schedule index sampling starts at.
    first: usize,
    /// diffusers: the first seed's generator after the posterior draw (image 0's noise is its
    /// next draw; other images' noise is their own generator's first draw).
    after_posterior: Option<TorchGenerator>,
}

/// Checks an init image against the request before anything loads.
pub(crate) fn check(
    init: &InitImage,
    width: usize,
    height: usize,
    steps: usize,
    reference: Reference,
) -> Result<()> {
    let (w, h) = (init.image.width, init.image.height);
    if (w, h) != (width, height) {
        return Err(Error::InvalidRequest(format!(
            "the init image is {w}×{h} but the request is {width}×{height}; resize the image or ask for its size"
        )));
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
    /// Noise of latent `shape` drawn as `noise` says on `device`; with `init`, the picture
    /// encoded by `vae` (diffusers: a posterior sample drawn from the first seed's generator,
    /// before its noise; BFL: the posterior mean) and the start index of its strength.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare(
        init: Option<&InitImage>,
        vae: &AutoEncoder,
        shape: &[usize],
        first_seed: u64,
        steps: usize,
        noise: NoiseOptions,
        reference: Reference,
        device: &Device,
    ) -> Result<Self> {
        let image = match init {
            None => None,
            Some(init) => {
                let first = img2img_start_index(steps, init.strength, reference)?;
                let picture = from_rgb8(&init.image, device)?;
                let (x0, after_posterior) = match reference {
                    Reference::Diffusers => {
                        let mut gen = TorchGenerator::new(first_seed);
                        let eps = seeded_noise_with(&mut gen, shape, noise, device)?;
                        (vae.encode_sample(&picture, &eps)?, Some(gen))
                    }
                    Reference::Bfl => (vae.encode(&picture)?, None),
                };
                Some(Box::new(ImageStart {
                    x0,
                    first,
                    after_posterior,
                }))
            }
        };
        Ok(Starts {
            shape: shape.to_vec(),
            noise,
            reference,
            device: device.clone(),
            image,
        })
    }

    /// The start of image `index` with `seed`; `ts` is the full schedule.
    pub(crate) fn start(&self, index: usize, seed: u64, ts: &[f32]) -> Result<Start> {
        let (shape, opts, dev) = (&self.shape, self.noise, &self.device);
        let Some(img) = &self.image else {
            return Ok(Start {
                x: pack(&seeded_noise(seed, shape, opts, dev)?)?,
                first: 0,
            });
        };
        let n = match (index, &img.after_posterior) {
            (0, Some(gen)) => seeded_noise_with(&mut gen.clone(), shape, opts, dev)?,
            _ => seeded_noise(seed, shape, opts, dev)?,
        };
        let t = ts[img.first] as f64;
        Ok(Start {
            x: pack(&noise_latents(&img.x0, &n, t, self.reference)?)?,
            first: img.first,
        })
    }
}
