#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod error;
mod euler;
pub mod noise;
mod sample;
mod schedule;
mod timestep;

pub use error::{Error, Result};
pub use euler::{euler_step, img2img_start_index, noise_latents, true_cfg, Reference};
pub use noise::{
    latent_shape, seeded_noise, seeded_noise_with, torch_randn, NoiseDtype, NoiseOptions,
    SizeRounding, TorchCpuKernel, TorchGenerator,
};
pub use sample::{sample, sample_with, step_infos, Denoiser, SampleOptions, StepInfo};
pub use schedule::{diffusers_sigmas, schedule, validate_schedule, ShiftParams};
pub use timestep::{
    embedded_guidance, embedded_timestep, model_guidance, model_timestep, round_bf16,
    TimestepRounding,
};
