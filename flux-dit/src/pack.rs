//! Latent packing (2×2 patches into tokens) and the position ids of image and text tokens.

use candle::{DType, Device, Tensor};

use crate::{Error, Result};

/// Packs an unpacked latent into tokens: `packed[b, r·(w/2)+c, ch·4 + ph·2 + pw] =
/// z[b, ch, 2r+ph, 2c+pw]` (einops `b c (h ph) (w pw) -> b (h w) (c ph pw)`).
///
/// # Shapes
/// `z`: `(B, C, h, w)` with even `h`, `w`. Returns `(B, (h/2)·(w/2), 4·C)`.
pub fn pack(z: &Tensor) -> Result<Tensor> {
    if z.rank() != 4 {
        return Err(Error::InputShape {
            name: "latent to pack",
            expected: "(B, C, h, w)".into(),
            got: z.dims().to_vec(),
        });
    }
    let (b, c, h, w) = z.dims4()?;
    if h % 2 != 0 || w % 2 != 0 || h == 0 || w == 0 {
        return Err(Error::InputShape {
            name: "latent to pack",
            expected: "(B, C, h, w) with h and w even and positive".into(),
            got: z.dims().to_vec(),
        });
    }
    Ok(z.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// Inverse of [`pack`] for a latent of `h × w` (latent pixels, i.e. image size / 8).
///
/// # Shapes
/// `x`: `(B, (h/2)·(w/2), 4·C)`. Returns `(B, C, h, w)`.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let bad = |x: &Tensor| Error::InputShape {
        name: "tokens to unpack",
        expected: format!("(B, {}, 4·C) for a {h}×{w} latent", (h / 2) * (w / 2)),
        got: x.dims().to_vec(),
    };
    if x.rank() != 3 || !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        return Err(bad(x));
    }
    let (b, l, cc) = x.dims3()?;
    if l != (h / 2) * (w / 2) || cc % 4 != 0 {
        return Err(bad(x));
    }
    let c = cc / 4;
    Ok(x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))?)
}

/// Image position ids `(0, r, c)` for an `h × w` latent (patch grid `(h/2) × (w/2)`), row-major,
/// in f32 as BFL builds them. `axis0` is 0 for the generated image (Kontext conditioning uses 1).
///
/// # Shapes
/// Returns `(B, (h/2)·(w/2), 3)`.
pub fn img_ids(batch: usize, h: usize, w: usize, axis0: f32, device: &Device) -> Result<Tensor> {
    let (gh, gw) = (h / 2, w / 2);
    let mut v = Vec::with_capacity(gh * gw * 3);
    for r in 0..gh {
        for c in 0..gw {
            v.extend_from_slice(&[axis0, r as f32, c as f32]);
        }
    }
    Ok(Tensor::from_vec(v, (1, gh * gw, 3), device)?.repeat((batch, 1, 1))?)
}

/// Text position ids: all zeros.
///
/// # Shapes
/// Returns `(B, L_txt, 3)`.
pub fn txt_ids(batch: usize, len: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((batch, len, 3), DType::F32, device)?)
}
