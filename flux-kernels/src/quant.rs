//! Weight encodings other than plain f32/f16/bf16: GGUF block types and fp8.
//!
//! This module knows the byte layouts (block sizes, the fp8 bit patterns) and turns stored
//! bytes into f32, in parallel over row chunks. The GGUF blocks are decoded by candle's
//! reference `to_float` for each block type (the same arithmetic as ggml's C code), the fp8
//! formats through exact 256-entry tables. Quantizing (f32 → blocks) uses candle's `from_float`.

use candle::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle::quantized::GgmlDType;
use rayon::prelude::*;

use crate::{Error, Result};

/// A GGUF tensor type this workspace reads (ggml's `ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32 values, f16 scale, 4-bit (offset 8).
    Q4_0,
    /// 32 values, f16 scale and min, 4-bit.
    Q4_1,
    /// 32 values, f16 scale, 5-bit (offset 16).
    Q5_0,
    /// 32 values, f16 scale and min, 5-bit.
    Q5_1,
    /// 32 values, f16 scale, 8-bit.
    Q8_0,
    /// 256 values, 2-bit with 4-bit scales and mins.
    Q2_K,
    /// 256 values, 3-bit with 6-bit scales.
    Q3_K,
    /// 256 values, 4-bit with 6-bit scales and mins.
    Q4_K,
    /// 256 values, 5-bit with 6-bit scales and mins.
    Q5_K,
    /// 256 values, 6-bit with 8-bit scales.
    Q6_K,
}

impl QuantType {
    /// Every supported type, in ggml id order.
    pub const ALL: [QuantType; 13] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2_K,
        QuantType::Q3_K,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
        QuantType::BF16,
    ];

    /// From ggml's type id; `None` for ids this workspace does not read (IQ*, Q8_K, …).
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// ggml's type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q2_K => 10,
            QuantType::Q3_K => 11,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
            QuantType::BF16 => 30,
        }
    }

    /// The name as ggml and the `gguf` package spell it (`Q4_K`, `BF16`, …).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::BF16 => "BF16",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q2_K => "Q2_K",
            QuantType::Q3_K => "Q3_K",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// Parses a type name, case-insensitively (`q8_0`, `Q4_K`, `q4k`, `bf16`).
    pub fn parse(s: &str) -> Option<Self> {
        let norm = |x: &str| x.to_ascii_lowercase().replace('_', "");
        let want = norm(s);
        Self::ALL.into_iter().find(|t| norm(t.name()) == want)
    }

    /// Values per block (1 for the float types).
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::Q8_0 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q2_K => 84,
            QuantType::Q3_K => 110,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// Whether this is a block-quantized type (not F32/F16/BF16).
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of a tensor of `elems` values whose innermost dimension is `inner`, or `None` when
    /// `inner` is not a whole number of blocks or the size overflows.
    pub fn bytes_for(self, elems: usize, inner: usize) -> Option<usize> {
        let b = self.block_elems();
        if !inner.is_multiple_of(b) || !elems.is_multiple_of(b) {
            return None;
        }
        (elems / b).checked_mul(self.block_bytes())
    }

    /// candle's type.
    pub fn to_candle(self) -> GgmlDType {
        match self {
            QuantType::F32 => GgmlDType::F32,
            QuantType::F16 => GgmlDType::F16,
            QuantType::BF16 => GgmlDType::BF16,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q5_1 => GgmlDType::Q5_1,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q2_K => GgmlDType::Q2K,
            QuantType::Q3_K => GgmlDType::Q3K,
            QuantType::Q4_K => GgmlDType::Q4K,
            QuantType::Q5_K => GgmlDType::Q5K,
            QuantType::Q6_K => GgmlDType::Q6K,
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An 8-bit float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Kind {
    /// OCP E4M3FN (`torch.float8_e4m3fn`, safetensors `F8_E4M3`): no infinities, max 448.
    E4M3,
    /// E5M2 (`torch.float8_e5m2`, safetensors `F8_E5M2`): f16's exponent, 2 mantissa bits.
    E5M2,
}

impl Fp8Kind {
    /// The exact f32 value of every byte.
    pub fn table(self) -> &'static [f32; 256] {
        static E4M3: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
        static E5M2: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
        match self {
            Fp8Kind::E4M3 => E4M3.get_or_init(|| std::array::from_fn(|b| e4m3_to_f32(b as u8))),
            Fp8Kind::E5M2 => E5M2.get_or_init(|| std::array::from_fn(|b| e5m2_to_f32(b as u8))),
        }
    }

    /// The name used in files (`float8_e4m3fn`, `float8_e5m2`).
    pub fn name(self) -> &'static str {
        match self {
            Fp8Kind::E4M3 => "float8_e4m3fn",
            Fp8Kind::E5M2 => "float8_e5m2",
        }
    }
}

fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 0xF && b & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * (m / 8.0) * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

fn e5m2_to_f32(b: u8) -> f32 {
    half::f16::from_bits((b as u16) << 8).to_f32()
}

/// How a packed weight's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// GGUF blocks along each row.
    Gguf(QuantType),
    /// One fp8 byte per value.
    Fp8(Fp8Kind),
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encoding::Gguf(t) => write!(f, "{t}"),
            Encoding::Fp8(k) => f.write_str(k.name()),
        }
    }
}

/// A 2-D `(out, in)` weight kept in its compact encoding, rows of `in` values.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    encoding: Encoding,
    bytes: std::sync::Arc<[u8]>,
    out: usize,
    inp: usize,
    /// fp8 only: empty, one value, or one per row.
    scale: Vec<f32>,
}

impl PackedWeight {
    /// Checks that `bytes` hold an `(out, in)` weight in `encoding` (rows a whole number of
    /// blocks) and that `scale` is empty, one value or one per row.
    pub fn new(
        encoding: Encoding,
        bytes: Vec<u8>,
        out: usize,
        inp: usize,
        scale: Vec<f32>,
    ) -> Result<Self> {
        let n = out
            .checked_mul(inp)
            .ok_or_else(|| Error::InvalidArgument(format!("weight ({out}, {inp}) overflows")))?;
        let need = match encoding {
            Encoding::Gguf(t) => t.bytes_for(n, inp),
            Encoding::Fp8(_) => Some(n),
        };
        if need != Some(bytes.len()) {
            return Err(Error::InvalidArgument(format!(
                "{encoding} weight ({out}, {inp}): {} bytes, expected {}",
                bytes.len(),
                need.map_or("rows of whole blocks".to_string(), |n| n.to_string())
            )));
        }
        if !(scale.len() <= 1 || scale.len() == out)
            || matches!(encoding, Encoding::Gguf(_)) && !scale.is_empty()
        {
            return Err(Error::InvalidArgument(format!(
                "{encoding} weight ({out}, {inp}): {} scale values",
                scale.len()
            )));
        }
        Ok(PackedWeight {
            encoding,
            bytes: bytes.into(),
            out,
            inp,
            scale,
        })
    }

    /// Quantizes a dense row-major `(out, in)` f32 weight into `ty`.
    pub fn quantize(ty: QuantType, values: &[f32], out: usize, inp: usize) -> Result<Self> {
        Self::encode(Encoding::Gguf(ty), values, out, inp)
    }

    /// Encodes a dense row-major `(out, in)` f32 weight: GGUF blocks (candle's reference
    /// quantizers), or fp8 with one scale for the tensor (max |w| onto the format's largest
    /// finite value; each value rounded to the nearest representable one).
    pub fn encode(encoding: Encoding, values: &[f32], out: usize, inp: usize) -> Result<Self> {
        if Some(values.len()) != out.checked_mul(inp) {
            return Err(Error::InvalidArgument(format!(
                "{} values for a ({out}, {inp}) weight",
                values.len()
            )));
        }
        match encoding {
            Encoding::Gguf(ty) => Self::new(encoding, quantize(ty, values, inp)?, out, inp, vec![]),
            Encoding::Fp8(kind) => {
                let (bytes, scale) = fp8_encode(kind, values);
                Self::new(encoding, bytes, out, inp, vec![scale])
            }
        }
    }

    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The fp8 scale (empty, one value, or one per row).
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// Decodes into `out` (`out·in` values, row-major `(out, in)`), in parallel.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        match self.encoding {
            Encoding::Gguf(t) => dequantize_into(t, &self.bytes, out),
            Encoding::Fp8(k) => fp8_into(k, &self.bytes, &self.scale, out),
        }
    }

    /// Decodes into a new row-major `(out, in)` vector.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.out * self.inp];
        self.dequantize_into(&mut v)?;
        Ok(v)
    }
}

/// Values per parallel work item (a multiple of every block size).
const CHUNK: usize = 1 << 16;

