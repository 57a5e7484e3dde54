#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod config;
mod error;
mod image;
mod model;
mod tiled;
mod weights;

pub use config::{Config, DiffusersConfig};
pub use error::{Error, Result};
pub use flux_kernels::LoadError;
pub use image::{from_rgb8, to_rgb8, ByteRounding, Rgb8};
pub use model::{AttnBlock, AutoEncoder, Decoder, Downsample, Encoder, ResnetBlock, Upsample};
pub use tiled::TileOptions;
pub use weights::{
    bfl_tensor_shapes, diffusers_recipe, diffusers_tensor_shapes, Layout, Recipe, Weights,
};
