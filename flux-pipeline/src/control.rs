//! Control pictures for FLUX.1-Canny and FLUX.1-Depth: the Canny edge detector that BFL's
//! `flux control` runs on the user's picture (OpenCV's `cv2.Canny` with thresholds 50 and 200:
//! 3×3 Sobel with replicated borders, L1 magnitude, the strongest channel per pixel, sector
//! non-maximum suppression, 8-connected hysteresis), and the round trip through [−1, 1] that
//! BFL's encoder puts the picture through first. Depth maps are the user's own picture.

use flux_vae::Rgb8;

use crate::{Error, Result};

/// BFL's Canny thresholds (`CannyImageEncoder(min_t=50, max_t=200)`).
pub const CANNY_LOW: f64 = 50.0;
/// See [`CANNY_LOW`].
pub const CANNY_HIGH: f64 = 200.0;

/// BFL's Canny control picture: `image` to [−1, 1] in f32 and back to bytes by truncation (so
/// some values drop by one, as in BFL), then [`canny`] at 50/200, as a 3-channel 0/255 picture.
pub fn canny_control(image: &Rgb8) -> Result<Rgb8> {
    let bytes = image
        .data
        .iter()
        .map(|&u| {
            let x = (u as f32 / 127.5 - 1.0).clamp(-1.0, 1.0);
            ((x + 1.0) * 127.5) as u8
        })
        .collect();
    let edges = canny(
        &Rgb8 {
            width: image.width,
            height: image.height,
            data: bytes,
        },
        CANNY_LOW,
        CANNY_HIGH,
    )?;
    Ok(Rgb8 {
        width: image.width,
        height: image.height,
        data: edges.iter().flat_map(|&e| [e; 3]).collect(),
    })
}

/// Canny edges of an RGB picture as OpenCV's `cv2.Canny(image, low, high)` (aperture 3, L1
/// gradient) computes them on a 3-channel image: one byte per pixel, 255 on an edge, else 0.
pub fn canny(image: &Rgb8, low: f64, high: f64) -> Result<Vec<u8>> {
    let (w, h) = (image.width, image.height);
    if w == 0 || h == 0 || image.data.len() != w * h * 3 {
        return Err(Error::InvalidRequest(format!(
            "the picture for edge detection is {w}×{h} with {} bytes",
            image.data.len()
        )));
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i64, high.floor() as i64);
    // gradient of the strongest channel per pixel (the first on ties), replicated borders
    let px = |y: usize, x: usize, c: usize| image.data[(y * w + x) * 3 + c] as i32;
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    // magnitude with a zero frame: (h + 2) × (w + 2)
    let fw = w + 2;
    let mut mag = vec![0i64; fw * (h + 2)];
    for y in 0..h {
        let (ya, yb) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (xa, xb) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let mut best = (-1i64, 0, 0);
            for c in 0..3 {
                let gx = (px(ya, xb, c) + 2 * px(y, xb, c) + px(yb, xb, c))
                    - (px(ya, xa, c) + 2 * px(y, xa, c) + px(yb, xa, c));
                let gy = (px(yb, xa, c) + 2 * px(yb, x, c) + px(yb, xb, c))
                    - (px(ya, xa, c) + 2 * px(ya, x, c) + px(ya, xb, c));
                let m = (gx.abs() + gy.abs()) as i64;
                if m > best.0 {
                    best = (m, gx, gy);
                }
            }
            mag[(y + 1) * fw + x + 1] = best.0;
            dx[y * w + x] = best.1;
            dy[y * w + x] = best.2;
        }
    }
    // non-maximum suppression along the gradient's sector (tan 22.5° in 15-bit fixed point);
    // state: 0 = may be an edge, 1 = not an edge, 2 = an edge; the frame is "not an edge"
    const SHIFT: u32 = 15;
    let tg22 = (0.414_213_562_373_095_f64 * (1u32 << SHIFT) as f64 + 0.5) as i64;
    let mut state = vec![1u8; fw * (h + 2)];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let at = (y + 1) * fw + x + 1;
            let m = mag[at];
            if m <= low {
                continue;
            }
            let (gx, gy) = (dx[y * w + x] as i64, dy[y * w + x] as i64);
            let ax = gx.abs();
            let ay = gy.abs() << SHIFT;
            let tg22x = ax * tg22;
            let (up, down) = (at - fw, at + fw);
            let is_max = if ay < tg22x {
                m > mag[at - 1] && m >= mag[at + 1]
            } else if ay > tg22x + (ax << (SHIFT + 1)) {
                m > mag[up] && m >= mag[down]
            } else if (gx < 0) != (gy < 0) {
                m > mag[up + 1] && m > mag[down - 1]
            } else {
                m > mag[up - 1] && m > mag[down + 1]
            };
            if !is_max {
                continue;
            }
            if m > high {
                state[at] = 2;
                stack.push(at);
            } else {
                state[at] = 0;
            }
        }
    }
    // hysteresis: every possible edge 8-connected to an edge becomes one
    while let Some(at) = stack.pop() {
        for n in [
            at - fw - 1,
            at - fw,
            at - fw + 1,
            at - 1,
            at + 1,
            at + fw - 1,
            at + fw,
            at + fw + 1,
        ] {
            if state[n] == 0 {
                state[n] = 2;
                stack.push(n);
            }
        }
    }
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        for x in 0..w {
            out.push(if state[(y + 1) * fw + x + 1] == 2 {
                255
            } else {
                0
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_pictures_have_no_edges_and_a_step_has_one() {
        let flat = Rgb8 {
            width: 8,
            height: 6,
            data: vec![90; 8 * 6 * 3],
        };
        assert!(canny(&flat, 50.0, 200.0).unwrap().iter().all(|&e| e == 0));
        // a vertical step from 0 to 255 between columns 3 and 4
        let data = (0..6 * 8)
            .flat_map(|i| [if i % 8 >= 4 { 255 } else { 0 }; 3])
            .collect();
        let step = Rgb8 {
            width: 8,
            height: 6,
            data,
        };
        let e = canny(&step, 50.0, 200.0).unwrap();
        for row in e.chunks(8) {
            assert_eq!(row, &[0, 0, 0, 255, 0, 0, 0, 0]);
        }
        assert!(canny(
            &Rgb8 {
                width: 8,
                height: 6,
                data: vec![]
            },
            50.0,
            200.0
        )
        .is_err());
    }
}
