#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod error;
pub mod noise;

pub use error::{Error, Result};
pub use noise::{latent_shape, seeded_noise, torch_randn, NoiseDtype, NoiseOptions, SizeRounding, TorchCpuKernel, TorchGenerator};
