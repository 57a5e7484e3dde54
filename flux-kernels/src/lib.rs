#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod alloc;
mod attention;
mod attention_cpu;
mod checkpoint;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod fused_cpu;
pub mod gguf;
mod linear;
pub mod lora;
mod ops;
mod quant;
mod rope;
mod switch;

pub use alloc::ReuseAlloc;
pub use attention::{
    attention, attention_composite, attention_tokens, flash_kernel, set_flash_kernel,
    softmax_last_dim, AttnOpts, FlashKernel,
};
pub use checkpoint::{
    read_text, shard_names, sharded_files, Checkpoint, StoredType, MAX_CONFIG_BYTES,
};
#[cfg(feature = "cuda")]
pub use cuda::{has_hopper_kernel, last_flash_kernel, set_flash_config, warm_up as warm_up_cuda};
pub use error::{over_limit, preview, Error, LoadError, Result};
pub use linear::{
    cuda_linear, fp8_gemm_calls, set_cuda_linear, set_quant_matmul, CudaLinear, Linear,
    LinearWeight, QuantMatmul, RuntimeDelta,
};
pub use ops::{
    cat_gelu_tanh, fp8_round_tensor, gated_residual, gelu_tanh, group_norm, layer_norm,
    layer_norm_modulate, modulate, quick_gelu, rms_norm, silu,
};
pub use quant::{
    dequantize, dequantize_into, fp8_into, fp8_round, quantize, Encoding, Fp8Kind, PackedWeight,
    QuantType,
};
pub use rope::{apply_rope, qk_norm_rope, rope_table, AngleMode, RopeTable};
