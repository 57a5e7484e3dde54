#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod clip;
mod encoder;
mod error;
mod prompt;
mod siglip;
mod t5;
mod tokenizer;

pub use clip::{ClipConfig, ClipOutput, ClipTextModel};
pub use error::{Error, Result};
pub use flux_kernels::LoadError;
pub use prompt::{PromptEmbeds, PromptEncoder};
pub use siglip::{ReduxEmbedder, SiglipVisionConfig, SiglipVisionModel};
pub use t5::{llama_name as llama_t5_name, relative_position_bucket, T5Config, T5Encoder};
pub use tokenizer::{
    ClipTokenizer, T5Tokenizer, Tokenized, CLIP_BOS, CLIP_EOS, CLIP_MAX_LEN, T5_EOS, T5_PAD,
};
