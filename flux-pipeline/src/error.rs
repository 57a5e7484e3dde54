//! The error type of flux-pipeline.

use std::path::PathBuf;

/// Errors of the pipeline. Every variant names what was wrong; [`Error::hint`] says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An invalid generation request (size, steps, prompts, seeds, latents).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A model that cannot be located or fetched.
    #[error("{what}")]
    ModelSource {
        /// What is wrong.
        what: String,
        /// What to do about it.
        hint: String,
    },
    /// A file or folder that cannot be read.
    #[error("{}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A file that cannot be written (or a folder that cannot take it).
    #[error("{}: {reason}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A device that this build cannot use.
    #[error("{0}")]
    Device(String),
    /// A stage's output holds NaN or infinite values.
    #[error("the {stage} produced NaN or infinite values")]
    NonFinite {
        /// `T5 text encoder`, `CLIP text encoder` or `transformer` (the autoencoder reports
        /// its own, [`flux_vae::Error`]).
        stage: &'static str,
    },
    /// The job queue (Redis) cannot be reached or answered with an error.
    #[error("job queue: {0}")]
    Queue(String),
    /// The request's [`crate::Cancel`] flag was raised.
    #[error("cancelled")]
    Cancelled,
    /// From the sampler.
    #[error(transparent)]
    Sampler(#[from] flux_sampler::Error),
    /// From the transformer.
    #[error("transformer: {0}")]
    Dit(#[from] flux_dit::Error),
    /// From the autoencoder.
    #[error("autoencoder: {0}")]
    Vae(#[from] flux_vae::Error),
    /// From the text encoders.
    #[error("text encoders: {0}")]
    Text(#[from] flux_text::Error),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

impl Error {
    /// A one-line suggestion for the user, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::ModelSource { hint, .. } => Some(hint.clone()),
            Error::InvalidRequest(m) if m.contains("multiple of 16") => {
                Some("FLUX works on 16-pixel blocks: try 1024x1024, 1360x768 or 512x512".into())
            }
            Error::Dit(
                flux_dit::Error::Load(flux_kernels::LoadError::UnexpectedTensors { .. })
                | flux_dit::Error::NotAFluxTransformer { .. },
            ) => {
                Some("the transformer file does not match the model config (dev vs schnell, or another model)".into())
            }
            Error::Write { .. } => Some("check that the folder exists and is writable".into()),
            Error::NonFinite { stage } => Some(format!(
                "in bf16 try --dtype f32; if it persists, the {stage}'s weights may be corrupt"
            )),
            _ => None,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
