//! The `Linear` layer every model uses: `y = x·Wᵀ + b`, for every weight encoding.
//!
//! A dense weight is kept once, transposed to `(in, out)` row-major at construction. A packed
//! weight (GGUF blocks, fp8) stays packed and is decoded for each product: on the CPU in
//! parallel into an f32 scratch buffer, on other devices by candle's dequantization kernels
//! (GGUF) or a 256-entry table (fp8). On the CPU in f32 the product runs straight through
//! `gemm` (the kernel candle itself uses) into an output pre-filled with the bias, so the bias
//! costs no extra pass over memory; elsewhere it is a candle matmul plus a bias add (the plain
//! twin, also the test oracle).

use std::sync::Arc;

use candle::quantized::{QStorage, QTensor};
use candle::{DType, Device, Module, Storage, Tensor};

use crate::quant::{Encoding, PackedWeight};
use crate::{Error, Result};

/// A weight as a checkpoint gives it to [`Linear::from_weight`].
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense `(out, in)` tensor.
    Dense(Tensor),
    /// A packed `(out, in)` weight (GGUF blocks or fp8), kept packed.
    Packed(PackedWeight),
}

impl LinearWeight {
    /// The weight encoded into `enc` (`--quantize`) when it is dense and its rows are whole
    /// blocks of that type; otherwise (already packed, rows not whole blocks, `None`) as it is.
    pub fn encoded(self, enc: Option<Encoding>) -> Result<Self> {
        let (Some(enc), LinearWeight::Dense(t)) = (enc, &self) else {
            return Ok(self);
        };
        let (out, inp) = t.dims2()?;
        if matches!(enc, Encoding::Gguf(ty) if inp % ty.block_elems() != 0) {
            return Ok(self);
        }
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(LinearWeight::Packed(PackedWeight::encode(
            enc, &v, out, inp,
        )?))
    }
}

impl LinearWeight {
    /// The weight as an fp8 GEMM takes it ([`Linear::set_fp8_gemm`]): e4m3 with at most one
    /// scale. A dense weight is encoded (one scale, max |w| onto 448); an fp8 weight of the
    /// other kind or with a scale per row is decoded and encoded so; an e4m3 weight with one
    /// scale (or none) is kept as the file has it. GGUF weights stay as they are (their layers
    /// then multiply as before).
    pub fn for_fp8_gemm(self) -> Result<Self> {
        let e4m3 = Encoding::Fp8(crate::Fp8Kind::E4M3);
        match self {
            LinearWeight::Packed(p) if p.encoding() == e4m3 && p.scale().len() <= 1 => {
                Ok(LinearWeight::Packed(p))
            }
            LinearWeight::Packed(p) if matches!(p.encoding(), Encoding::Fp8(_)) => {
                let (out, inp) = p.dims();
                Ok(LinearWeight::Packed(PackedWeight::encode(
                    e4m3,
                    &p.dequantize()?,
                    out,
                    inp,
                )?))
            }
            w @ LinearWeight::Packed(_) => Ok(w),
            w => w.encoded(Some(e4m3)),
        }
    }
}

/// How packed GGUF weights are multiplied on the CPU (see [`set_quant_matmul`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMatmul {
    /// Decode each weight into f32 for each product and run the f32 GEMM: weights stay at
    /// their file size in memory. The default.
    #[default]
    Decode,
    /// candle's integer kernels (activations quantized to 8 bits, integer dot products on
    /// repacked weight tiles) for the types it has fast CPU kernels for here: Q4_K and Q6_K
    /// with AVX2, Q8_0 with AVX-VNNI or AVX512-VNNI. Faster on such CPUs, but candle keeps the
    /// repacked tiles beside the original blocks: about twice the weight memory. Other types
    /// decode.
    Integer,
}

/// How [`Linear`] multiplies on CUDA (process-wide; see [`set_cuda_linear`]). CPU tensors never
/// look at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaLinear {
    /// One cuBLASLt call per layer with the bias (and, for [`Linear::forward_gelu`], the
    /// GELU-tanh) in the product's epilogue; the plan (descriptors and the algorithm cuBLASLt's
    /// heuristic picks) is made once per shape and kept. The default.
    #[default]
    CublasLt,
    /// [`CudaLinear::CublasLt`], with the algorithm of each shape chosen by timing the
    /// heuristic's first eight on the first call's operands (a few milliseconds per shape, once
    /// per process) instead of taking its first.
    CublasLtTuned,
    /// candle's cuBLAS product, then our bias kernel and a separate GELU pass: the plain twin
    /// the cuBLASLt path is checked against.
    Cublas,
}

impl CudaLinear {
    /// The environment variable that chooses it before the first product.
    pub const ENV: &'static str = "FLUX_CUDA_LINEAR";

    /// The name `FLUX_CUDA_LINEAR` takes.
    pub fn name(self) -> &'static str {
        match self {
            CudaLinear::CublasLt => "cublaslt",
            CudaLinear::CublasLtTuned => "cublaslt-tuned",
            CudaLinear::Cublas => "cublas",
        }
    }
}

impl std::str::FromStr for CudaLinear {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        use CudaLinear::*;
        crate::switch::parse_named(Self::ENV, s, &[CublasLt, CublasLtTuned, Cublas], Self::name)
    }
}

static CUDA_LINEAR: crate::switch::Switch<CudaLinear> = crate::switch::Switch::new(CudaLinear::ENV);

