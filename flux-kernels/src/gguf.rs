//! GGUF: a bounded reader of the header (metadata and tensor table) and a writer.
//!
//! The reader takes the file's bytes (a memory map) and trusts nothing in them: every count,
//! length, dimension and offset is checked against the bytes that are actually there before
//! anything is allocated from it, and each failure is a [`GgufError`] naming the field. Tensor
//! data is not read here; [`crate::Checkpoint`] reads it lazily, tensor by tensor.
//!
//! Layout (ggml `gguf.h`): magic `GGUF`, version (1–3), tensor count, metadata count, metadata
//! pairs, tensor infos (name, dims innermost first, type id, offset), padding to the alignment,
//! the data blob.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::quant::QuantType;

/// GGUF's default (and city96's, sd.cpp's, candle's) data alignment.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Most dimensions a ggml tensor has.
const MAX_DIMS: usize = 4;
/// Longest string accepted (names, metadata strings): 16 MiB (tokenizer blobs are a few MiB).
const MAX_STRING: u64 = 16 << 20;
/// Deepest nesting of metadata arrays accepted.
const MAX_ARRAY_DEPTH: usize = 2;
/// Arrays longer than this are kept as a length only (tokenizer vocabularies).
const KEEP_ARRAY: u64 = 4096;

/// What is wrong with a GGUF file's header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file ends inside the header.
    #[error("truncated: {what} at byte {at} needs {need} bytes, the file has {len}")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Its offset.
        at: usize,
        /// Bytes needed.
        need: u64,
        /// The file's length.
        len: usize,
    },
    /// Not a GGUF file.
    #[error("not a GGUF file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A version this reader does not know.
    #[error("unsupported GGUF version {0} (1, 2 and 3 are read)")]
    Version(u32),
    /// A count larger than the file could hold.
    #[error("{what} = {count} is more than the file can hold (at most {limit})")]
    Count {
        /// Which count.
        what: &'static str,
        /// The value in the file.
        count: u64,
        /// The bound it broke.
        limit: u64,
    },
    /// A metadata value type id that GGUF does not define.
    #[error("metadata `{key}`: unknown value type {id}")]
    ValueType {
        /// The key.
        key: String,
        /// The type id.
        id: u32,
    },
    /// A string that is not UTF-8.
    #[error("{what} at byte {at} is not valid UTF-8")]
    Utf8 {
        /// Which string.
        what: &'static str,
        /// Its offset.
        at: usize,
    },
    /// Metadata arrays nested too deep.
    #[error("metadata `{0}`: arrays nested deeper than {MAX_ARRAY_DEPTH}")]
    Nesting(String),
    /// A tensor type this workspace does not read.
    #[error("tensor `{name}`: unsupported GGUF tensor type {id} ({}); supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K", ggml_type_name(*id))]
    TensorType {
        /// The tensor.
        name: String,
        /// ggml's type id.
        id: u32,
    },
    /// A tensor with no, too many, zero or overflowing dimensions.
    #[error("tensor `{name}`: bad dimensions {dims:?} ({why})")]
    Dims {
        /// The tensor.
        name: String,
        /// The dimensions as stored (innermost first).
        dims: Vec<u64>,
        /// What is wrong.
        why: &'static str,
    },
    /// A tensor's offset is not a multiple of the alignment.
    #[error("tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        /// The tensor.
        name: String,
        /// Its offset in the data blob.
        offset: u64,
        /// The file's alignment.
        alignment: usize,
    },
    /// A tensor's bytes run past the end of the file.
    #[error("tensor `{name}`: bytes {start}..{end} lie outside the file ({len} bytes)")]
    OutOfBounds {
        /// The tensor.
        name: String,
        /// Absolute start.
        start: u64,
        /// Absolute end.
        end: u64,
        /// File length.
        len: usize,
    },
    /// Two tensors with one name.
    #[error("tensor `{0}` appears twice")]
    Duplicate(String),
    /// `general.alignment` that is zero, not a power of two, or huge.
    #[error("general.alignment = {0} is not a power of two between 1 and 65536")]
    Alignment(u64),
}

