//! Strict, memory-mapped reading of checkpoints (safetensors and GGUF), shared by every model's
//! loader.
//!
//! This knows no model: each model crate maps its own key names onto a [`Checkpoint`]. What is
//! shared is the strictness — a missing key or a wrong shape is an error naming the key, every
//! key read is recorded so that leftovers can be reported, and files are mapped, never read
//! whole into memory — and the weight encodings: a tensor stored as a GGUF block type or as fp8
//! (with ComfyUI's per-layer scales) is decoded by [`Checkpoint::get`], or kept packed for a
//! [`crate::Linear`] by [`Checkpoint::get_weight`].

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle::safetensors::Load;
use candle::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::gguf;
use crate::linear::LinearWeight;
use crate::quant::{Encoding, Fp8Kind, PackedWeight, QuantType};
use crate::{Error, LoadError, Result};

/// How a tensor is stored in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    /// A safetensors dtype (`F32`, `BF16`, `F8_E4M3`, …).
    Safetensors(Dtype),
    /// A GGUF tensor type.
    Gguf(QuantType),
}

impl std::fmt::Display for StoredType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredType::Safetensors(d) => write!(f, "{d:?}"),
            StoredType::Gguf(t) => write!(f, "{t}"),
        }
    }
}

impl StoredType {
    /// The plain float type (F32, F16, BF16) of either container, if it is one.
    pub fn float_type(self) -> Option<QuantType> {
        match self {
            StoredType::Gguf(t) if !t.is_quantized() => Some(t),
            StoredType::Safetensors(Dtype::F32) => Some(QuantType::F32),
            StoredType::Safetensors(Dtype::F16) => Some(QuantType::F16),
            StoredType::Safetensors(Dtype::BF16) => Some(QuantType::BF16),
            _ => None,
        }
    }

    /// The fp8 format, when the tensor is fp8.
    pub fn fp8(self) -> Option<Fp8Kind> {
        match self {
            StoredType::Safetensors(Dtype::F8_E4M3) => Some(Fp8Kind::E4M3),
            StoredType::Safetensors(Dtype::F8_E5M2) => Some(Fp8Kind::E5M2),
            _ => None,
        }
    }
}

/// Where one tensor's bytes are.
struct Entry {
    shape: Vec<usize>,
    data: Data,
}

enum Data {
    /// A byte range of a mapped file.
    Mapped {
        file: usize,
        stored: StoredType,
        start: usize,
        end: usize,
        /// The stored (block) layout matches `shape`; false when a GGUF file recorded a
        /// different original shape (`comfy.gguf.orig_shape.*`), which only decodes densely.
        packable: bool,
    },
    /// A tensor already in memory ([`Checkpoint::from_tensors`]).
    Memory(Tensor),
    /// A packed weight already in memory ([`Checkpoint::from_weights`]).
    Packed(PackedWeight),
}