/// Chooses how [`Linear`] multiplies on CUDA from now on (see [`CudaLinear`]).
pub fn set_cuda_linear(policy: CudaLinear) {
    CUDA_LINEAR.set(policy);
}

/// The CUDA product in use: the one [`set_cuda_linear`] chose, else `FLUX_CUDA_LINEAR`, else
/// cuBLASLt. A value of the variable that names neither is an error.
pub fn cuda_linear() -> Result<CudaLinear> {
    CUDA_LINEAR.get()
}

static QUANT_MATMUL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses how [`Linear`]s built from now on multiply packed GGUF weights on the CPU.
pub fn set_quant_matmul(policy: QuantMatmul) {
    QUANT_MATMUL.store(
        policy == QuantMatmul::Integer,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Whether candle's integer kernels are fast for `ty` on this CPU (measured: 2–3× the f32
/// GEMM on AVX512-VNNI for these; the other types run scalar or slower code there).
fn integer_kernels_for(ty: crate::QuantType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let vnni = std::arch::is_x86_feature_detected!("avx512vnni")
            || std::arch::is_x86_feature_detected!("avxvnni");
        match ty {
            crate::QuantType::Q4_K | crate::QuantType::Q6_K => avx2,
            crate::QuantType::Q8_0 => avx2 && vnni,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// How the weight is stored. Model code never sees the difference.
#[derive(Debug, Clone)]
enum Weight {
    /// `(in, out)`, contiguous.
    DenseT(Tensor),
    /// Packed on the host; decoded on the CPU for each product.
    Packed(PackedWeight),
    /// GGUF blocks held by candle, multiplied by its integer kernels (CPU).
    Integer {
        q: Arc<candle::quantized::QMatMul>,
        ty: crate::QuantType,
        dims: (usize, usize),
    },
    /// Packed on another device.
    Device(DevicePacked),
}

#[derive(Debug, Clone)]
enum DevicePacked {
    /// GGUF blocks in candle's device storage; decoded by its dequantization kernels.
    Gguf { q: Arc<QTensor>, dtype: DType },
    /// GGUF blocks (Q8_0, Q4_K, Q6_K) as bytes on a CUDA device, decoded by our kernels into
    /// `dtype` in one pass (candle's go through f16 and a cast).
    #[cfg(feature = "cuda")]
    CudaGguf {
        bytes: Tensor,
        kernel: &'static str,
        ty: crate::QuantType,
        dims: (usize, usize),
        dtype: DType,
    },
    /// fp8 bytes `(out, in)` as u8, the format's value table, and the scale (`()` or `(out, 1)`).
    Fp8 {
        bytes: Tensor,
        table: Tensor,
        scale: Option<Tensor>,
        dtype: DType,
        /// e4m3 with at most one scale: that scale (1 without), what an fp8 GEMM multiplies by
        per_tensor: Option<f32>,
        kind: crate::Fp8Kind,
    },
}

/// A linear layer `y = x·Wᵀ + b` with `W: (out, in)`, as PyTorch stores it.
///
/// Adapters (LoRA and its kin) attach in one of two ways: merged into a dense weight
/// ([`Linear::merge`], the pristine weight kept for [`Linear::restore`]), or applied at run time
/// ([`Linear::set_runtime`]: `y = W·x + b + U·(D·x) + Δ·x + c`, for packed weights or cheap
/// switching).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// The weight and bias as loaded, while a merged adapter replaces them.
    original: Option<Box<(Weight, Option<Tensor>)>>,
    runtime: Option<Box<Runtime>>,
    /// Products in fp8 ([`Linear::set_fp8_gemm`]).
    fp8_gemm: bool,
}

/// A run-time adapter of one [`Linear`], already scaled: `y += U·(D·x) + Δ·x + c`.
///
/// The low-rank parts of every adapter on the layer are stacked, so the extra cost is two thin
/// products per call whatever the number of adapters; `dense` carries what is not low-rank
/// (LoKr, LoHa, full diffs, DoRA's rescaling).
#[derive(Debug, Clone)]
pub struct RuntimeDelta {
    /// `D`: `(R, in)`, the down factors stacked (`R` = the sum of their ranks).
    pub down: Option<Tensor>,
    /// `U`: `(out, R)`, the up factors scaled by strength × the format's scale, each placed at
    /// the rows its adapter targets (zeros elsewhere).
    pub up: Option<Tensor>,
    /// `Δ`: `(out, in)`.
    pub dense: Option<Tensor>,
    /// `c`: `(out)`.
    pub bias: Option<Tensor>,
}

/// [`RuntimeDelta`] transposed for the products, in the activations' dtype on the device.
#[derive(Debug, Clone)]
struct Runtime {
    /// `(in, R)` and `(R, out)`.
    low_rank: Option<(Tensor, Tensor)>,
    /// `(in, out)`.
    dense_t: Option<Tensor>,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a dense `(out, in)` weight and an optional `(out)` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.rank() != 2 {
            return Err(Error::RankMismatch {
                what: "linear weight (out, in)",
                expected: 2,
                got: weight.dims().to_vec(),
            });
        }
        let out = weight.dim(0)?;
        check_bias(bias.as_ref(), out)?;
        // Transposing copies once; the (out, in) original is dropped by the caller.
        let wt = transpose(&weight)?;
        Ok(Linear {
            weight: Weight::DenseT(wt),
            bias: bias.map(|b| b.contiguous()).transpose()?,
            original: None,
            runtime: None,
            fp8_gemm: false,
        })
    }

    /// From a checkpoint's weight: dense as [`Linear::new`]; packed weights stay packed, on
    /// `device`, and are decoded to `dtype` (the activations' dtype) for each product.
    pub fn from_weight(
        weight: LinearWeight,
        bias: Option<Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let w = match weight {
            LinearWeight::Dense(w) => return Self::new(w, bias),
            LinearWeight::Packed(w) => w,
        };
        let (out, _) = w.dims();
        check_bias(bias.as_ref(), out)?;
        let integer = match w.encoding() {
            Encoding::Gguf(t)
                if QUANT_MATMUL.load(std::sync::atomic::Ordering::Relaxed)
                    && integer_kernels_for(t) =>
            {
                Some(t)
            }
            _ => None,
        };
        let weight = if let (true, Some(ty)) = (device.is_cpu(), integer) {
            let (o, i) = w.dims();
            let storage = QStorage::from_data(
                std::borrow::Cow::Borrowed(w.bytes()),
                device,
                ty.to_candle(),
            )?;
            let q = candle::quantized::QMatMul::from_qtensor(QTensor::new(storage, (o, i))?)?;
            Weight::Integer {
                q: Arc::new(q),
                ty,
                dims: (i, o),
            }
        } else if device.is_cpu() {
            Weight::Packed(w)
        } else {
            Weight::Device(DevicePacked::new(&w, device, dtype)?)
        };
        Ok(Linear {
            weight,
            bias: bias.map(|b| b.contiguous()).transpose()?,
            original: None,
            runtime: None,
            fp8_gemm: false,
        })
    }

    /// A layer that multiplies in fp8 ([`Linear::set_fp8_gemm`]) from a checkpoint's weight:
    /// the weight made e4m3 with one scale as [`LinearWeight::for_fp8_gemm`] says, a dense
    /// weight already on a CUDA device encoded there (the same rounding, by the activations'
    /// quantization kernel). GGUF weights give an ordinary layer.
    pub fn from_weight_fp8(
        weight: LinearWeight,
        bias: Option<Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let LinearWeight::Dense(w) = &weight {
            if device.is_cuda() && w.rank() == 2 {
                let (out, inp) = w.dims2()?;
                check_bias(bias.as_ref(), out)?;
                let w = w.to_device(device)?.contiguous()?;
                let q = w.apply_op1_no_bwd(&crate::cuda::Fp8Quantize { round: false })?;
                let head = q.narrow(0, 0, 4)?.to_vec1::<u8>()?;
                let scale = f32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let bytes = q
                    .narrow(0, crate::cuda::FP8_HEADER, out * inp)?
                    .reshape((out, inp))?;
                let kind = crate::Fp8Kind::E4M3;
                return Ok(Linear {
                    weight: Weight::Device(DevicePacked::Fp8 {
                        bytes,
                        table: Tensor::from_slice(kind.table(), 256, device)?,
                        scale: Some(Tensor::new(scale, device)?),
                        dtype,
                        per_tensor: Some(scale),
                        kind,
                    }),
                    bias: bias.map(|b| b.contiguous()).transpose()?,
                    original: None,
                    runtime: None,
                    fp8_gemm: true,
                });
            }
        }
        let mut linear = Self::from_weight(weight.for_fp8_gemm()?, bias, device, dtype)?;
        linear.set_fp8_gemm(true);
        Ok(linear)
    }

    /// Like [`Linear::from_weight`], but decodes through the path other devices use (candle's
    /// dequantization, the fp8 table as a tensor) even on the CPU: for tests of that path.
    #[doc(hidden)]
    pub fn from_weight_device_path(
        weight: PackedWeight,
        bias: Option<Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Linear {
            weight: Weight::Device(DevicePacked::new(&weight, device, dtype)?),
            bias: bias.map(|b| b.contiguous()).transpose()?,
            original: None,
            runtime: None,
            fp8_gemm: false,
        })
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::DenseT(w) => (w.dims()[0], w.dims()[1]),
            Weight::Packed(p) => (p.dims().1, p.dims().0),
            Weight::Integer { dims, .. } => *dims,
            Weight::Device(d) => d.dims(),
        }
    }

    /// How the weight is stored: `"dense"`, or the packed encoding (`Q4_K`, `float8_e4m3fn`).
    pub fn encoding(&self) -> String {
        if self.fp8_gemm {
            return "float8_e4m3fn (fp8 GEMM)".into();
        }
        match &self.weight {
            Weight::DenseT(w) => format!("dense {:?}", w.dtype()),
            Weight::Packed(p) => p.encoding().to_string(),
            Weight::Integer { ty, .. } => format!("{ty} (integer kernels)"),
            Weight::Device(DevicePacked::Gguf { q, .. }) => format!("{:?}", q.dtype()),
            Weight::Device(DevicePacked::Fp8 { kind, .. }) => kind.name().into(),
            #[cfg(feature = "cuda")]
            Weight::Device(DevicePacked::CudaGguf { ty, .. }) => ty.to_string(),
        }
    }

    /// The weight as PyTorch lays it out, `(out, in)`: a transposed view of a dense weight, or
    /// a packed one decoded (in the bias' dtype, else f32).
    pub fn weight(&self) -> Result<Tensor> {
        let dtype = self.bias.as_ref().map_or(DType::F32, |b| b.dtype());
        self.decoded(dtype)
    }

    /// The `(out, in)` weight: a view of a dense one, a packed one decoded to `dtype`.
    fn decoded(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            Weight::DenseT(w) => Ok(w.t()?),
            Weight::Packed(p) => {
                let (o, i) = p.dims();
                Ok(Tensor::from_vec(p.dequantize()?, (o, i), &Device::Cpu)?.to_dtype(dtype)?)
            }
            Weight::Integer { q, .. } => Ok(q.dequantize_f16()?.to_dtype(dtype)?),
            Weight::Device(d) => d.decode(),
        }
    }

    /// The `(in, out)` weight for the plain path, decoded to `dtype` when packed.
    fn weight_t(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            Weight::DenseT(w) => Ok(w.clone()),
            _ => Ok(self.decoded(dtype)?.t()?),
        }
    }

    /// Multiplies in fp8 from now on (`on`), or as before (`!on`): the activations quantized to
    /// e4m3 with one scale for the tensor right before each product, the weight e4m3 with its
    /// one scale (see [`LinearWeight::for_fp8_gemm`]). On CUDA, for bf16/f16 activations, that
    /// is one cuBLASLt fp8 GEMM (fast accumulation, the activations' dtype out, the bias and
    /// GELU in its epilogue) after one quantization kernel; elsewhere, and for shapes cuBLASLt
    /// has no fp8 algorithm for, the same rounding is emulated (the decoded values through the
    /// ordinary product; the oracle of the CUDA path, slower than without fp8 on a CPU).
    /// Run-time adapters add their terms from the unrounded activations. Returns whether the
    /// layer multiplies in fp8 now: never for a weight other than e4m3 with at most one scale.
    pub fn set_fp8_gemm(&mut self, on: bool) -> bool {
        let eligible = match &self.weight {
            Weight::Packed(p) => {
                p.encoding() == Encoding::Fp8(crate::Fp8Kind::E4M3) && p.scale().len() <= 1
            }
            Weight::Device(DevicePacked::Fp8 { per_tensor, .. }) => per_tensor.is_some(),
            _ => false,
        };
        self.fp8_gemm = on && eligible;
        self.fp8_gemm
    }

    /// Whether the layer multiplies in fp8 ([`Linear::set_fp8_gemm`]).
    pub fn is_fp8_gemm(&self) -> bool {
        self.fp8_gemm
    }

    /// Whether the weight is dense (adapters can be merged into it).
    pub fn is_dense(&self) -> bool {
        matches!(self.weight, Weight::DenseT(_))
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The dense weight and bias as loaded (before any merge) and their dtype and device.
    fn loaded_dense(&self) -> Result<(&Tensor, Option<&Tensor>)> {
        let (w, b) = match &self.original {
            Some(o) => (&o.0, o.1.as_ref()),
            None => (&self.weight, self.bias.as_ref()),
        };
        match w {
            Weight::DenseT(wt) => Ok((wt, b)),
            _ => Err(Error::InvalidArgument(format!(
                "cannot merge an adapter into a {} weight; apply it at run time",
                self.encoding()
            ))),
        }
    }

    /// Replaces the dense weight `(in, out)` (as `f32` values) and bias, rounding once to the
    /// storage dtype; the loaded ones are kept for [`Linear::restore`] when `keep_original`.
    fn replace_dense(
        &mut self,
        wt: Vec<f32>,
        (inp, out): (usize, usize),
        bias: Option<Tensor>,
        keep_original: bool,
    ) -> Result<()> {
        let (old, old_b) = self.loaded_dense()?;
        let (dtype, device) = (old.dtype(), old.device().clone());
        let bias_dtype = old_b.map_or(dtype, |b| b.dtype());
        let nw = Tensor::from_vec(wt, (inp, out), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)?;
        let nb = bias
            .map(|b| b.to_dtype(bias_dtype)?.to_device(&device)?.contiguous())
            .transpose()?;
        let old = (
            std::mem::replace(&mut self.weight, Weight::DenseT(nw)),
            std::mem::replace(&mut self.bias, nb),
        );
        if keep_original && self.original.is_none() {
            self.original = Some(Box::new(old));
        }
        Ok(())
    }

    /// Merges `delta` into a dense weight, from the weight **as loaded** (whatever was merged
    /// before): `W' = W + U·D + Δ`, `b' = b + c`, computed in f32 (the low-rank part as one
    /// product accumulated into the weight) and rounded once to the storage dtype. A delta
    /// wider than the layer's input pads the weight with zero columns (a control LoRA's
    /// `img_in`). With `keep_original` the loaded weight is kept until [`Linear::restore`],
    /// which puts it back bit for bit (the adapted layer's weight is held twice meanwhile);
    /// without, the merge is for good. A packed weight cannot be merged into (use
    /// [`Linear::set_runtime`]).
    pub fn merge_delta(&mut self, delta: &RuntimeDelta, keep_original: bool) -> Result<()> {
        let (wt, b) = self.loaded_dense()?;
        let (inp, out) = wt.dims2()?;
        let wide = [
            delta
                .down
                .as_ref()
                .map(|d| d.dims().get(1).copied().unwrap_or(0)),
            delta
                .dense
                .as_ref()
                .map(|d| d.dims().get(1).copied().unwrap_or(0)),
        ]
        .into_iter()
        .flatten()
        .fold(inp, usize::max);
        // (in, out) row-major f32, zero rows appended for new inputs
        let mut w = wt.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        w.resize(wide * out, 0.0);
        let cpu32 =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
        match (&delta.down, &delta.up) {
            (Some(dn), Some(up)) => {
                let r = dn.dim(0)?;
                expect_shape("adapter down factors", dn, &[r, wide])?;
                expect_shape("adapter up factors", up, &[out, r])?;
                let dn_t = cpu32(dn)?.t()?.contiguous()?; // (wide, R)
                let up_t = cpu32(up)?.t()?.contiguous()?; // (R, out)
                let x = dn_t.flatten_all()?.to_vec1::<f32>()?;
                with_f32(&up_t, |u| {
                    gemm_into(&mut w, &x, u, (wide, r, out), (out, 1))
                })?;
            }
            (None, None) => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "an adapter needs both its down and its up factors".into(),
                ))
            }
        }
        if let Some(d) = &delta.dense {
            expect_shape("adapter dense delta", d, &[out, wide])?;
            let dt = transpose(&cpu32(d)?)?.flatten_all()?.to_vec1::<f32>()?;
            w.iter_mut().zip(&dt).for_each(|(a, b)| *a += b);
        }
        check_bias(delta.bias.as_ref(), out)?;
        let bias = match (b, &delta.bias) {
            (Some(b), Some(c)) => Some((cpu32(b)? + cpu32(c)?)?),
            (None, Some(c)) => Some(cpu32(c)?),
            (b, None) => b.cloned(),
        };
        self.replace_dense(w, (wide, out), bias, keep_original)
    }

    /// Zero-pads a dense weight to `inp` input columns (no change when it has as many), from
    /// the weight as loaded, kept for [`Linear::restore`] when `keep_original`.
    pub fn pad_inputs(&mut self, inp: usize, keep_original: bool) -> Result<()> {
        if inp <= self.dims().0 {
            return Ok(());
        }
        let (wt, b) = self.loaded_dense()?;
        let (has, out) = wt.dims2()?;
        if inp <= has {
            return Ok(());
        }
        let mut w = wt.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        w.resize(inp * out, 0.0);
        let b = b.cloned();
        self.replace_dense(w, (inp, out), b, keep_original)
    }

    /// Sets (or with `None` removes) the run-time adapter; the weight itself is untouched.
    /// Its tensors are converted to `dtype` (the activations' dtype) on `device`.
    pub fn set_runtime(
        &mut self,
        delta: Option<RuntimeDelta>,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let Some(d) = delta else {
            self.runtime = None;
            return Ok(());
        };
        let (inp, out) = self.dims();
        let prep = |t: &Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(dtype)?.to_device(device)?.t()?.contiguous()?)
        };
        let low_rank = match (&d.down, &d.up) {
            (Some(dn), Some(up)) => {
                let r = dn.dim(0)?;
                expect_shape("adapter down factors", dn, &[r, inp])?;
                expect_shape("adapter up factors", up, &[out, r])?;
                Some((prep(dn)?, prep(up)?))
            }
            (None, None) => None,
            _ => {
                return Err(Error::InvalidArgument(
                    "an adapter needs both its down and its up factors".into(),
                ))
            }
        };
        let dense_t = match &d.dense {
            Some(t) => {
                expect_shape("adapter dense delta", t, &[out, inp])?;
                Some(prep(t)?)
            }
            None => None,
        };
        check_bias(d.bias.as_ref(), out)?;
        let bias = d
            .bias
            .map(|b| b.to_dtype(dtype)?.to_device(device)?.contiguous())
            .transpose()?;
        self.runtime = Some(Box::new(Runtime {
            low_rank,
            dense_t,
            bias,
        }));
        Ok(())
    }

    /// Removes every adapter: the weight and bias as loaded, bit for bit, and no run-time
    /// adapter.
    pub fn restore(&mut self) {
        if let Some(o) = self.original.take() {
            (self.weight, self.bias) = *o;
        }
        self.runtime = None;
    }

    /// Whether an adapter is merged or attached.
    pub fn is_adapted(&self) -> bool {
        self.original.is_some() || self.runtime.is_some()
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// `x`: `(…, in)`. Returns `(…, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (inp, out) = self.dims();
        let dims = x.dims();
        if dims.last() != Some(&inp) {
            return Err(Error::ShapeMismatch {
                what: "linear input (…, in_features)",
                expected: vec![usize::MAX, inp],
                got: dims.to_vec(),
            });
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(out);
        let x2 = x.reshape((rows, inp))?;
        if let (Weight::Integer { q, .. }, DType::F32) = (&self.weight, x.dtype()) {
            let y = candle::Module::forward(&**q, &x2.contiguous()?)?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            return Ok(self.add_runtime(&x2, y)?.reshape(shape)?);
        }
        let y = match self.forward_cpu_f32(&x2, rows)? {
            Some(y) => y,
            None => self.add_runtime(&x2, self.forward_plain(&x2)?)?,
        };
        Ok(y.reshape(shape)?)
    }

    /// `y + U·(D·x) + Δ·x + c` with candle ops (every path but the fused CPU one).
    fn add_runtime(&self, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        let Some(rt) = &self.runtime else {
            return Ok(y);
        };
        if let Some((dn, up)) = &rt.low_rank {
            y = (y + x.matmul(dn)?.matmul(up)?)?;
        }
        if let Some(d) = &rt.dense_t {
            y = (y + x.matmul(d)?)?;
        }
        if let Some(b) = &rt.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// `gelu_tanh(self.forward(x))`, the MLP's first layer. On CUDA (with cuBLASLt, and no
    /// run-time adapter, which adds after the product) the GELU runs in the product's
    /// epilogue.
    ///
    /// # Shapes
    /// `x`: `(…, in)`. Returns `(…, out)`.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.runtime.is_none() && x.device().is_cuda() {
            let (inp, out) = self.dims();
            if x.dims().last() == Some(&inp) {
                let rows = x.elem_count() / inp.max(1);
                let x2 = x.reshape((rows, inp))?;
                if let Some(y) = self.forward_lt(&x2, true)? {
                    let mut shape = x.dims().to_vec();
                    *shape.last_mut().expect("rank ≥ 1") = out;
                    return Ok(y.reshape(shape)?);
                }
            }
        }
        crate::gelu_tanh(&self.forward(x)?)
    }

    /// The cuBLASLt product with its epilogue (bias, GELU) on CUDA; `None` where it does not
    /// apply (CPU, [`CudaLinear::Cublas`], mixed dtypes, a weight format without a dense
    /// device form).
    #[cfg(feature = "cuda")]
    fn forward_lt(&self, x: &Tensor, gelu: bool) -> Result<Option<Tensor>> {
        if !x.device().is_cuda() {
            return Ok(None);
        }
        let tuned = match cuda_linear()? {
            CudaLinear::CublasLt => false,
            CudaLinear::CublasLtTuned => true,
            CudaLinear::Cublas => return Ok(None),
        };
        let dtype = x.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || x.elem_count() == 0 {
            return Ok(None);
        }
        if self.fp8_gemm {
            return self.forward_lt_fp8(x, gelu, tuned);
        }
        let w = match &self.weight {
            Weight::DenseT(wt) => wt.t()?,
            Weight::Device(d) => d.decode()?,
            _ => return Ok(None),
        };
        let bias_ok = self.bias.as_ref().is_none_or(|b| b.dtype() == dtype);
        if w.dtype() != dtype || !w.is_contiguous() || !bias_ok || !w.device().is_cuda() {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let op = crate::cuda::LtLinear {
            gelu,
            tuned,
            fp8: None,
        };
        let y = match &self.bias {
            Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &op),
            None => x.apply_op2_no_bwd(&w, &op),
        };
        match y {
            Ok(y) => Ok(Some(y)),
            // no cuBLASLt algorithm for these operands: the cuBLAS path takes them
            Err(e) if e.to_string().contains(crate::cuda::LT_UNSUPPORTED) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The cuBLASLt fp8 product ([`Linear::set_fp8_gemm`]): `None` where it does not apply (f32
    /// activations, a bias of another dtype, no fp8 algorithm for the shape).
    #[cfg(feature = "cuda")]
    fn forward_lt_fp8(&self, x: &Tensor, gelu: bool, tuned: bool) -> Result<Option<Tensor>> {
        let dtype = x.dtype();
        let Weight::Device(DevicePacked::Fp8 {
            bytes,
            per_tensor: Some(alpha),
            ..
        }) = &self.weight
        else {
            return Ok(None);
        };
        let bias_ok = self.bias.as_ref().is_none_or(|b| b.dtype() == dtype);
        if !matches!(dtype, DType::BF16 | DType::F16) || !bias_ok || !bytes.device().is_cuda() {
            return Ok(None);
        }
        let rows = x.dim(0)?;
        let xq = x
            .contiguous()?
            .apply_op1_no_bwd(&crate::cuda::Fp8Quantize { round: false })?;
        let op = crate::cuda::LtLinear {
            gelu,
            tuned,
            fp8: Some(crate::cuda::LtFp8 {
                rows,
                alpha: *alpha,
                out: dtype,
            }),
        };
        let y = match &self.bias {
            Some(b) => xq.apply_op3_no_bwd(bytes, &b.contiguous()?, &op),
            None => xq.apply_op2_no_bwd(bytes, &op),
        };
        match y {
            Ok(y) => {
                FP8_GEMMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Some(y))
            }
            Err(e) if e.to_string().contains(crate::cuda::LT_UNSUPPORTED) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `x·Wᵀ` then `+ b`, without the run-time adapter: on CUDA one cuBLASLt call with the bias
    /// in its epilogue ([`CudaLinear::CublasLt`]), else candle's product and one bias pass (our
    /// kernel on CUDA), the plain twin.
    ///
    /// # Shapes
    /// `x`: `(rows, in)`. Returns `(rows, out)`.
    pub fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.forward_lt(x, false)? {
            return Ok(y);
        }
        let wt = self.weight_t(x.dtype())?;
        let y = if self.fp8_gemm {
            crate::fp8_round_tensor(x)?.matmul(&wt)?
        } else {
            x.matmul(&wt)?
        };
        Ok(match &self.bias {
            // candle's broadcast add on CUDA costs more than the product itself on wide layers
            #[cfg(feature = "cuda")]
            Some(b)
                if y.device().is_cuda() && b.dtype() == y.dtype() && y.dtype() != DType::F64 =>
            {
                y.apply_op2_no_bwd(b, &crate::cuda::BiasAdd)?
            }
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The fused CPU f32 path, when `x` and the bias are contiguous f32 on the CPU and the
    /// weight is dense f32 or packed (decoded here into an f32 scratch buffer).
    fn forward_cpu_f32(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        if self.bias.as_ref().is_some_and(|b| b.dtype() != DType::F32) {
            return Ok(None);
        }
        if let Some(rt) = &self.runtime {
            let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
            let ok = rt
                .low_rank
                .as_ref()
                .is_none_or(|(d, u)| f32_cpu(d) && f32_cpu(u))
                && rt.dense_t.as_ref().is_none_or(f32_cpu)
                && rt.bias.as_ref().is_none_or(f32_cpu);
            if !ok {
                return Ok(None);
            }
        }
        let x = x.contiguous()?;
        let (inp, out) = self.dims();
        // the output starts as the bias rows (one pass; no zeroing first)
        let mut dst = Vec::with_capacity(rows * out);
        match &self.bias {
            Some(b) => {
                let b = b.to_vec1::<f32>()?;
                for _ in 0..rows {
                    dst.extend_from_slice(&b);
                }
            }
            None => dst.resize(rows * out, 0.0),
        }
        let (xs, xl) = x.storage_and_layout();
        let Storage::Cpu(xc) = &*xs else {
            return Ok(None);
        };
        let (Ok(xv), Some((x0, x1))) = (xc.as_slice::<f32>(), xl.contiguous_offsets()) else {
            return Ok(None);
        };
        let xv = &xv[x0..x1];
        // what the product multiplies: x, or x as fp8 holds it (the adapters take x itself)
        let rounded;
        let xm = if self.fp8_gemm {
            rounded = crate::fp8_round(crate::Fp8Kind::E4M3, xv);
            &rounded[..]
        } else {
            xv
        };
        match &self.weight {
            Weight::DenseT(wt) => {
                if wt.dtype() != DType::F32 {
                    return Ok(None);
                }
                let (ws, wl) = wt.storage_and_layout();
                let Storage::Cpu(wc) = &*ws else {
                    return Ok(None);
                };
                let (Ok(wv), Some((w0, w1))) = (wc.as_slice::<f32>(), wl.contiguous_offsets())
                else {
                    return Ok(None);
                };
                // (in, out) row-major: element (k, n) at k·out + n
                gemm_into(&mut dst, xm, &wv[w0..w1], (rows, inp, out), (out, 1));
            }
            Weight::Packed(p) => {
                let w = p.dequantize()?;
                // (out, in) row-major: element (k, n) at n·in + k
                gemm_into(&mut dst, xm, &w, (rows, inp, out), (1, inp));
            }
            Weight::Device(_) | Weight::Integer { .. } => return Ok(None),
        }
        if let Some(rt) = &self.runtime {
            if let Some((dn, up)) = &rt.low_rank {
                let r = dn.dim(1)?;
                let mut h = vec![0f32; rows * r];
                with_f32(dn, |d| gemm_into(&mut h, xv, d, (rows, inp, r), (r, 1)))?;
                with_f32(up, |u| gemm_into(&mut dst, &h, u, (rows, r, out), (out, 1)))?;
            }
            if let Some(d) = &rt.dense_t {
                with_f32(d, |d| {
                    gemm_into(&mut dst, xv, d, (rows, inp, out), (out, 1))
                })?;
            }
            if let Some(b) = &rt.bias {
                let b = b.to_vec1::<f32>()?;
                for row in dst.chunks_exact_mut(out) {
                    row.iter_mut().zip(&b).for_each(|(y, c)| *y += c);
                }
            }
        }
        drop(xs);
        Ok(Some(Tensor::from_vec(dst, (rows, out), x.device())?))
    }
}

static FP8_GEMMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many products ran as cuBLASLt fp8 GEMMs so far in this process (the rest of the fp8
/// layers' products were emulated; always 0 without CUDA): lets a check prove which path ran.
pub fn fp8_gemm_calls() -> u64 {
    FP8_GEMMS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Calls `f` with the values of a contiguous f32 CPU tensor.
fn with_f32(t: &Tensor, f: impl FnOnce(&[f32])) -> Result<()> {
    let (st, l) = t.storage_and_layout();
    let (Storage::Cpu(c), Some((a, b))) = (&*st, l.contiguous_offsets()) else {
        return Err(Error::InvalidArgument(
            "expected a contiguous CPU tensor".into(),
        ));
    };
    f(&c.as_slice::<f32>()?[a..b]);
    Ok(())
}

/// `shape` or a [`Error::ShapeMismatch`] naming `what`.
fn expect_shape(what: &'static str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dims() != shape {
        return Err(Error::ShapeMismatch {
            what,
            expected: shape.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// `dst (m, n) += x (m, k) · W` with `W`'s element `(k, n)` at `k·rs + n·cs`, through gemm on
/// every candle thread.
fn gemm_into(
    dst: &mut [f32],
    x: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    (rs, cs): (usize, usize),
) {
    assert!(dst.len() == m * n && x.len() == m * k && w.len() == k * n);
    let threads = candle::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst is m×n and x m×k row-major, w holds k×n values at the given strides (all
    // lengths asserted above); the strides below describe exactly those layouts.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            cs as isize,
            rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

impl DevicePacked {
    fn new(w: &PackedWeight, device: &Device, dtype: DType) -> Result<Self> {
        let (out, inp) = w.dims();
        Ok(match w.encoding() {
            #[cfg(feature = "cuda")]
            Encoding::Gguf(t)
                if device.is_cuda() && crate::cuda::Dequant::gguf_kernel(t).is_some() =>
            {
                DevicePacked::CudaGguf {
                    bytes: Tensor::from_slice(w.bytes(), w.bytes().len(), device)?,
                    kernel: crate::cuda::Dequant::gguf_kernel(t).expect("checked"),
                    ty: t,
                    dims: (out, inp),
                    dtype,
                }
            }
            Encoding::Gguf(t) => {
                let storage = QStorage::from_data(
                    std::borrow::Cow::Borrowed(w.bytes()),
                    device,
                    t.to_candle(),
                )?;
                DevicePacked::Gguf {
                    q: Arc::new(QTensor::new(storage, (out, inp))?),
                    dtype,
                }
            }
            Encoding::Fp8(k) => {
                let bytes = Tensor::from_slice(w.bytes(), (out, inp), device)?;
                let table = Tensor::from_slice(k.table(), 256, device)?;
                let scale = match w.scale().len() {
                    0 => None,
                    1 => Some(Tensor::from_slice(w.scale(), (), device)?),
                    _ => Some(Tensor::from_slice(w.scale(), (out, 1), device)?),
                };
                let per_tensor = (k == crate::Fp8Kind::E4M3 && w.scale().len() <= 1)
                    .then(|| w.scale().first().copied().unwrap_or(1.0));
                DevicePacked::Fp8 {
                    bytes,
                    table,
                    scale,
                    dtype,
                    per_tensor,
                    kind: k,
                }
            }
        })
    }

    fn dims(&self) -> (usize, usize) {
        match self {
            DevicePacked::Gguf { q, .. } => {
                let d = q.shape().dims();
                (d[1], d[0])
            }
            DevicePacked::Fp8 { bytes, .. } => (bytes.dims()[1], bytes.dims()[0]),
            #[cfg(feature = "cuda")]
            DevicePacked::CudaGguf { dims, .. } => (dims.1, dims.0),
        }
    }

    /// The `(out, in)` weight decoded on its device.
    fn decode(&self) -> Result<Tensor> {
        match self {
            DevicePacked::Gguf { q, dtype } => Ok(match dtype {
                DType::F32 => q.dequantize(&q.device())?,
                _ => q.dequantize_f16(&q.device())?.to_dtype(*dtype)?,
            }),
            #[cfg(feature = "cuda")]
            DevicePacked::CudaGguf {
                bytes,
                kernel,
                dims,
                dtype,
                ..
            } => Ok(bytes.apply_op1_no_bwd(&crate::cuda::Dequant {
                kernel,
                dims: *dims,
                dtype: *dtype,
                per: 0,
            })?),
            #[cfg(feature = "cuda")]
            DevicePacked::Fp8 {
                bytes,
                table,
                scale,
                dtype,
                kind,
                ..
            } if bytes.device().is_cuda() => {
                let _ = table;
                let op = crate::cuda::Dequant {
                    kernel: match kind {
                        crate::Fp8Kind::E4M3 => "fp8_e4m3",
                        crate::Fp8Kind::E5M2 => "fp8_e5m2",
                    },
                    dims: bytes.dims2()?,
                    dtype: *dtype,
                    per: match scale {
                        None => 0,
                        Some(s) if s.elem_count() == 1 => 1,
                        Some(_) => 2,
                    },
                };
                let bytes = bytes.contiguous()?;
                Ok(match scale {
                    Some(s) => bytes.apply_op2_no_bwd(&s.flatten_all()?.contiguous()?, &op)?,
                    None => bytes.apply_op1_no_bwd(&op)?,
                })
            }
            DevicePacked::Fp8 {
                bytes,
                table,
                scale,
                dtype,
                ..
            } => {
                let (o, i) = bytes.dims2()?;
                let idx = bytes.flatten_all()?.to_dtype(DType::U32)?;
                let w = table.index_select(&idx, 0)?.reshape((o, i))?;
                let w = match scale {
                    Some(s) => w.broadcast_mul(s)?,
                    None => w,
                };
                Ok(w.to_dtype(*dtype)?)
            }
        }
    }
}

/// A bias must be `(out)`.
fn check_bias(bias: Option<&Tensor>, out: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [out] => Err(Error::ShapeMismatch {
            what: "linear bias",
            expected: vec![out],
            got: b.dims().to_vec(),
        }),
        _ => Ok(()),
    }
}

/// `(r, c)` → `(c, r)` contiguous: a cache-blocked copy for CPU f32 (candle's strided copy is
/// several times slower on large weights), candle's otherwise.
fn transpose(w: &Tensor) -> Result<Tensor> {
    let (r, c) = w.dims2()?;
    if !w.device().is_cpu() || w.dtype() != DType::F32 {
        return Ok(w.t()?.contiguous()?);
    }
    let w = w.contiguous()?;
    let src = w.flatten_all()?.to_vec1::<f32>()?;
    let mut dst = vec![0f32; r * c];
    const B: usize = 32;
    for i0 in (0..r).step_by(B) {
        for j0 in (0..c).step_by(B) {
            for i in i0..(i0 + B).min(r) {
                for j in j0..(j0 + B).min(c) {
                    dst[j * r + i] = src[i * c + j];
                }
            }
        }
    }
    Ok(Tensor::from_vec(dst, (c, r), w.device())?)
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        Linear::forward(self, xs).map_err(candle::Error::wrap)
    }
}