fn ggml_type_name(id: u32) -> &'static str {
    match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// string.
    Str(String),
    /// An array (kept whole when it has at most 4096 elements).
    Array(Vec<Value>),
    /// A long array, kept as its element type id and length only.
    LongArray {
        /// GGUF value type id of the elements.
        elem_type: u32,
        /// Number of elements.
        len: u64,
    },
}

impl Value {
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The name.
    pub name: String,
    /// The shape in PyTorch order (outermost first: a linear weight is `(out, in)`).
    pub shape: Vec<usize>,
    /// The stored type.
    pub ty: QuantType,
    /// Absolute byte range in the file.
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// A parsed GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment.
    pub alignment: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    version: u32,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let short = || GgufError::Truncated {
            what,
            at: self.pos,
            need: n,
            len: self.b.len(),
        };
        let n = usize::try_from(n).map_err(|_| short())?;
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let s = self.b.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// A count or length: u32 in version 1, u64 after.
    fn len(&mut self, what: &'static str) -> Result<u64, GgufError> {
        if self.version == 1 {
            Ok(self.u32(what)? as u64)
        } else {
            self.u64(what)
        }
    }
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }
    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let n = self.len(what)?;
        let limit = MAX_STRING.min(self.remaining());
        if n > limit {
            return Err(GgufError::Count {
                what,
                count: n,
                limit,
            });
        }
        let at = self.pos;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::Utf8 { what, at })
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        let scalar = |r: &mut Self, n: u64| r.take(n, "metadata value");
        Ok(match ty {
            0 => Value::U64(scalar(self, 1)?[0] as u64),
            1 => Value::I64(scalar(self, 1)?[0] as i8 as i64),
            2 => {
                let s = scalar(self, 2)?;
                Value::U64(u16::from_le_bytes([s[0], s[1]]) as u64)
            }
            3 => {
                let s = scalar(self, 2)?;
                Value::I64(i16::from_le_bytes([s[0], s[1]]) as i64)
            }
            4 => Value::U64(self.u32("metadata value")? as u64),
            5 => Value::I64(self.u32("metadata value")? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32("metadata value")?) as f64),
            7 => Value::Bool(scalar(self, 1)?[0] != 0),
            8 => Value::Str(self.string("metadata string")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Nesting(key.to_string()));
                }
                let elem = self.u32("array type")?;
                let n = self.len("array length")?;
                // every element takes at least one byte
                if n > self.remaining() {
                    return Err(GgufError::Count {
                        what: "array length",
                        count: n,
                        limit: self.remaining(),
                    });
                }
                if n <= KEEP_ARRAY {
                    let mut v = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        v.push(self.value(elem, key, depth + 1)?);
                    }
                    Value::Array(v)
                } else {
                    for _ in 0..n {
                        self.value(elem, key, depth + 1)?;
                    }
                    Value::LongArray {
                        elem_type: elem,
                        len: n,
                    }
                }
            }
            10 => Value::U64(self.u64("metadata value")?),
            11 => Value::I64(self.u64("metadata value")? as i64),
            12 => Value::F64(f64::from_bits(self.u64("metadata value")?)),
            id => {
                return Err(GgufError::ValueType {
                    key: key.to_string(),
                    id,
                })
            }
        })
    }
}

