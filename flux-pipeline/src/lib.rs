#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod control;
mod error;
mod output;
mod pipeline;
mod png;
mod preview;
mod redux;
mod resize;
#[cfg(feature = "serve")]
pub mod serve;
mod source;
mod task;

pub use control::{canny, canny_control, CANNY_HIGH, CANNY_LOW};
pub use error::{Error, Result};
pub use flux_dit::{Lora, LoraFormat, LoraMode, LoraOptions, LoraSet};
pub use flux_sampler::Reference;
pub use output::{OutputNames, DEFAULT_FILE};
pub use pipeline::{
    available_memory, peak_rss, Cancel, FluxPipeline, GenerateOutput, GenerateRequest, Generated,
    PipelineOptions, Progress, Resident, StageTimes,
};
pub use png::{
    check_writable, file_sha256, plain_png, png_bytes, read_png, remove_partial_files, write_png,
    ImageParams, LoraParam, ReadPng, PARAMS_KEY,
};
pub use preview::latent_preview;
pub use redux::Redux;
pub use resize::{resize, Filter};
pub use source::{
    scheduler_shift, Components, FileRef, MemoryEstimate, ModelFiles, ModelSource,
    TransformerFiles, VaeFiles, DEV_REPO, SCHNELL_REPO,
};
pub use task::{kontext_size, outpaint, InitImage, KONTEXT_RESOLUTIONS};
