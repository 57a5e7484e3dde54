//! Conversions between [−1, 1] image tensors and 8-bit RGB pixels.

use candle::{DType, Device, Tensor};

use crate::{Error, Result};

/// How [−1, 1] values become bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ByteRounding {
    /// diffusers: `round(255·clamp(x/2 + 0.5, 0, 1))`, ties to even (numpy's `round`).
    #[default]
    Round,
    /// BFL: `trunc(127.5·(clamp(x, −1, 1) + 1))` (`.byte()` truncates toward zero).
    Truncate,
}

/// An 8-bit RGB image, rows top to bottom, `RGBRGB…` (the layout PNG encoders take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

/// Converts `(B, 3, H, W)` images in [−1, 1] to one [`Rgb8`] per batch item. Values outside
/// [−1, 1] are clamped; NaN or inf is an error (never a silently black image).
pub fn to_rgb8(images: &Tensor, rounding: ByteRounding) -> Result<Vec<Rgb8>> {
    let dims = images.dims();
    if dims.len() != 4 || dims[1] != 3 {
        return Err(Error::InputShape {
            name: "image to convert",
            expected: "(B, 3, H, W)".into(),
            got: dims.to_vec(),
        });
    }
    crate::model::check_finite("image to convert", images)?;
    let (b, _, h, w) = images.dims4()?;
    let hwc = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let values = hwc.flatten_all()?.to_vec1::<f32>()?;
    let to_byte = |x: f32| -> u8 {
        match rounding {
            ByteRounding::Round => {
                ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
            }
            ByteRounding::Truncate => (127.5 * (x.clamp(-1.0, 1.0) + 1.0)) as u8,
        }
    };
    Ok(values
        .chunks_exact(h * w * 3)
        .take(b)
        .map(|px| Rgb8 {
            width: w,
            height: h,
            data: px.iter().map(|&x| to_byte(x)).collect(),
        })
        .collect())
}

/// Converts 8-bit RGB pixels to a `(1, 3, H, W)` f32 tensor in [−1, 1] (`x/127.5 − 1`).
pub fn from_rgb8(image: &Rgb8, device: &Device) -> Result<Tensor> {
    let n = image.width * image.height * 3;
    if image.data.len() != n || n == 0 {
        return Err(Error::InputShape {
            name: "RGB bytes",
            expected: format!("{} bytes for {}×{} RGB", n, image.width, image.height),
            got: vec![image.data.len()],
        });
    }
    let v: Vec<f32> = image.data.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    Ok(
        Tensor::from_vec(v, (1, image.height, image.width, 3), device)?
            .permute((0, 3, 1, 2))?
            .contiguous()?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_modes_by_hand() {
        let x = Tensor::new(&[-2.0f32, -1.0, 0.0, 0.999, 1.0, 1.5], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 2))
            .unwrap();
        let px = |r| {
            let img = to_rgb8(&x, r).unwrap().remove(0);
            // back to channel-major for reading: pixel (0,0) = channels 0..3 of x[.., 0]
            img.data
        };
        // pixels: (x0 = -2, x2 = 0, x4 = 1) and (x1 = -1, x3 = 0.999, x5 = 1.5)
        assert_eq!(px(ByteRounding::Round), vec![0, 128, 255, 0, 255, 255]);
        assert_eq!(px(ByteRounding::Truncate), vec![0, 127, 255, 0, 254, 255]);
    }

    #[test]
    fn round_trip_and_errors() {
        let img = Rgb8 {
            width: 2,
            height: 1,
            data: vec![0, 64, 128, 200, 255, 17],
        };
        let t = from_rgb8(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 1, 2]);
        assert_eq!(to_rgb8(&t, ByteRounding::Round).unwrap()[0], img);
        let bad = Rgb8 {
            data: vec![0; 5],
            ..img
        };
        assert!(matches!(
            from_rgb8(&bad, &Device::Cpu),
            Err(Error::InputShape { .. })
        ));
        let nan = Tensor::new(&[f32::NAN; 3], &Device::Cpu)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        assert!(matches!(
            to_rgb8(&nan, ByteRounding::Round),
            Err(Error::NonFinite { nan: 3, .. })
        ));
    }
}
