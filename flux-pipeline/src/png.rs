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
    /// The device (`cpu`, `cuda`): pixels differ a little between devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Weights quantized while loading (`--quantize`), e.g. `q8_0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    /// [`crate::FluxPipeline::fingerprint`] of the model that made the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
    /// True CFG's negative prompt, when it was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// True CFG's scale, when it was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_cfg: Option<f32>,
    /// img2img strength, when the image started from a picture (its path is in `files`, key
    /// `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Outpainting's border `[left, top, right, bottom]` added around the init picture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outpaint: Option<[usize; 4]>,
    /// Kontext: the size the picture to edit was resized to (its preferred resolution), when
    /// it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit_size: Option<[usize; 2]>,
    /// The reference whose conventions were followed (`bfl`; absent: diffusers').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Decoded in tiles (`--tiled-vae`; changes pixels slightly).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tiled_vae: bool,
    /// The transformer's block products ran in fp8 (`--fp8-gemm`; changes pixels slightly).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fp8_gemm: bool,
    /// Files that replaced parts of the model (`transformer`, `t5`, `clip`, `vae`,
    /// `checkpoint`), and the task's pictures (`image`, `mask`, `edit`, `canny`, `depth`):
    /// absolute paths, or `owner/name:file` on the hub.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
    /// The SHA-256 (hex) of each task picture in `files`, so that a re-run can tell when a
    /// picture changed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sha256: std::collections::BTreeMap<String, String>,
    /// The LoRAs applied, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraParam>,
}

/// One LoRA of an image: which file, its SHA-256 and strength.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraParam {
    /// The file (absolute path).
    pub file: String,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
    /// The strength it was applied with.
    pub strength: f32,
}

/// The SHA-256 of a file's bytes, in lower-case hex (read in blocks; any size).
pub fn file_sha256(path: &std::path::Path) -> crate::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let io = |e: std::io::Error| crate::Error::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The text chunk holding the JSON parameters.
pub const PARAMS_KEY: &str = "flux:parameters";

