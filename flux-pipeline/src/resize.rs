//! Picture resizing as PIL's `Image.resize` does it for 8-bit RGB, the resize that diffusers'
//! image processor (LANCZOS), BFL's tools (LANCZOS) and SigLIP's processor (BICUBIC) apply:
//! a separable convolution, the horizontal pass first, each pass in 22-bit fixed point and
//! rounded back to bytes; the kernel is widened by the scale when shrinking.

use flux_vae::Rgb8;

use crate::{Error, Result};

/// The resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Lanczos, 3 lobes (PIL's `LANCZOS`).
    Lanczos,
    /// Cubic convolution with a = −0.5 (PIL's `BICUBIC`).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output position: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C's (int) casts: truncation toward zero
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let ss = 1.0 / filterscale;
            let w: Vec<f64> = (lo..hi)
                .map(|i| filter.weight((i as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    (if f < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

fn to_byte(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `image` resized to `width × height` (aspect not kept) with `filter`, as PIL's
/// `image.resize((width, height), filter)`; the same size returns a copy.
pub fn resize(image: &Rgb8, width: usize, height: usize, filter: Filter) -> Result<Rgb8> {
    let (w, h) = (image.width, image.height);
    if w == 0 || h == 0 || image.data.len() != w * h * 3 {
        return Err(Error::InvalidRequest(format!(
            "the picture to resize is {w}×{h} with {} bytes",
            image.data.len()
        )));
    }
    if width == 0 || height == 0 || width > 16384 || height > 16384 {
        return Err(Error::InvalidRequest(format!(
            "cannot resize a picture to {width}×{height}"
        )));
    }
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut data = image.data.clone();
    let mut cur_w = w;
    if width != w {
        let cs = coefficients(w, width, filter);
        let mut out = vec![0u8; width * h * 3];
        for y in 0..h {
            let row = &data[y * w * 3..(y + 1) * w * 3];
            for (x, (lo, k)) in cs.iter().enumerate() {
                for c in 0..3 {
                    let acc = k.iter().enumerate().fold(half, |a, (i, &kv)| {
                        a + row[(lo + i) * 3 + c] as i64 * kv as i64
                    });
                    out[(y * width + x) * 3 + c] = to_byte(acc);
                }
            }
        }
        data = out;
        cur_w = width;
    }
    if height != h {
        let cs = coefficients(h, height, filter);
        let mut out = vec![0u8; cur_w * height * 3];
        for (y, (lo, k)) in cs.iter().enumerate() {
            for x in 0..cur_w * 3 {
                let acc = k.iter().enumerate().fold(half, |a, (i, &kv)| {
                    a + data[(lo + i) * cur_w * 3 + x] as i64 * kv as i64
                });
                out[y * cur_w * 3 + x] = to_byte(acc);
            }
        }
        data = out;
    }
    Ok(Rgb8 {
        width,
        height,
        data,
    })
}