/// One or more memory-mapped safetensors files read as one set of named tensors.
///
/// Each tensor is copied out of the mapping once, into memory of the requested dtype, and the
/// mapped pages are then released (`madvise(DONTNEED)`), so loading a model peaks at about the
/// size of its weights, not twice that.
pub struct Checkpoint {
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
    gguf_meta: std::collections::BTreeMap<String, gguf::Value>,
    text_meta: std::collections::BTreeMap<String, String>,
    prefix: String,
    /// Only keys under `prefix` belong to this checkpoint (one part of an all-in-one file).
    scoped: bool,
    dtype: DType,
    device: Device,
    desc: String,
    used: RefCell<BTreeSet<String>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("source", &self.desc)
            .field("tensors", &self.entries.len())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Checkpoint {
    /// Maps `files` (one file, or every shard of a sharded checkpoint). Tensors are converted to
    /// `dtype` (f32, bf16 or f16) on `device` as they are read. Every header is validated here
    /// (a truncated or corrupt file is a [`LoadError::File`] or [`LoadError::Gguf`]).
    pub fn open(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                what: "checkpoint weights",
                dtype,
            });
        }
        let first = files.first().ok_or_else(|| LoadError::File {
            path: PathBuf::new(),
            reason: "no checkpoint files given".into(),
        })?;
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        let mut gguf_meta = std::collections::BTreeMap::new();
        let mut text_meta = std::collections::BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let bad = |reason: String| LoadError::File {
                path: f.clone(),
                reason,
            };
            if !f.is_file() {
                return Err(bad(if f.is_dir() {
                    "this is a folder, not a checkpoint file".into()
                } else {
                    "no such file".into()
                })
                .into());
            }
            let file = std::fs::File::open(f).map_err(|e| bad(e.to_string()))?;
            // SAFETY: mapped read-only; like every mmap-based loader this assumes no one
            // truncates or rewrites the file while it is being read.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(e.to_string()))?;
            let mut add = |name: String, e: Entry| -> Result<()> {
                if entries.insert(name.clone(), e).is_some() {
                    return Err(
                        bad(format!("tensor `{name}` appears in more than one shard")).into(),
                    );
                }
                Ok(())
            };
            if gguf::is_gguf(&map) {
                let head = gguf::parse(&map).map_err(|source| LoadError::Gguf {
                    path: f.clone(),
                    source: Box::new(source),
                })?;
                for t in head.tensors {
                    let (shape, packable) = orig_shape(&head.metadata, &t).map_err(&bad)?;
                    add(
                        t.name,
                        Entry {
                            shape,
                            data: Data::Mapped {
                                file: i,
                                stored: StoredType::Gguf(t.ty),
                                start: t.start,
                                end: t.end,
                                packable,
                            },
                        },
                    )?;
                }
                if gguf_meta.is_empty() {
                    gguf_meta = head.metadata;
                }
            } else {
                // Validates the header and that every tensor's bytes lie inside the file.
                SafeTensors::deserialize(&map)
                    .map_err(|e| bad(format!("not a safetensors or GGUF file ({e})")))?;
                let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
                let data_start = 8 + n;
                if let Some(m) = meta.metadata() {
                    for (k, v) in m {
                        text_meta.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                for (name, info) in meta.tensors() {
                    let (a, b) = info.data_offsets;
                    add(
                        name.clone(),
                        Entry {
                            shape: info.shape.clone(),
                            data: Data::Mapped {
                                file: i,
                                stored: StoredType::Safetensors(info.dtype),
                                start: data_start + a,
                                end: data_start + b,
                                packable: true,
                            },
                        },
                    )?;
                }
            }
            maps.push(map);
        }
        let desc = if files.len() == 1 {
            first.display().to_string()
        } else {
            let dir = first.parent().unwrap_or(first);
            format!("{} ({} shards)", dir.display(), files.len())
        };
        Ok(Checkpoint {
            maps,
            entries,
            gguf_meta,
            text_meta,
            prefix: String::new(),
            scoped: false,
            dtype,
            device: device.clone(),
            desc,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// A checkpoint of tensors already in memory (weights made on a device, tests), read with
    /// the same strictness as files; tensors are converted to `dtype` on `device` when read.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        desc: &str,
    ) -> Result<Self> {
        let weights = tensors
            .into_iter()
            .map(|(k, t)| (k, LinearWeight::Dense(t)))
            .collect();
        Self::from_weights(weights, dtype, device, desc)
    }

    /// [`Checkpoint::from_tensors`] where some weights are packed (GGUF blocks, fp8): those
    /// read as a file's packed tensors do ([`Checkpoint::get_weight`] keeps them packed,
    /// [`Checkpoint::get`] decodes them), e.g. a quantized model made in memory.
    pub fn from_weights(
        weights: HashMap<String, LinearWeight>,
        dtype: DType,
        device: &Device,
        desc: &str,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                what: "checkpoint weights",
                dtype,
            });
        }
        let entries = weights
            .into_iter()
            .map(|(k, w)| {
                let entry = match w {
                    LinearWeight::Dense(t) => Entry {
                        shape: t.dims().to_vec(),
                        data: Data::Memory(t),
                    },
                    LinearWeight::Packed(p) => Entry {
                        shape: vec![p.dims().0, p.dims().1],
                        data: Data::Packed(p),
                    },
                };
                (k, entry)
            })
            .collect();
        Ok(Checkpoint {
            maps: vec![],
            entries,
            gguf_meta: Default::default(),
            text_meta: Default::default(),
            prefix: String::new(),
            scoped: false,
            dtype,
            device: device.clone(),
            desc: desc.to_string(),
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// Reads keys under `prefix` (e.g. `model.diffusion_model.`) when *every* key carries it.
    /// Returns whether it did.
    pub fn strip_common_prefix(&mut self, prefix: &str) -> bool {
        let all = !self.entries.is_empty() && self.entries.keys().all(|k| k.starts_with(prefix));
        if all {
            self.prefix = prefix.to_string();
        }
        all
    }

    /// Makes this checkpoint the part of the file under `prefix` (one component of an
    /// all-in-one file such as `text_encoders.t5xxl.transformer.`): keys are read without it,
    /// and other keys are neither visible nor reported as unexpected. Returns whether any key
    /// carries `prefix`.
    pub fn restrict_to_prefix(&mut self, prefix: &str) -> bool {
        let any = self.entries.keys().any(|k| k.starts_with(prefix));
        if any {
            self.prefix = prefix.to_string();
            self.scoped = true;
        }
        any
    }

    /// Whether any key (in the whole file, ignoring the prefix) starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.entries.keys().any(|k| k.starts_with(prefix))
    }

    /// A description of the source for error messages (file, or folder and shard count).
    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A safetensors header's `__metadata__` string (the first shard that has `key`); `None`
    /// for keys it lacks and for GGUF checkpoints.
    pub fn text_metadata(&self, key: &str) -> Option<&str> {
        self.text_meta.get(key).map(String::as_str)
    }

    /// GGUF metadata of the (first) GGUF file, e.g. `general.architecture`; `None` for keys it
    /// lacks and for safetensors checkpoints.
    pub fn gguf_metadata(&self, key: &str) -> Option<&gguf::Value> {
        self.gguf_meta.get(key)
    }

    /// The tensor names (without the stripped prefix; only those under it), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .keys()
            .filter_map(|k| k.strip_prefix(&self.prefix).map(String::from))
            .collect();
        v.sort();
        v
    }

    /// Whether `key` (without the stripped prefix) is present.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(&format!("{}{key}", self.prefix))
    }

    /// The stored shape of `key`, if present.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries
            .get(&format!("{}{key}", self.prefix))
            .map(|e| e.shape.as_slice())
    }

    /// How `key` is stored, if present in a file.
    pub fn stored_type(&self, key: &str) -> Option<StoredType> {
        match self.entries.get(&format!("{}{key}", self.prefix))?.data {
            Data::Mapped { stored, .. } => Some(stored),
            Data::Packed(ref p) => Some(match p.encoding() {
                Encoding::Gguf(ty) => StoredType::Gguf(ty),
                Encoding::Fp8(Fp8Kind::E4M3) => StoredType::Safetensors(Dtype::F8_E4M3),
                Encoding::Fp8(Fp8Kind::E5M2) => StoredType::Safetensors(Dtype::F8_E5M2),
            }),
            Data::Memory(_) => None,
        }
    }

    /// A few keys (of this checkpoint's part), sorted, for "this does not look like …" messages.
    pub fn sample_keys(&self, n: usize) -> Vec<String> {
        let mut k: Vec<String> = self.visible_keys().cloned().collect();
        k.sort();
        k.truncate(n);
        k
    }

    fn visible_keys(&self) -> impl Iterator<Item = &String> {
        self.entries
            .keys()
            .filter(|k| !self.scoped || k.starts_with(&self.prefix))
    }

    fn entry(&self, key: &str, expected: Option<&[usize]>) -> Result<(String, &Entry)> {
        let full = format!("{}{key}", self.prefix);
        let Some(e) = self.entries.get(&full) else {
            return Err(LoadError::MissingTensor {
                name: full,
                source_desc: self.desc.clone(),
            }
            .into());
        };
        if let Some(exp) = expected {
            if e.shape.as_slice() != exp {
                return Err(LoadError::TensorShape {
                    name: full,
                    expected: exp.to_vec(),
                    got: e.shape.clone(),
                }
                .into());
            }
        }
        Ok((full, e))
    }

    /// Reads `key`, checking its stored shape against `expected` when given, and records it as
    /// used. Any stored encoding is decoded (GGUF blocks, fp8 with its scale if the file has
    /// one) and converted to the checkpoint's dtype.
    pub fn get(&self, key: &str, expected: Option<&[usize]>) -> Result<Tensor> {
        let (full, e) = self.entry(key, expected)?;
        let t = match &e.data {
            Data::Memory(t) => t.to_device(&self.device)?.to_dtype(self.dtype)?,
            Data::Packed(p) => self.tensor_of(p.dequantize()?, &e.shape)?,
            &Data::Mapped {
                file,
                stored,
                start,
                end,
                ..
            } => {
                let map = &self.maps[file];
                let bytes = &map[start..end];
                let n: usize = e.shape.iter().product();
                let t = match stored {
                    StoredType::Gguf(ty) => {
                        let v = crate::quant::dequantize(ty, bytes, n)?;
                        self.tensor_of(v, &e.shape)?
                    }
                    StoredType::Safetensors(_) if stored.fp8().is_some() => {
                        let kind = stored.fp8().unwrap_or(Fp8Kind::E4M3);
                        let scale = self.fp8_scale(&full, &e.shape)?;
                        let mut v = vec![0f32; n];
                        crate::quant::fp8_into(kind, bytes, &scale, &mut v)?;
                        self.tensor_of(v, &e.shape)?
                    }
                    StoredType::Safetensors(dtype) => {
                        let view =
                            TensorView::new(dtype, e.shape.clone(), bytes).map_err(|err| {
                                LoadError::File {
                                    path: PathBuf::from(&self.desc),
                                    reason: format!("{full}: {err}"),
                                }
                            })?;
                        let t = view.load(&self.device).map_err(|err| {
                            LoadError::UnsupportedTensorType {
                                name: full.clone(),
                                stored: format!("{dtype:?}"),
                                why: format!("cannot be read here ({err}; in {})", self.desc),
                            }
                        })?;
                        t.to_dtype(self.dtype)?
                    }
                };
                // The bytes now live in `t`; let the kernel drop the mapped pages.
                // SAFETY: the mapping is read-only and the file unchanged, so dropped pages read
                // back the same bytes if they are ever touched again; nothing borrows them past
                // this point.
                let _ = unsafe {
                    map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
                };
                t
            }
        };
        self.used.borrow_mut().insert(full);
        Ok(t)
    }

    /// Reads the 2-D weight `key` for a [`crate::Linear`]: GGUF block types and fp8 stay packed
    /// (about one byte per value or less, decoded per use); everything else is read as
    /// [`Checkpoint::get`] does. Records the key (and its scale siblings) as used.
    pub fn get_weight(&self, key: &str, expected: &[usize]) -> Result<LinearWeight> {
        let (full, e) = self.entry(key, Some(expected))?;
        let packed = match &e.data {
            &Data::Mapped {
                file,
                stored,
                start,
                end,
                packable: true,
            } if e.shape.len() == 2 => {
                let encoding = match stored {
                    StoredType::Gguf(ty) if ty.is_quantized() => Some(Encoding::Gguf(ty)),
                    _ => stored.fp8().map(Encoding::Fp8),
                };
                encoding.map(|enc| (enc, file, start, end))
            }
            Data::Packed(p) => {
                let w = p.clone();
                self.used.borrow_mut().insert(full);
                return Ok(LinearWeight::Packed(w));
            }
            _ => None,
        };
        let Some((encoding, file, start, end)) = packed else {
            return Ok(LinearWeight::Dense(self.get(key, Some(expected))?));
        };
        let scale = match encoding {
            Encoding::Fp8(_) => self.fp8_scale(&full, &e.shape)?,
            Encoding::Gguf(_) => vec![],
        };
        let map = &self.maps[file];
        let w = PackedWeight::new(
            encoding,
            map[start..end].to_vec(),
            e.shape[0],
            e.shape[1],
            scale,
        )?;
        // SAFETY: as in `get`: the bytes were copied out of the read-only mapping.
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        self.used.borrow_mut().insert(full);
        Ok(LinearWeight::Packed(w))
    }

    /// A [`crate::Linear`] from `weight_key` `(out, in)` (kept packed when it is stored packed)
    /// and, when given, `bias_key` `(out)`; activations run in the checkpoint's dtype.
    pub fn linear(
        &self,
        weight_key: &str,
        bias_key: Option<&str>,
        inp: usize,
        out: usize,
    ) -> Result<crate::Linear> {
        self.linear_as(weight_key, bias_key, inp, out, None)
    }

    /// [`Checkpoint::linear`], and a weight stored dense is encoded into `quantize` while
    /// loading (when its rows are whole blocks of that type; otherwise it stays dense).
    pub fn linear_as(
        &self,
        weight_key: &str,
        bias_key: Option<&str>,
        inp: usize,
        out: usize,
        quantize: Option<Encoding>,
    ) -> Result<crate::Linear> {
        let w = self
            .get_weight(weight_key, &[out, inp])?
            .encoded(quantize)?;
        let b = bias_key.map(|k| self.get(k, Some(&[out]))).transpose()?;
        crate::Linear::from_weight(w, b, &self.device, self.dtype)
    }

    fn tensor_of(&self, v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?)
    }

    /// ComfyUI's scale of an fp8 weight `full` (`….scale_weight`, or newer `….weight_scale`):
    /// one value, or one per row. Empty when the file has none. Marks the scale and the
    /// layer's other quantization records (`scale_input`/`input_scale`, `comfy_quant`) used.
    fn fp8_scale(&self, full: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(stem) = full.strip_suffix("weight") else {
            return Ok(vec![]);
        };
        let mut used = self.used.borrow_mut();
        for aux in ["scale_input", "input_scale", "comfy_quant"] {
            let k = format!("{stem}{aux}");
            if self.entries.contains_key(&k) {
                used.insert(k);
            }
        }
        for name in ["scale_weight", "weight_scale"] {
            let k = format!("{stem}{name}");
            let Some(e) = self.entries.get(&k) else {
                continue;
            };
            let n: usize = e.shape.iter().product();
            let rows = shape.first().copied().unwrap_or(1);
            if n != 1 && n != rows {
                return Err(LoadError::TensorShape {
                    name: k,
                    expected: vec![rows],
                    got: e.shape.clone(),
                }
                .into());
            }
            let v = match &e.data {
                Data::Memory(t) => t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                Data::Packed(p) => p.dequantize()?,
                &Data::Mapped {
                    file,
                    stored,
                    start,
                    end,
                    ..
                } => {
                    let bytes = &self.maps[file][start..end];
                    let ty = match stored {
                        StoredType::Safetensors(Dtype::F32) => QuantType::F32,
                        StoredType::Safetensors(Dtype::F16) => QuantType::F16,
                        StoredType::Safetensors(Dtype::BF16) => QuantType::BF16,
                        other => {
                            return Err(LoadError::UnsupportedTensorType {
                                name: k,
                                stored: other.to_string(),
                                why: "is not a float type a scale can have".into(),
                            }
                            .into())
                        }
                    };
                    crate::quant::dequantize(ty, bytes, n)?
                }
            };
            used.insert(k);
            return Ok(v);
        }
        Ok(vec![])
    }

    /// After loading: fails with [`LoadError::UnexpectedTensors`] listing every key that was
    /// never read, except those `ignore` accepts (e.g. a full CLIPModel's vision tower) and
    /// ComfyUI's `scaled_fp8` format marker.
    pub fn finish(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = self
            .unused()
            .into_iter()
            .filter(|k| !ignore(k) && !k.ends_with("scaled_fp8"))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        Err(LoadError::UnexpectedTensors {
            names,
            source_desc: self.desc.clone(),
        }
        .into())
    }

    /// Keys of this checkpoint's part present in the files and never read, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut v: Vec<String> = self
            .visible_keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// The PyTorch shape of a GGUF tensor: its stored shape, or the `comfy.gguf.orig_shape.<name>`