/// Temporary files being written now, removed by [`remove_partial_files`] (the CLI calls it on
/// Ctrl-C).
static PARTIAL: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn partial_list() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PARTIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the temporary files of PNGs being written at this moment (for an interrupt
/// handler: after it, no `.name.partial-PID` file is left behind). A SIGKILL cannot run it,
/// so a kill during the few milliseconds of a write can leave one such hidden file.
pub fn remove_partial_files() {
    for p in partial_list().drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// Encodes `image` with `params` as iTXt chunks (one per field, plus [`PARAMS_KEY`] with all
/// of them as JSON) into `tmp`, registered for [`remove_partial_files`] until
/// [`remove_partial`].
pub(crate) fn encode_png(
    tmp: &Path,
    image: &Rgb8,
    params: &ImageParams,
) -> std::result::Result<(), String> {
    partial_list().push(tmp.to_path_buf());
    let file = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
    encode_to(BufWriter::new(file), image, Some(params))
}

/// The PNG of `image` with the parameters' chunks, as [`write_png`] writes it, in memory.
pub fn png_bytes(image: &Rgb8, params: &ImageParams) -> Result<Vec<u8>> {
    let mut out = vec![];
    encode_to(&mut out, image, Some(params)).map_err(Error::InvalidRequest)?;
    Ok(out)
}

/// The PNG of `image` alone, without parameter chunks (latent previews).
pub fn plain_png(image: &Rgb8) -> Result<Vec<u8>> {
    let mut out = vec![];
    encode_to(&mut out, image, None).map_err(Error::InvalidRequest)?;
    Ok(out)
}

/// Encodes `image` into `w`, with the parameters' iTXt chunks when given.
fn encode_to<W: std::io::Write>(
    w: W,
    image: &Rgb8,
    params: Option<&ImageParams>,
) -> std::result::Result<(), String> {
    let mut enc = png::Encoder::new(w, image.width as u32, image.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if let Some(params) = params {
        add_chunks(&mut enc, params)?;
    }
    let mut w = enc.write_header().map_err(|e| e.to_string())?;
    w.write_image_data(&image.data).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// One iTXt chunk per parameter, plus [`PARAMS_KEY`] with all of them as JSON.
fn add_chunks<W: std::io::Write>(
    enc: &mut png::Encoder<'_, W>,
    params: &ImageParams,
) -> std::result::Result<(), String> {
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
    Ok(())
}

/// Removes a temporary file (if still there) and forgets it.
pub(crate) fn remove_partial(tmp: &Path) {
    let _ = std::fs::remove_file(tmp);
    partial_list().retain(|p| p != tmp);
}

/// Writes `image` to `path` as PNG with the parameters as iTXt chunks (one per field, plus
/// [`PARAMS_KEY`] with all of them as JSON), replacing `path` if it exists ([`OutputNames`]
/// never replaces). The file appears whole or not at all: it is written under a temporary name
/// in the same folder and renamed.
///
/// [`OutputNames`]: crate::OutputNames
pub fn write_png(path: &Path, image: &Rgb8, params: &ImageParams) -> Result<()> {
    let tmp = partial_path(path);
    let result = encode_png(&tmp, image, params)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    remove_partial(&tmp);
    result.map_err(|reason| Error::Write {
        path: path.to_path_buf(),
        reason,
    })
}

/// The temporary name `path` is written under: `.name.partial-PID` in the same folder.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
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
    std::fs::File::create(&probe).map_err(|e| Error::Write {
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

/// The largest image side [`read_png`] accepts (the pipeline's own limit).
pub const MAX_PNG_SIDE: u32 = 8192;
/// The largest text chunk [`read_png`] decompresses (bytes).
const MAX_TEXT: usize = 1 << 20;

/// Reads a PNG written by [`write_png`] (or any 8-bit RGB PNG). The header is checked before
/// anything is allocated from it (sides up to [`MAX_PNG_SIDE`], 8-bit RGB), compressed text is
/// decompressed with a cap, and unreadable or malformed parameters are an error, not `None`.
pub fn read_png(path: &Path) -> Result<ReadPng> {
    let io = |e: &dyn std::fmt::Display| Error::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(|e| io(&e))?;
    let limits = png::Limits { bytes: 64 << 20 };
    let mut dec = png::Decoder::new_with_limits(std::io::BufReader::new(file), limits);
    dec.set_transformations(png::Transformations::EXPAND);
    let mut reader = dec.read_info().map_err(|e| io(&e))?;
    let (w, h) = (reader.info().width, reader.info().height);
    if w > MAX_PNG_SIDE || h > MAX_PNG_SIDE {
        return Err(io(&format!(
            "{w}x{h} pixels: larger than {MAX_PNG_SIDE} on a side"
        )));
    }
    let (color, depth) = reader.output_color_type();
    let channels = match color {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Indexed => 0,
    };
    if depth != png::BitDepth::Eight || channels == 0 {
        return Err(io(&format!(
            "expected an 8-bit RGB, RGBA or grey PNG, found {color:?} {depth:?}"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| io(&"image too large"))?;
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).map_err(|e| io(&e))?;
    buf.truncate(info.buffer_size());
    // to RGB as PIL's convert("RGB"): alpha dropped (not composited), grey repeated
    let row = info.line_size;
    let (w, h) = (info.width as usize, info.height as usize);
    if channels != 3 || row != w * 3 {
        let mut rgb = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            let line = &buf[y * row..y * row + w * channels];
            for px in line.chunks_exact(channels) {
                match channels {
                    1 | 2 => rgb.extend_from_slice(&[px[0]; 3]),
                    _ => rgb.extend_from_slice(&px[..3]),
                }
            }
        }
        buf = rgb;
    }
    let params = match reader
        .info()
        .utf8_text
        .iter()
        .find(|c| c.keyword == PARAMS_KEY)
    {
        None => None,
        Some(chunk) => {
            let mut chunk = chunk.clone();
            chunk
                .decompress_text_with_limit(MAX_TEXT)
                .map_err(|e| io(&format!("the {PARAMS_KEY} chunk: {e}")))?;
            let text = chunk
                .get_text()
                .map_err(|e| io(&format!("the {PARAMS_KEY} chunk: {e}")))?;
            Some(serde_json::from_str(&text).map_err(|e| {
                io(&format!(
                    "the {PARAMS_KEY} chunk is not valid parameters JSON: {e}"
                ))
            })?)
        }
    };
    Ok(ReadPng {
        image: Rgb8 {
            width: info.width as usize,
            height: info.height as usize,
            data: buf,
        },
        params,
    })
}
