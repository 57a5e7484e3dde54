//! Low-cost previews of a sampling step: the packed latent mapped to RGB by a fixed linear map,
//! one pixel per latent cell (an eighth of the image's side), without running the VAE.

use candle::{DType, Tensor};
use flux_vae::Rgb8;

use crate::Result;

/// Latent channel → RGB weights of FLUX.1's VAE (16 × 3), with a bias per colour: the linear
/// fit ComfyUI uses for its latent previews of FLUX (`latent_formats.Flux`), applied to the
/// sampler's normalised latents. Each colour is then mapped from [-1, 1] to bytes.
const FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// The preview of one image's packed latent `(1, (h/2)·(w/2), 64)` for a `height × width`
/// picture: an RGB image of `(height/8) × (width/8)` pixels.
pub fn latent_preview(latent: &Tensor, height: usize, width: usize) -> Result<Rgb8> {
    let (h, w) = (height / 8, width / 8);
    let z = flux_dit::unpack(latent, h, w)?; // (1, 16, h, w)
    let c = z.dim(1)?;
    if z.dim(0)? != 1 || c != FACTORS.len() {
        return Err(crate::Error::InvalidRequest(format!(
            "a preview needs one 16-channel latent; got {:?}",
            z.dims()
        )));
    }
    let v = z.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    let mut data = Vec::with_capacity(plane * 3);
    for p in 0..plane {
        for (k, bias) in BIAS.iter().enumerate() {
            let x = (0..c).fold(*bias, |acc, ch| acc + v[ch * plane + p] * FACTORS[ch][k]);
            data.push((((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    Ok(Rgb8 {
        width: w,
        height: h,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn preview_maps_each_latent_cell() -> Result<()> {
        let (h, w) = (4, 6);
        // channel c of cell (y, x) holds (c + 1)·0.1 + y − x/4
        let mut v = vec![0f32; 16 * h * w];
        for c in 0..16 {
            for y in 0..h {
                for x in 0..w {
                    v[(c * h + y) * w + x] = (c as f32 + 1.0) * 0.1 + y as f32 - x as f32 / 4.0;
                }
            }
        }
        let z = Tensor::from_vec(v.clone(), (1, 16, h, w), &Device::Cpu)?;
        let img = latent_preview(&flux_dit::pack(&z)?, h * 8, w * 8)?;
        assert_eq!((img.width, img.height, img.data.len()), (w, h, w * h * 3));
        for (y, x) in [(0, 0), (1, 5), (3, 2)] {
            for k in 0..3 {
                let s = (0..16)
                    .map(|c| v[(c * h + y) * w + x] * FACTORS[c][k])
                    .sum::<f32>();
                let want = (((s + BIAS[k] + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
                assert_eq!(
                    img.data[(y * w + x) * 3 + k],
                    want,
                    "cell ({y}, {x}) colour {k}"
                );
            }
        }
        // a latent of the wrong size is an error, not a panic
        assert!(latent_preview(&flux_dit::pack(&z)?, h * 8, w * 16).is_err());
        Ok(())
    }
}
