//! FLUX.1-Redux: a picture as extra text tokens. The picture is prepared as SigLIP's image
//! processor does (PIL BICUBIC resize to the model's side, aspect not kept; `x/255`, then
//! `(x − 0.5)/0.5`), encoded by SigLIP's vision tower, and mapped to T5's width by BFL's Redux
//! embedder; several pictures' tokens are summed (diffusers' `FluxPriorReduxPipeline`).

use std::path::Path;

use candle::{DType, Device, Tensor};
use flux_text::{ReduxEmbedder, SiglipVisionModel};
use flux_vae::Rgb8;

use crate::resize::{resize, Filter};
use crate::{Error, Result};

/// SigLIP's vision model and the Redux embedder.
#[derive(Debug, Clone)]
pub struct Redux {
    siglip: SiglipVisionModel,
    embedder: ReduxEmbedder,
}

impl Redux {
    /// Loads SigLIP from a transformers folder (e.g. `google/siglip-so400m-patch14-384`) and
    /// the embedder from `flux1-redux-dev.safetensors`; their widths must agree.
    pub fn load(
        siglip_dir: &Path,
        redux_file: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let siglip = SiglipVisionModel::from_dir(siglip_dir, dtype, device)?;
        let embedder = ReduxEmbedder::from_file(redux_file, dtype, device)?;
        let (width, _) = embedder.dims();
        if width != siglip.config().hidden_size {
            return Err(Error::InvalidRequest(format!(
                "the Redux embedder takes {width}-wide SigLIP states but this SigLIP is {} wide",
                siglip.config().hidden_size
            )));
        }
        Ok(Redux { siglip, embedder })
    }

    /// The width of the tokens (the T5 width the transformer takes).
    pub fn token_width(&self) -> usize {
        self.embedder.dims().1
    }

    /// SigLIP's input for `image`: `(1, 3, S, S)` f32.
    pub fn pixels(&self, image: &Rgb8, device: &Device) -> Result<Tensor> {
        let s = self.siglip.config().image_size;
        let img = resize(image, s, s, Filter::Bicubic)?;
        let mut v = vec![0f32; 3 * s * s];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                // transformers: rescale in f64, cast to f32, then normalise in f32
                let x = (px[c] as f64 * (1.0 / 255.0)) as f32;
                v[c * s * s + i] = (x - 0.5) / 0.5;
            }
        }
        Ok(Tensor::from_vec(v, (1, 3, s, s), device)?)
    }

    /// The Redux tokens `(1, L, T5 width)` of `images` (summed over the pictures), for
    /// [`crate::GenerateRequest::redux`].
    pub fn encode(&self, images: &[Rgb8], device: &Device) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for img in images {
            let hidden = self.siglip.forward(&self.pixels(img, device)?)?;
            let t = self.embedder.forward(&hidden)?;
            sum = Some(match sum {
                None => t,
                Some(s) => (s + t)?,
            });
        }
        sum.ok_or_else(|| Error::InvalidRequest("Redux needs at least one picture".into()))
    }

    /// The vision model (for checks).
    pub fn siglip(&self) -> &SiglipVisionModel {
        &self.siglip
    }

    /// The embedder (for checks).
    pub fn embedder(&self) -> &ReduxEmbedder {
        &self.embedder
    }
}