/// Decodes `bytes` holding `out.len()` values of type `ty` into `out`, in parallel.
pub fn dequantize_into(ty: QuantType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    if ty.bytes_for(n, ty.block_elems()) != Some(bytes.len()) {
        return Err(Error::InvalidArgument(format!(
            "{ty}: {} bytes do not hold {n} values",
            bytes.len()
        )));
    }
    let per_chunk_bytes = CHUNK / ty.block_elems() * ty.block_bytes();
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(per_chunk_bytes))
        .for_each(|(o, b)| decode_chunk(ty, b, o));
    Ok(())
}

/// Decodes `bytes` of type `ty` into a new f32 vector of `n` values.
pub fn dequantize(ty: QuantType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Decodes fp8 `bytes` into `out` (same length), multiplying by `scale` (one value for the
/// whole tensor, or one per row of `out.len() / scale.len()` values).
pub fn fp8_into(kind: Fp8Kind, bytes: &[u8], scale: &[f32], out: &mut [f32]) -> Result<()> {
    if bytes.len() != out.len() {
        return Err(Error::InvalidArgument(format!(
            "fp8: {} bytes for {} values",
            bytes.len(),
            out.len()
        )));
    }
    let lut = kind.table();
    let row = match scale.len() {
        0 | 1 => out.len().max(1),
        s if out.len().is_multiple_of(s) => out.len() / s,
        s => {
            return Err(Error::InvalidArgument(format!(
                "fp8: {s} scales do not divide {} values into rows",
                out.len()
            )))
        }
    };
    if scale.len() <= 1 {
        let s = scale.first().copied();
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK))
            .for_each(|(o, b)| match s {
                None => o.iter_mut().zip(b).for_each(|(o, &b)| *o = lut[b as usize]),
                Some(s) => o
                    .iter_mut()
                    .zip(b)
                    .for_each(|(o, &b)| *o = lut[b as usize] * s),
            });
    } else {
        out.par_chunks_mut(row)
            .zip(bytes.par_chunks(row))
            .zip(scale.par_iter())
            .for_each(|((o, b), &s)| {
                o.iter_mut()
                    .zip(b)
                    .for_each(|(o, &b)| *o = lut[b as usize] * s)
            });
    }
    Ok(())
}

/// `values` as a per-tensor-scaled fp8 tensor holds them: encoded as [`PackedWeight::encode`]
/// does (scale = max |finite value| / the format's largest value, nearest byte with ties to
/// even, ±inf saturating, NaN to 0) and decoded again. This is what an fp8 GEMM makes of its
/// activations (the CUDA kernel rounds the same way); also the CPU's emulation of that GEMM.
pub fn fp8_round(kind: Fp8Kind, values: &[f32]) -> Vec<f32> {
    let (bytes, scale) = fp8_encode(kind, values);
    let lut = kind.table();
    bytes.par_iter().map(|&b| lut[b as usize] * scale).collect()
}

/// fp8 bytes of `values / scale` (nearest value, ties to even; ±inf saturates to ±max, NaN is 0)
/// and the per-tensor scale.
fn fp8_encode(kind: Fp8Kind, values: &[f32]) -> (Vec<u8>, f32) {
    let table = kind.table();
    // the non-negative finite values and their bytes, ascending
    let mut pos: Vec<(f32, u8)> = (0u8..=0x7F)
        .map(|b| (table[b as usize], b))
        .filter(|(v, _)| v.is_finite())
        .collect();
    pos.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max = pos.last().map_or(1.0, |p| p.0);
    let amax = values
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    let scale = if amax > 0.0 { amax / max } else { 1.0 };
    let nearest = |x: f32| -> u8 {
        if x.is_nan() {
            return 0;
        }
        let a = (x.abs() / scale).min(max);
        let i = pos.partition_point(|p| p.0 < a);
        let b = match (pos.get(i.wrapping_sub(1)), pos.get(i)) {
            // nearest, ties to the even byte (round half to even, as torch and the GPU's
            // conversion do: consecutive bytes are consecutive values)
            (Some(lo), Some(hi)) => match (a - lo.0).total_cmp(&(hi.0 - a)) {
                std::cmp::Ordering::Less => lo.1,
                std::cmp::Ordering::Greater => hi.1,
                std::cmp::Ordering::Equal if lo.1 % 2 == 0 => lo.1,
                std::cmp::Ordering::Equal => hi.1,
            },
            (Some(lo), None) => lo.1,
            (None, Some(hi)) => hi.1,
            (None, None) => 0,
        };
        // the sign even of a zero (−0 is 0x80 in both formats), as torch's cast keeps it
        if x.is_sign_negative() {
            b | 0x80
        } else {
            b
        }
    };
    let bytes = values.par_iter().map(|&x| nearest(x)).collect();
    (bytes, scale)
}

