#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod config;
mod convert;
mod error;
mod lora;
mod model;
mod pack;
mod weights;

pub use config::{Config, DiffusersConfig};
pub use convert::{convert_to_gguf, gguf_type_for, llama_file_type, ConvertReport};
pub use error::{Error, Result};
pub use flux_kernels::AngleMode;
pub use flux_kernels::LoadError;
pub use lora::{Lora, LoraFormat, LoraMode, LoraOptions, LoraReport, LoraSet};
pub use model::{
    timestep_embedding, DitInput, DoubleStreamBlock, Flux, FluxOptions, LastLayer, MlpEmbedder,
    Modulation, ModulationOut, QkNorm, SingleStreamBlock,
};
pub use pack::{img_ids, pack, txt_ids, unpack};
pub use weights::{
    bfl_tensor_shapes, diffusers_recipe, diffusers_tensor_shapes, Layout, Recipe, Weights,
};

/// The workspace README's Rust examples, run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadmeDoctests;