/// Parses the header of GGUF `bytes` (the whole file), checking every tensor's byte range.
pub fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut r = Reader {
        b: bytes,
        pos: 0,
        version: 3,
    };
    let magic = r.take(4, "magic")?;
    if magic != b"GGUF" {
        let mut m = [0u8; 4];
        m.copy_from_slice(magic);
        return Err(GgufError::BadMagic(m));
    }
    let version = r.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    r.version = version;
    let n_tensors = r.len("tensor count")?;
    let n_kv = r.len("metadata count")?;
    // a metadata pair takes ≥ 13 bytes (key length, one byte, value type), a tensor info ≥ 25
    for (what, n, min) in [
        ("metadata count", n_kv, 13),
        ("tensor count", n_tensors, 25),
    ] {
        let limit = r.remaining() / min;
        if n > limit {
            return Err(GgufError::Count {
                what,
                count: n,
                limit,
            });
        }
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32("metadata type")?;
        let v = r.value(ty, &key, 0)?;
        metadata.insert(key, v);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 65536 => a as usize,
            _ => {
                return Err(GgufError::Alignment(match v {
                    Value::U64(a) => *a,
                    Value::I64(a) => *a as u64,
                    _ => 0,
                }))
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let nd = r.u32("tensor dimension count")?;
        if nd == 0 || nd as usize > MAX_DIMS {
            return Err(GgufError::Dims {
                name,
                dims: vec![],
                why: "a tensor has 1 to 4 dimensions",
            });
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(r.len("tensor dimension")?);
        }
        let id = r.u32("tensor type")?;
        let offset = r.u64("tensor offset")?;
        raw.push((name, dims, id, offset));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashSet::new();
    for (name, dims, id, offset) in raw {
        let Some(ty) = QuantType::from_ggml_id(id) else {
            return Err(GgufError::TensorType { name, id });
        };
        if dims.contains(&0) {
            return Err(GgufError::Dims {
                name,
                dims,
                why: "a dimension is zero",
            });
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&e| e <= bytes.len() as u64 * 8);
        let Some(elems) = elems else {
            return Err(GgufError::Dims {
                name,
                dims,
                why: "more values than the file could hold",
            });
        };
        let Some(size) = ty.bytes_for(elems as usize, dims[0] as usize) else {
            return Err(GgufError::Dims {
                name,
                dims,
                why: "the innermost dimension is not a whole number of blocks of the type",
            });
        };
        if offset % alignment as u64 != 0 {
            return Err(GgufError::Misaligned {
                name,
                offset,
                alignment,
            });
        }
        let start = (data_start as u64).checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size as u64));
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => {
                if !seen.insert(name.clone()) {
                    return Err(GgufError::Duplicate(name));
                }
                let shape = dims.iter().rev().map(|&d| d as usize).collect();
                tensors.push(TensorInfo {
                    name,
                    shape,
                    ty,
                    start: s as usize,
                    end: e as usize,
                });
            }
            _ => {
                return Err(GgufError::OutOfBounds {
                    name,
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    len: bytes.len(),
                })
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
    })
}

/// Whether `bytes` start with the GGUF magic.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

/// A tensor to write: name, type, PyTorch-order shape, and its encoded bytes.
#[derive(Debug, Clone)]
pub struct TensorOut<'a> {
    /// The name.
    pub name: &'a str,
    /// The type of `data`.
    pub ty: QuantType,
    /// PyTorch-order shape.
    pub shape: &'a [usize],
    /// The encoded bytes ([`crate::quantize`] output, or little-endian floats).
    pub data: &'a [u8],
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let (ty, body): (u32, Vec<u8>) = match v {
        Value::U64(x) => match u32::try_from(*x) {
            Ok(x) => (4, x.to_le_bytes().to_vec()),
            Err(_) => (10, x.to_le_bytes().to_vec()),
        },
        Value::I64(x) => match i32::try_from(*x) {
            Ok(x) => (5, x.to_le_bytes().to_vec()),
            Err(_) => (11, x.to_le_bytes().to_vec()),
        },
        Value::F64(x) => (6, (*x as f32).to_le_bytes().to_vec()),
        Value::Bool(b) => (7, vec![*b as u8]),
        Value::Str(s) => {
            let mut b = vec![];
            put_str(&mut b, s)?;
            (8, b)
        }
        Value::Array(items) => {
            let mut b = vec![];
            let elem = items.first().map(value_type).unwrap_or(4);
            b.extend_from_slice(&elem.to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                let mut one = vec![];
                put_value(&mut one, it)?;
                b.extend_from_slice(&one[4..]); // without the element's own type id
            }
            (9, b)
        }
        Value::LongArray { .. } => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a long array read as a length only cannot be written back",
            ))
        }
    };
    w.write_all(&ty.to_le_bytes())?;
    w.write_all(&body)
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U64(x) if u32::try_from(*x).is_ok() => 4,
        Value::U64(_) => 10,
        Value::I64(x) if i32::try_from(*x).is_ok() => 5,
        Value::I64(_) => 11,
        Value::F64(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) | Value::LongArray { .. } => 9,
    }
}

