//! The pre-LayerNorm transformer encoder layer that CLIP's text model and SigLIP's vision model
//! share (transformers' `CLIPEncoderLayer` / `SiglipEncoderLayer`: the same tensor names),
//! differing only in the MLP's activation and CLIP's causal mask.

use candle::Tensor;
use flux_kernels::{attention, layer_norm, AttnOpts, Linear};

use crate::Result;

/// LayerNorm with weight and bias.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(x, self.eps)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// `x + attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`.
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: Norm,
    layer_norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

/// The MLP's activation.
pub(crate) type Activation = fn(&Tensor) -> flux_kernels::Result<Tensor>;

impl EncoderLayer {
    /// The layer under `p` (`…encoder.layers.{i}`), width `d`, MLP width `f`: `lin(name, in,
    /// out)` and `norm(name)` read the checkpoint.
    pub fn load(
        p: &str,
        d: usize,
        f: usize,
        lin: impl Fn(&str, usize, usize) -> Result<Linear>,
        norm: impl Fn(&str) -> Result<Norm>,
    ) -> Result<Self> {
        Ok(EncoderLayer {
            q_proj: lin(&format!("{p}.self_attn.q_proj"), d, d)?,
            k_proj: lin(&format!("{p}.self_attn.k_proj"), d, d)?,
            v_proj: lin(&format!("{p}.self_attn.v_proj"), d, d)?,
            out_proj: lin(&format!("{p}.self_attn.out_proj"), d, d)?,
            layer_norm1: norm(&format!("{p}.layer_norm1"))?,
            layer_norm2: norm(&format!("{p}.layer_norm2"))?,
            fc1: lin(&format!("{p}.mlp.fc1"), d, f)?,
            fc2: lin(&format!("{p}.mlp.fc2"), f, d)?,
        })
    }

    /// The layer's linear layers under their names below `p`, for adapters.
    pub fn linears_mut(&mut self, p: &str) -> Vec<(String, &mut Linear)> {
        vec![
            (format!("{p}.self_attn.q_proj"), &mut self.q_proj),
            (format!("{p}.self_attn.k_proj"), &mut self.k_proj),
            (format!("{p}.self_attn.v_proj"), &mut self.v_proj),
            (format!("{p}.self_attn.out_proj"), &mut self.out_proj),
            (format!("{p}.mlp.fc1"), &mut self.fc1),
            (format!("{p}.mlp.fc2"), &mut self.fc2),
        ]
    }

    /// Every tensor of the layer under `p`, with its shape.
    pub fn tensor_shapes(p: &str, d: usize, f: usize) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![];
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push((format!("{p}.self_attn.{n}.weight"), vec![d, d]));
            v.push((format!("{p}.self_attn.{n}.bias"), vec![d]));
        }
        for n in ["layer_norm1", "layer_norm2"] {
            v.push((format!("{p}.{n}.weight"), vec![d]));
            v.push((format!("{p}.{n}.bias"), vec![d]));
        }
        v.push((format!("{p}.mlp.fc1.weight"), vec![f, d]));
        v.push((format!("{p}.mlp.fc1.bias"), vec![f]));
        v.push((format!("{p}.mlp.fc2.weight"), vec![d, f]));
        v.push((format!("{p}.mlp.fc2.bias"), vec![d]));
        v
    }

    /// The layer on `x` `(B, L, D)` with `heads` attention heads.
    pub fn forward(
        &self,
        x: &Tensor,
        heads: usize,
        causal: bool,
        act: Activation,
    ) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, heads, d / heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let n = self.layer_norm1.forward(x)?;
        let (q, k, v) = (
            split(self.q_proj.forward(&n)?)?,
            split(self.k_proj.forward(&n)?)?,
            split(self.v_proj.forward(&n)?)?,
        );
        let a = attention(
            &q,
            &k,
            &v,
            AttnOpts {
                causal,
                ..Default::default()
            },
        )?;
        let a = a.transpose(1, 2)?.reshape((b, l, d))?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let n = self.layer_norm2.forward(&x)?;
        Ok((&x + self.fc2.forward(&act(&self.fc1.forward(&n)?)?)?)?)
    }
}
