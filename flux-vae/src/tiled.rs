//! Tiled decode and encode: bounded memory for large images.
//!
//! The latent is cut into overlapping tiles; each is decoded alone and the overlaps are blended
//! with linear ramps, so a 2048² decode needs the memory of one tile plus the output. Encoding
//! tiles the image the same way and blends the latent tiles. The blend hides seams but is not
//! the untiled result (the mid-block attention sees one tile at a time); the seam error on the
//! tiny test model is measured in `tests/tiled.rs`.

use candle::{DType, Tensor};

use crate::model::AutoEncoder;
use crate::{Error, Result};

/// Tile geometry, in latent pixels (×8 in image pixels for FLUX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// Tile side (default 64: 512 image pixels).
    pub tile: usize,
    /// Overlap between neighbouring tiles (default 16: 128 image pixels).
    pub overlap: usize,
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions {
            tile: 64,
            overlap: 16,
        }
    }
}

impl TileOptions {
    fn validate(&self) -> Result<()> {
        if self.tile == 0 || self.overlap >= self.tile {
            return Err(Error::InvalidOption(format!(
                "tile {} must be positive and larger than overlap {}",
                self.tile, self.overlap
            )));
        }
        Ok(())
    }
}

/// Tile start offsets covering `n` with tiles of `tile` and the given overlap.
fn starts(n: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if n <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut v: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|s| s + tile < n)
        .collect();
    v.push(n - tile);
    v.dedup();
    v
}

/// Blend weights along one axis of a tile `[start, start + len)` of an axis of length `n`:
/// linear ramps of `ramp` samples on sides that border another tile.
fn ramp(len: usize, start: usize, n: usize, ramp: usize) -> Vec<f32> {
    let r = ramp.max(1) as f32;
    (0..len)
        .map(|i| {
            let up = if start > 0 {
                ((i as f32 + 0.5) / r).min(1.0)
            } else {
                1.0
            };
            let down = if start + len < n {
                (((len - i) as f32 - 0.5) / r).min(1.0)
            } else {
                1.0
            };
            up.min(down)
        })
        .collect()
}

/// Runs `f` on overlapping tiles of `x`'s last two dims (tile geometry in input pixels) and
/// blends the outputs, whose spatial size is `scale_num/scale_den` of the input's.
fn tiled(
    x: &Tensor,
    tile: usize,
    overlap: usize,
    scale_num: usize,
    scale_den: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (ys, xs) = (starts(h, tile, overlap), starts(w, tile, overlap));
    let (oh, ow) = (h * scale_num / scale_den, w * scale_num / scale_den);
    let ramp_out = overlap * scale_num / scale_den;
    let mut acc: Vec<f32> = vec![];
    let mut wsum = vec![0f32; oh * ow];
    let mut oc = 0;
    for &y0 in &ys {
        for &x0 in &xs {
            let (th, tw) = (tile.min(h), tile.min(w));
            let part = f(&x.narrow(2, y0, th)?.narrow(3, x0, tw)?)?;
            let (_, c, ph, pw) = part.dims4()?;
            if acc.is_empty() {
                oc = c;
                acc = vec![0f32; b * c * oh * ow];
            }
            let (py0, px0) = (y0 * scale_num / scale_den, x0 * scale_num / scale_den);
            let wy = ramp(ph, py0, oh, ramp_out);
            let wx = ramp(pw, px0, ow, ramp_out);
            let v = part.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            // one (channel, row) of the tile at a time: src rows are contiguous in `v`
            for (r, src) in v.chunks_exact(pw).enumerate() {
                let (plane, i) = (r / ph, r % ph);
                let dst = (plane * oh + py0 + i) * ow + px0;
                for ((a, s), w) in acc[dst..dst + pw].iter_mut().zip(src).zip(&wx) {
                    *a += s * wy[i] * w;
                }
            }
            for (i, wyi) in wy.iter().enumerate() {
                let dst = (py0 + i) * ow + px0;
                for (ws, w) in wsum[dst..dst + pw].iter_mut().zip(&wx) {
                    *ws += wyi * w;
                }
            }
        }
    }
    for (k, a) in acc.iter_mut().enumerate() {
        *a /= wsum[k % (oh * ow)];
    }
    Ok(Tensor::from_vec(acc, (b, oc, oh, ow), x.device())?)
}

impl AutoEncoder {
    /// [`AutoEncoder::decode`] in overlapping latent tiles, blended linearly. Latents no larger
    /// than one tile are decoded directly.
    ///
    /// # Shapes
    /// `latent`: `(B, z, h, w)`. Returns `(B, 3, 8h, 8w)` in f32.
    pub fn decode_tiled(&self, latent: &Tensor, opts: TileOptions) -> Result<Tensor> {
        opts.validate()?;
        let f = self.config().downsample_factor();
        tiled(latent, opts.tile, opts.overlap, f, 1, |t| self.decode(t))
    }

    /// [`AutoEncoder::encode`] in overlapping image tiles (`8·tile` pixels), blending the
    /// latent tiles linearly. Images no larger than one tile are encoded directly.
    ///
    /// # Shapes
    /// `image`: `(B, 3, H, W)`. Returns `(B, z, H/8, W/8)` in f32.
    pub fn encode_tiled(&self, image: &Tensor, opts: TileOptions) -> Result<Tensor> {
        opts.validate()?;
        let f = self.config().downsample_factor();
        tiled(image, opts.tile * f, opts.overlap * f, 1, f, |t| {
            self.encode(t)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_pixel() {
        for n in 1..200 {
            for (tile, ov) in [(8, 2), (16, 4), (64, 16), (5, 4)] {
                let s = starts(n, tile, ov);
                let mut covered = vec![false; n];
                for &a in &s {
                    for c in covered.iter_mut().skip(a).take(tile) {
                        *c = true;
                    }
                }
                assert!(
                    covered.iter().all(|c| *c),
                    "n {n} tile {tile} overlap {ov}: {s:?}"
                );
                assert!(s
                    .windows(2)
                    .all(|w| w[1] > w[0] && w[1] - w[0] <= tile - ov));
            }
        }
    }

    #[test]
    fn ramps_are_positive_and_one_inside() {
        let r = ramp(16, 8, 40, 4);
        assert!(r.iter().all(|w| *w > 0.0 && *w <= 1.0));
        assert_eq!(r[8], 1.0);
        assert!(r[0] < r[1] && r[15] < r[14]);
        assert!(ramp(16, 0, 16, 4).iter().all(|w| *w == 1.0));
    }
}