/// A tensor's entry in a file being written: name, type and PyTorch-order shape.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// The name.
    pub name: String,
    /// The type its data will have.
    pub ty: QuantType,
    /// PyTorch-order shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn bytes(&self) -> Option<usize> {
        let elems = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        self.ty
            .bytes_for(elems, self.shape.last().copied().unwrap_or(1))
    }
}

fn invalid(m: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, m)
}

fn pad(n: usize) -> usize {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
}

/// A GGUF v3 file (alignment 32) written tensor by tensor, so converting a large model holds
/// one tensor in memory at a time. The header (metadata and every tensor's entry) is written
/// first; [`StreamWriter::push`] then takes each tensor's data in the same order. The file is
/// written under a temporary name in the same folder and renamed into place by
/// [`StreamWriter::finish`]; dropped unfinished, the temporary file is removed, so an
/// interrupted write never leaves a partial file at `path`.
pub struct StreamWriter {
    w: Option<std::io::BufWriter<std::fs::File>>,
    specs: Vec<TensorSpec>,
    next: usize,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl StreamWriter {
    /// Creates the temporary file and writes the header.
    pub fn create(
        path: &Path,
        metadata: &[(&str, Value)],
        specs: Vec<TensorSpec>,
    ) -> std::io::Result<Self> {
        let mut head = vec![];
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(specs.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut head, k)?;
            put_value(&mut head, v)?;
        }
        let mut offset = 0usize;
        for t in &specs {
            if t.shape.is_empty() || t.shape.len() > MAX_DIMS {
                return Err(invalid(format!(
                    "{}: GGUF tensors have 1 to 4 dimensions",
                    t.name
                )));
            }
            let Some(size) = t.bytes() else {
                return Err(invalid(format!(
                    "{}: shape {:?} is not a whole number of {} blocks",
                    t.name, t.shape, t.ty
                )));
            };
            put_str(&mut head, &t.name)?;
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ty.ggml_id().to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = pad(offset + size);
        }
        head.resize(pad(head.len()), 0);
        let tmp = path.with_file_name(format!(
            ".{}.partial",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("out.gguf")
        ));
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut me = StreamWriter {
            w: None,
            specs,
            next: 0,
            tmp,
            path: path.to_path_buf(),
        };
        w.write_all(&head)?;
        me.w = Some(w);
        Ok(me)
    }

    /// The next tensor's spec, if any remains.
    pub fn next_spec(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    /// Writes the next tensor's data (its size must match its spec).
    pub fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        let Some(spec) = self.specs.get(self.next) else {
            return Err(invalid("more tensors than the header announced".into()));
        };
        if spec.bytes() != Some(data.len()) {
            return Err(invalid(format!(
                "{}: {} bytes do not hold a {} tensor of shape {:?}",
                spec.name,
                data.len(),
                spec.ty,
                spec.shape
            )));
        }
        let w = self
            .w
            .as_mut()
            .ok_or_else(|| invalid("writer closed".into()))?;
        w.write_all(data)?;
        w.write_all(&vec![0u8; pad(data.len()) - data.len()])?;
        self.next += 1;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; every announced tensor must have been
    /// pushed.
    pub fn finish(mut self) -> std::io::Result<()> {
        if self.next != self.specs.len() {
            return Err(invalid(format!(
                "{} of {} tensors written",
                self.next,
                self.specs.len()
            )));
        }
        let w = self
            .w
            .take()
            .ok_or_else(|| invalid("writer closed".into()))?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if self.w.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a GGUF v3 file (alignment 32) of `tensors` already in memory (see [`StreamWriter`]).
pub fn write(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &[TensorOut<'_>],
) -> std::io::Result<()> {
    let specs = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.to_string(),
            ty: t.ty,
            shape: t.shape.to_vec(),
        })
        .collect();
    let mut w = StreamWriter::create(path, metadata, specs)?;
    for t in tensors {
        w.push(t.data)?;
    }
    w.finish()
}
