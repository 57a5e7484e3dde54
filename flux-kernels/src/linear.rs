//! The `Linear` layer every model uses: `y = x·Wᵀ + b`.

use candle::{Module, Tensor};

use crate::{Error, Result};

/// How the weight is stored. Dense today; quantized formats join here, behind the same
/// [`Linear`] interface, so model code never changes.
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
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
        Ok(Linear {
            weight: Weight::Dense(weight),
            bias,
        })
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Dense(w) => (w.dims()[1], w.dims()[0]),
        }
    }

    /// The dense weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        match &self.weight {
            Weight::Dense(w) => w,
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
        let Weight::Dense(w) = &self.weight;
        let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(out);
        Ok(y.reshape(shape)?)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        Linear::forward(self, xs).map_err(candle::Error::wrap)
    }
}
