//! Writing a transformer as GGUF, the way city96's converter and stable-diffusion.cpp's do, so
//! that their loaders (and ours) read the file.
//!
//! Which tensors are quantized follows city96's `convert.py` + `llama-quantize` patch: the 2-D
//! weights inside `double_blocks.*` and `single_blocks.*` take the requested type (F16 where
//! a row is not a whole number of blocks); the embedders and the last layer keep their stored
//! precision (BF16 or F32; F16 for anything else, as city96 casts fp8 sources); 1-D tensors
//! are F32. Names are BFL's, with `general.architecture = "flux"`.

use std::path::Path;

use candle::DType;
use flux_kernels::gguf::{StreamWriter, TensorSpec, Value};
use flux_kernels::{QuantType, StoredType};

use crate::weights::{bfl_tensor_shapes, Weights};
use crate::{Config, Error, Result};

/// llama.cpp's `general.file_type` for a file whose blocks are `ty` (`LLAMA_FTYPE_*`).
pub fn llama_file_type(ty: QuantType) -> u32 {
    match ty {
        QuantType::F32 => 0,
        QuantType::F16 => 1,
        QuantType::Q4_0 => 2,
        QuantType::Q4_1 => 3,
        QuantType::Q8_0 => 7,
        QuantType::Q5_0 => 8,
        QuantType::Q5_1 => 9,
        QuantType::Q2_K => 10,
        QuantType::Q3_K => 11, // Q3_K_S
        QuantType::Q4_K => 14, // Q4_K_S
        QuantType::Q5_K => 16, // Q5_K_S
        QuantType::Q6_K => 18,
        QuantType::BF16 => 32,
    }
}

/// The GGUF type of BFL tensor `name` of `shape` in a `ty` file made from a tensor stored as
/// `stored` (city96's policy; see the module docs).
pub fn gguf_type_for(
    name: &str,
    shape: &[usize],
    stored: Option<StoredType>,
    ty: QuantType,
) -> QuantType {
    let elems: usize = shape.iter().product();
    if shape.len() != 2 || elems <= 1024 {
        return QuantType::F32;
    }
    if name.starts_with("double_blocks.") || name.starts_with("single_blocks.") {
        return if shape[1].is_multiple_of(ty.block_elems()) {
            ty
        } else {
            QuantType::F16
        };
    }
    match stored.and_then(StoredType::float_type) {
        Some(t @ (QuantType::BF16 | QuantType::F32)) => t,
        _ => QuantType::F16,
    }
}

/// What [`convert_to_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// The config of the converted model.
    pub config: Config,
    /// Tensors written per type.
    pub types: std::collections::BTreeMap<String, usize>,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// Converts the BFL-layout transformer `input` (any format [`crate::Flux::from_file`] reads;
/// `config` detected when `None`) into a GGUF file at `output` with blocks of `ty`, one
/// tensor at a time; `progress(done, total)` is called after each tensor.
pub fn convert_to_gguf(
    input: &Path,
    config: Option<&Config>,
    output: &Path,
    ty: QuantType,
    mut progress: impl FnMut(usize, usize),
) -> Result<ConvertReport> {
    let w = Weights::open_file(input, DType::F32, &candle::Device::Cpu)?;
    let cfg = match config {
        Some(c) => c.clone(),
        None => w.detect_config()?,
    };
    cfg.validate()?;
    w.check_looks_like(&cfg)?;
    let tensors = bfl_tensor_shapes(&cfg);
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, shape)| TensorSpec {
            name: name.clone(),
            ty: gguf_type_for(name, shape, w.checkpoint().stored_type(name), ty),
            shape: shape.clone(),
        })
        .collect();
    let meta = [
        ("general.architecture", Value::Str("flux".into())),
        ("general.quantization_version", Value::U64(2)),
        ("general.file_type", Value::U64(llama_file_type(ty) as u64)),
    ];
    let io = |e: std::io::Error| {
        Error::Load(flux_kernels::LoadError::File {
            path: output.to_path_buf(),
            reason: e.to_string(),
        })
    };
    let mut out = StreamWriter::create(output, &meta, specs.clone()).map_err(io)?;
    let mut report = ConvertReport {
        config: cfg.clone(),
        types: Default::default(),
        bytes: 0,
    };
    let total = specs.len();
    for (i, spec) in specs.iter().enumerate() {
        let t = w.get(&spec.name, &spec.shape)?;
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let inner = spec.shape.last().copied().unwrap_or(1);
        let data = flux_kernels::quantize(spec.ty, &v, inner)?;
        out.push(&data).map_err(io)?;
        report.bytes += data.len() as u64;
        *report.types.entry(spec.ty.to_string()).or_default() += 1;
        progress(i + 1, total);
    }
    w.finish()?;
    out.finish().map_err(io)?;
    Ok(report)
}
