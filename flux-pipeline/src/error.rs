//! The error type of flux-pipeline.

/// Errors of the pipeline. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An invalid generation request (size, steps, prompt, …).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An error from the sampler.
    #[error(transparent)]
    Sampler(#[from] flux_sampler::Error),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