/// that ComfyUI-GGUF's converter records for reshaped tensors (then it decodes densely only).
fn orig_shape(
    meta: &std::collections::BTreeMap<String, gguf::Value>,
    t: &gguf::TensorInfo,
) -> std::result::Result<(Vec<usize>, bool), String> {
    let Some(v) = meta.get(&format!("comfy.gguf.orig_shape.{}", t.name)) else {
        return Ok((t.shape.clone(), true));
    };
    let dims: Option<Vec<usize>> = match v {
        gguf::Value::Array(items) if !items.is_empty() && items.len() <= 8 => items
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect(),
        _ => None,
    };
    let stored: usize = t.shape.iter().product();
    match dims {
        Some(d) if d.iter().try_fold(1usize, |a, &x| a.checked_mul(x)) == Some(stored) => {
            let same = d == t.shape;
            Ok((d, same))
        }
        _ => Err(format!(
            "comfy.gguf.orig_shape.{} = {v:?} does not describe the {stored} values of tensor `{}`",
            t.name, t.name
        )),
    }
}

/// The largest config file read (`config.json`, `scheduler_config.json`, `model_index.json`).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads the UTF-8 text file `path` of at most `max` bytes (nothing larger is read into
/// memory): a typed error naming the file when it is larger, unreadable or not UTF-8.
pub fn read_text(path: &std::path::Path, max: u64) -> std::result::Result<String, LoadError> {
    use std::io::Read;
    let bad = |reason: String| LoadError::File {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = vec![];
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(bad(format!(
            "larger than {max} bytes; not a file of this kind"
        )));
    }
    String::from_utf8(bytes).map_err(|e| bad(format!("not valid UTF-8: {e}")))
}

