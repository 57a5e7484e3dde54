//! The `Linear` layer every model uses: `y = x·Wᵀ + b`.
//!
//! The weight is kept once, transposed to `(in, out)` row-major at construction. On the CPU in
//! f32 the product runs straight through `gemm` (the kernel candle itself uses) into an output
//! pre-filled with the bias, so the bias costs no extra pass over memory; elsewhere it is a
//! candle matmul plus a broadcast add (the plain twin, also the test oracle).

use candle::{DType, Module, Storage, Tensor};

use crate::{Error, Result};

/// How the weight is stored. Dense today; quantized formats join here, behind the same
/// [`Linear`] interface, so model code never changes.
#[derive(Debug, Clone)]
enum Weight {
    /// `(in, out)`, contiguous.
    DenseT(Tensor),
}

/// A linear layer `y = x·Wᵀ + b` with `W: (out, in)`, as PyTorch stores it.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
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
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(Error::ShapeMismatch {
                    what: "linear bias",
                    expected: vec![out],
                    got: b.dims().to_vec(),
                });
            }
        }
        // Transposing copies once; the (out, in) original is dropped by the caller.
        let wt = transpose(&weight)?;
        Ok(Linear {
            weight: Weight::DenseT(wt),
            bias: bias.map(|b| b.contiguous()).transpose()?,
        })
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::DenseT(w) => (w.dims()[0], w.dims()[1]),
        }
    }

    /// The dense weight as PyTorch lays it out, `(out, in)` (a transposed view).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::DenseT(w) => Ok(w.t()?),
        }
    }

    /// The bias, `(out)`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
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
        let y = match self.forward_cpu_f32(&x2, rows)? {
            Some(y) => y,
            None => self.forward_plain(&x2)?,
        };
        Ok(y.reshape(shape)?)
    }

    /// The plain candle twin: `x·Wᵀ` then `+ b` (on CUDA the bias add is one fused kernel pass).
    ///
    /// # Shapes
    /// `x`: `(rows, in)`. Returns `(rows, out)`.
    pub fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let Weight::DenseT(wt) = &self.weight;
        let y = x.matmul(wt)?;
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

    /// The fused CPU f32 path, when `x`, the weight and the bias are contiguous f32 on the CPU.
    fn forward_cpu_f32(&self, x: &Tensor, rows: usize) -> Result<Option<Tensor>> {
        let Weight::DenseT(wt) = &self.weight;
        if !x.device().is_cpu() || x.dtype() != DType::F32 || wt.dtype() != DType::F32 {
            return Ok(None);
        }
        if self.bias.as_ref().is_some_and(|b| b.dtype() != DType::F32) {
            return Ok(None);
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
        {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = wt.storage_and_layout();
            let (Storage::Cpu(xc), Storage::Cpu(wc)) = (&*xs, &*ws) else {
                return Ok(None);
            };
            let (Ok(xv), Ok(wv)) = (xc.as_slice::<f32>(), wc.as_slice::<f32>()) else {
                return Ok(None);
            };
            let (Some((x0, x1)), Some((w0, w1))) =
                (xl.contiguous_offsets(), wl.contiguous_offsets())
            else {
                return Ok(None);
            };
            let (xv, wv) = (&xv[x0..x1], &wv[w0..w1]);
            let threads = candle::utils::get_num_threads();
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: dst is rows×out, xv rows×inp, wv inp×out, all row-major and in bounds;
            // the strides below describe exactly those layouts.
            unsafe {
                gemm::gemm(
                    rows,
                    out,
                    inp,
                    dst.as_mut_ptr(),
                    1,
                    out as isize,
                    self.bias.is_some(),
                    xv.as_ptr(),
                    1,
                    inp as isize,
                    wv.as_ptr(),
                    1,
                    out as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        Ok(Some(Tensor::from_vec(dst, (rows, out), x.device())?))
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
