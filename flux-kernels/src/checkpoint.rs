//! Strict, memory-mapped reading of safetensors checkpoints, shared by every model's loader.
//!
//! This knows no model: each model crate maps its own key names onto a [`Checkpoint`]. What is
//! shared is the strictness — a missing key or a wrong shape is an error naming the key, every
//! key read is recorded so that leftovers can be reported, and files are mapped, never read
//! whole into memory.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle::safetensors::Load;
use candle::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::{Error, Result};

/// Where one tensor's bytes are.
struct Entry {
    shape: Vec<usize>,
    data: Data,
}

enum Data {
    /// A byte range of a mapped file.
    Mapped {
        file: usize,
        dtype: Dtype,
        start: usize,
        end: usize,
    },
    /// A tensor already in memory ([`Checkpoint::from_tensors`]).
    Memory(Tensor),
}

/// One or more memory-mapped safetensors files read as one set of named tensors.
///
/// Each tensor is copied out of the mapping once, into memory of the requested dtype, and the
/// mapped pages are then released (`madvise(DONTNEED)`), so loading a model peaks at about the
/// size of its weights, not twice that.
pub struct Checkpoint {
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
    prefix: String,
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
    /// (a truncated or corrupt file is a [`Error::Checkpoint`]).
    pub fn open(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                what: "checkpoint weights",
                dtype,
            });
        }
        let first = files.first().ok_or_else(|| Error::Checkpoint {
            path: PathBuf::new(),
            reason: "no checkpoint files given".into(),
        })?;
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let bad = |reason: String| Error::Checkpoint {
                path: f.clone(),
                reason,
            };
            if !f.is_file() {
                return Err(bad("no such file".into()));
            }
            let file = std::fs::File::open(f).map_err(|e| bad(e.to_string()))?;
            // SAFETY: mapped read-only; like every mmap-based loader this assumes no one
            // truncates or rewrites the file while it is being read.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(e.to_string()))?;
            // Validates the header and that every tensor's bytes lie inside the file.
            SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let e = Entry {
                    shape: info.shape.clone(),
                    data: Data::Mapped {
                        file: i,
                        dtype: info.dtype,
                        start: data_start + a,
                        end: data_start + b,
                    },
                };
                if entries.insert(name.clone(), e).is_some() {
                    return Err(bad(format!(
                        "tensor `{name}` appears in more than one shard"
                    )));
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
            prefix: String::new(),
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
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                what: "checkpoint weights",
                dtype,
            });
        }
        let entries = tensors
            .into_iter()
            .map(|(k, t)| {
                let shape = t.dims().to_vec();
                (
                    k,
                    Entry {
                        shape,
                        data: Data::Memory(t),
                    },
                )
            })
            .collect();
        Ok(Checkpoint {
            maps: vec![],
            entries,
            prefix: String::new(),
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

    /// A few keys, sorted, for "this does not look like …" messages.
    pub fn sample_keys(&self, n: usize) -> Vec<String> {
        let mut k: Vec<String> = self.entries.keys().cloned().collect();
        k.sort();
        k.truncate(n);
        k
    }

    /// Reads `key`, checking its stored shape against `expected` when given, and records it as
    /// used.
    pub fn get(&self, key: &str, expected: Option<&[usize]>) -> Result<Tensor> {
        let full = format!("{}{key}", self.prefix);
        let Some(e) = self.entries.get(&full) else {
            return Err(Error::MissingTensor {
                name: full,
                source_desc: self.desc.clone(),
            });
        };
        if let Some(exp) = expected {
            if e.shape.as_slice() != exp {
                return Err(Error::TensorShape {
                    name: full,
                    expected: exp.to_vec(),
                    got: e.shape.clone(),
                });
            }
        }
        let t = match &e.data {
            Data::Memory(t) => t.to_device(&self.device)?.to_dtype(self.dtype)?,
            &Data::Mapped {
                file,
                dtype,
                start,
                end,
            } => {
                let map = &self.maps[file];
                let view =
                    TensorView::new(dtype, e.shape.clone(), &map[start..end]).map_err(|err| {
                        Error::Checkpoint {
                            path: PathBuf::from(&self.desc),
                            reason: format!("{full}: {err}"),
                        }
                    })?;
                let t = view.load(&self.device)?.to_dtype(self.dtype)?;
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

    /// After loading: fails with [`Error::UnexpectedTensors`] listing every key that was never
    /// read, except those `ignore` accepts (e.g. a full CLIPModel's vision tower).
    pub fn finish(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let names: Vec<String> = self.unused().into_iter().filter(|k| !ignore(k)).collect();
        if names.is_empty() {
            return Ok(());
        }
        Err(Error::UnexpectedTensors {
            names,
            source_desc: self.desc.clone(),
        })
    }

    /// Keys present in the files and never read, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut v: Vec<String> = self
            .entries
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// The safetensors files of a Hugging Face model folder: `{stem}.safetensors`, or the shards
/// named in `{stem}.safetensors.index.json` (diffusers: `diffusion_pytorch_model`;
/// transformers: `model`).
pub fn sharded_files(dir: &std::path::Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        let bad = |reason: String| Error::Checkpoint {
            path: index.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if shards.is_empty() {
            return Err(bad("`weight_map` names no files".into()));
        }
        Ok(shards.into_iter().map(|s| dir.join(s)).collect())
    } else if single.is_file() {
        Ok(vec![single])
    } else {
        Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!("neither {stem}.safetensors nor {stem}.safetensors.index.json is here"),
        })
    }
}