/// The shard file names a `*.safetensors.index.json` lists in its `weight_map`, sorted and
/// without repeats. The index is read with a size cap, and every name must be a plain file
/// name: nothing an index says can point outside its folder.
pub fn shard_names(index: &std::path::Path) -> Result<Vec<String>> {
    let bad = |reason: String| LoadError::File {
        path: index.to_path_buf(),
        reason,
    };
    let text = read_text(index, 64 << 20)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .ok_or_else(|| bad(format!("`{tensor}` maps to {file}, not a file name")))?;
        let plain = !f.is_empty()
            && f != "."
            && f != ".."
            && !f.contains(['/', '\\'])
            && !std::path::Path::new(f).has_root();
        if !plain {
            return Err(bad(format!(
                "`{tensor}` maps to `{f}`: shards must be plain file names in the index's folder"
            ))
            .into());
        }
        shards.insert(f.to_string());
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` names no files".into()).into());
    }
    Ok(shards.into_iter().collect())
}

/// The safetensors files of a Hugging Face model folder: `{stem}.safetensors`, or the shards
/// named in `{stem}.safetensors.index.json` (diffusers: `diffusion_pytorch_model`;
/// transformers: `model`).
pub fn sharded_files(dir: &std::path::Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        Ok(shard_names(&index)?
            .into_iter()
            .map(|s| dir.join(s))
            .collect())
    } else if single.is_file() {
        Ok(vec![single])
    } else {
        Err(LoadError::File {
            path: dir.to_path_buf(),
            reason: format!("neither {stem}.safetensors nor {stem}.safetensors.index.json is here"),
        }
        .into())
    }
}
