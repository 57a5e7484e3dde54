//! PNG output with the generation parameters as text chunks, written atomically.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use flux_vae::Rgb8;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What produced an image: enough to generate it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageParams {
    /// The prompt.
    pub prompt: String,
    /// The T5-only prompt, when different.
    pub prompt_2: Option<String>,
    /// Model name (hub id or folder).
    pub model: String,
    /// Seed of the starting noise.
    pub seed: u64,
    /// Sampling steps.
    pub steps: usize,
    /// Guidance (dev family); `None` for schnell.
    pub guidance: Option<f32>,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// Compute dtype (`f32`, `bf16`).
    pub dtype: String,
    /// T5 sequence length.
    pub max_sequence_length: usize,
    /// flux-pipeline version.
    pub version: String,
}

/// The text chunk holding the JSON parameters.
pub const PARAMS_KEY: &str = "flux:parameters";

/// Writes `image` to `path` as PNG with the parameters as iTXt chunks (one per field, plus
/// [`PARAMS_KEY`] with all of them as JSON). The file appears whole or not at all: it is written
/// under a temporary name in the same folder and renamed.
pub fn write_png(path: &Path, image: &Rgb8, params: &ImageParams) -> Result<()> {
    let io = |p: &Path, e: &dyn std::fmt::Display| Error::Io {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    let tmp = partial_path(path);
    let write = || -> std::result::Result<(), String> {
        let file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut enc = png::Encoder::new(
            BufWriter::new(file),
            image.width as u32,
            image.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let json = serde_json::to_string(params).map_err(|e| e.to_string())?;
        let mut chunks = vec![
            (PARAMS_KEY.to_string(), json),
            ("prompt".into(), params.prompt.clone()),
            ("model".into(), params.model.clone()),
            ("seed".into(), params.seed.to_string()),
            ("steps".into(), params.steps.to_string()),
            ("size".into(), format!("{}x{}", params.width, params.height)),
            ("version".into(), params.version.clone()),
        ];
        if let Some(g) = params.guidance {
            chunks.push(("guidance".into(), g.to_string()));
        }
        if let Some(p2) = &params.prompt_2 {
            chunks.push(("prompt_2".into(), p2.clone()));
        }
        for (k, v) in chunks {
            enc.add_itxt_chunk(k, v).map_err(|e| e.to_string())?;
        }
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(&image.data).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path, &e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, &e)
    })
}

fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Checks, before any expensive work, that `path` can be written (its folder exists and
/// accepts a file).
pub fn check_writable(path: &Path) -> Result<()> {
    let probe = partial_path(path);
    std::fs::File::create(&probe).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        reason: format!("cannot write here: {e}"),
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A decoded PNG: pixels and the parameters it carries.
#[derive(Debug, Clone)]
pub struct ReadPng {
    /// The pixels (RGB).
    pub image: Rgb8,
    /// The parameters, if the file was written by flux.
    pub params: Option<ImageParams>,
}

/// Reads a PNG written by [`write_png`] (or any 8-bit RGB PNG).
pub fn read_png(path: &Path) -> Result<ReadPng> {
    let io = |e: &dyn std::fmt::Display| Error::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(|e| io(&e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND);
    let mut reader = dec.read_info().map_err(|e| io(&e))?;
    let mut buf = vec![
        0;
        reader
            .output_buffer_size()
            .ok_or_else(|| io(&"image too large"))?
    ];
    let info = reader.next_frame(&mut buf).map_err(|e| io(&e))?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return Err(io(&format!(
            "expected 8-bit RGB, found {:?} {:?}",
            info.color_type, info.bit_depth
        )));
    }
    buf.truncate(info.buffer_size());
    let params = reader
        .info()
        .utf8_text
        .iter()
        .find(|c| c.keyword == PARAMS_KEY)
        .and_then(|c| c.get_text().ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    Ok(ReadPng {
        image: Rgb8 {
            width: info.width as usize,
            height: info.height as usize,
            data: buf,
        },
        params,
    })
}