fn decode_chunk(ty: QuantType, b: &[u8], o: &mut [f32]) {
    match ty {
        QuantType::F32 => {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QuantType::F16 => {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        QuantType::BF16 => {
            for (o, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        QuantType::Q4_0 => blocks::<BlockQ4_0>(b, o),
        QuantType::Q4_1 => blocks::<BlockQ4_1>(b, o),
        QuantType::Q5_0 => blocks::<BlockQ5_0>(b, o),
        QuantType::Q5_1 => blocks::<BlockQ5_1>(b, o),
        QuantType::Q8_0 => blocks::<BlockQ8_0>(b, o),
        QuantType::Q2_K => blocks::<BlockQ2K>(b, o),
        QuantType::Q3_K => blocks::<BlockQ3K>(b, o),
        QuantType::Q4_K => blocks::<BlockQ4K>(b, o),
        QuantType::Q5_K => blocks::<BlockQ5K>(b, o),
        QuantType::Q6_K => blocks::<BlockQ6K>(b, o),
    }
}

/// Runs candle's `to_float` for block type `T` over `b` (a whole number of blocks, checked by
/// the callers), copying into an aligned buffer first when `b` is not aligned for `T`.
fn blocks<T: GgmlType>(b: &[u8], o: &mut [f32]) {
    let size = std::mem::size_of::<T>();
    let n = b.len() / size;
    debug_assert_eq!(n * size, b.len());
    debug_assert_eq!(n * T::BLCK_SIZE, o.len());
    if (b.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        // SAFETY: `T` is one of candle's `#[repr(C)]` ggml block structs made only of integers
        // and f16 (every bit pattern valid); the pointer is aligned for `T` (checked above) and
        // `n · size_of::<T>()` bytes lie inside `b`.
        let xs = unsafe { std::slice::from_raw_parts(b.as_ptr() as *const T, n) };
        T::to_float(xs, o);
    } else {
        let mut v: Vec<T> = Vec::with_capacity(n);
        // SAFETY: as above; the bytes are copied into `v`'s (aligned) allocation of `n` blocks
        // before its length is set.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr() as *mut u8, b.len());
            v.set_len(n);
        }
        T::to_float(&v, o);
    }
}

/// Quantizes row-major f32 `values` (rows of `inner` values) into blocks of `ty`, in parallel
/// over rows. `inner` must be a whole number of blocks.
pub fn quantize(ty: QuantType, values: &[f32], inner: usize) -> Result<Vec<u8>> {
    let Some(total) = ty.bytes_for(values.len(), inner) else {
        return Err(Error::InvalidArgument(format!(
            "{ty} needs rows of a multiple of {} values; got rows of {inner}",
            ty.block_elems()
        )));
    };
    if inner == 0 {
        return Ok(vec![]);
    }
    let row_bytes = inner / ty.block_elems() * ty.block_bytes();
    let mut out = vec![0u8; total];
    let rows_per = (CHUNK / inner).max(1);
    out.par_chunks_mut(row_bytes * rows_per)
        .zip(values.par_chunks(inner * rows_per))
        .for_each(|(o, v)| encode_chunk(ty, v, o));
    Ok(out)
}

fn encode_chunk(ty: QuantType, v: &[f32], o: &mut [u8]) {
    match ty {
        QuantType::F32 => {
            for (c, x) in o.chunks_exact_mut(4).zip(v) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        QuantType::F16 => {
            for (c, x) in o.chunks_exact_mut(2).zip(v) {
                c.copy_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        QuantType::BF16 => {
            for (c, x) in o.chunks_exact_mut(2).zip(v) {
                c.copy_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        QuantType::Q4_0 => encode::<BlockQ4_0>(v, o),
        QuantType::Q4_1 => encode::<BlockQ4_1>(v, o),
        QuantType::Q5_0 => encode::<BlockQ5_0>(v, o),
        QuantType::Q5_1 => encode::<BlockQ5_1>(v, o),
        QuantType::Q8_0 => encode::<BlockQ8_0>(v, o),
        QuantType::Q2_K => encode::<BlockQ2K>(v, o),
        QuantType::Q3_K => encode::<BlockQ3K>(v, o),
        QuantType::Q4_K => encode::<BlockQ4K>(v, o),
        QuantType::Q5_K => encode::<BlockQ5K>(v, o),
        QuantType::Q6_K => encode::<BlockQ6K>(v, o),
    }
}

fn encode<T: GgmlType>(v: &[f32], o: &mut [u8]) {
    let n = v.len() / T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); n];
    T::from_float(v, &mut blocks);
    // SAFETY: `blocks` holds `n` initialised `#[repr(C)]` plain-data blocks; viewing them as
    // bytes is valid, and `o` has exactly `n · size_of::<T>()` bytes (the callers' sizes).
    let bytes = unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, n * std::mem::size_of::<T>())
    };
    o.copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_candle() {
        for t in QuantType::ALL {
            assert_eq!(t.block_bytes(), t.to_candle().type_size(), "{t}");
            assert_eq!(t.block_elems(), t.to_candle().block_size(), "{t}");
            assert_eq!(QuantType::from_ggml_id(t.ggml_id()), Some(t));
            assert_eq!(QuantType::parse(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(QuantType::from_ggml_id(15), None); // Q8_K: activation-only
        assert_eq!(QuantType::from_ggml_id(16), None); // IQ2_XXS
    }

    #[test]
    fn fp8_tables() {
        let e4 = Fp8Kind::E4M3.table();
        assert_eq!(e4[0x7E], 448.0);
        assert_eq!(e4[0x38], 1.0);
        assert_eq!(e4[0x01], 2f32.powi(-9));
        assert!(e4[0x7F].is_nan() && e4[0xFF].is_nan());
        assert_eq!(e4[0xB8], -1.0);
        let e5 = Fp8Kind::E5M2.table();
        assert_eq!(e5[0x3C], 1.0);
        assert_eq!(e5[0x7B], 57344.0);
        assert!(e5[0x7C].is_infinite());
        // candle's float8 crate agrees on every E4M3 byte
        for b in 0..=255u8 {
            let c = float8_ref(b);
            assert!(
                c.to_bits() == e4[b as usize].to_bits() || (c.is_nan() && e4[b as usize].is_nan()),
                "{b:#x}"
            );
        }
    }

    fn float8_ref(b: u8) -> f32 {
        let dev = candle::Device::Cpu;
        let t = candle::Tensor::from_raw_buffer(&[b], candle::DType::F8E4M3, &[1], &dev).unwrap();
        t.to_dtype(candle::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn quantize_round_trip_is_close() {
        let v: Vec<f32> = (0..512 * 2)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
            .collect();
        for t in QuantType::ALL {
            let q = quantize(t, &v, 512).unwrap();
            assert_eq!(q.len(), t.bytes_for(v.len(), 512).unwrap());
            let d = dequantize(t, &q, v.len()).unwrap();
            let err = v
                .iter()
                .zip(&d)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bound = match t {
                QuantType::F32 => 0.0,
                QuantType::Q2_K => 0.2,
                QuantType::Q3_K => 0.1,
                QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4_K => 0.07,
                QuantType::Q8_0 | QuantType::F16 | QuantType::BF16 => 0.005,
                _ => 0.04,
            };
            assert!(err <= bound, "{t}: max error {err}");
        }
    }

    #[test]
    fn fp8_encoding_round_trips() {
        let v: Vec<f32> = (0..600)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0)
            .collect();
        for kind in [Fp8Kind::E4M3, Fp8Kind::E5M2] {
            let w = PackedWeight::encode(Encoding::Fp8(kind), &v, 6, 100).unwrap();
            assert_eq!(w.scale().len(), 1);
            let d = w.dequantize().unwrap();
            for (a, b) in v.iter().zip(&d) {
                // 3 (E4M3) or 2 (E5M2) mantissa bits: relative error ≤ 2⁻⁴ / 2⁻³
                let rel = if kind == Fp8Kind::E4M3 { 0.0625 } else { 0.125 };
                assert!(
                    (a - b).abs() <= rel * a.abs() + 1e-3,
                    "{kind:?}: {a} -> {b}"
                );
            }
            // exactly representable values come back exactly
            let m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(d[v.iter().position(|x| x.abs() == m).unwrap()].abs(), m);
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(dequantize(QuantType::Q8_0, &[0u8; 33], 32).is_err());
        assert!(dequantize(QuantType::Q4_K, &[0u8; 144], 255).is_err());
        assert!(quantize(QuantType::Q4_K, &[0.0; 128], 128).is_err());
        assert!(fp8_into(Fp8Kind::E4M3, &[0u8; 6], &[1.0; 4], &mut [0.0; 6]).is_err());
    }
}
