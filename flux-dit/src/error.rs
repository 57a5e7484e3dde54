//! The error type of flux-dit.

use candle::DType;
use flux_kernels::preview;

/// Errors of flux-dit. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration that breaks an invariant of the model.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A checkpoint that cannot be read or does not fit the model (missing, unexpected or
    /// misshapen tensors, corrupt files, unsupported tensor types).
    #[error(transparent)]
    Load(#[from] flux_kernels::LoadError),
    /// A file that holds no FLUX transformer at all.
    #[error("{source_desc} does not look like a FLUX transformer in the {layout} layout (its keys look like: {})", preview(sample_keys))]
    NotAFluxTransformer {
        /// Which checkpoint.
        source_desc: String,
        /// The layout tried.
        layout: &'static str,
        /// A few of the file's keys.
        sample_keys: Vec<String>,
    },
    /// A model input with the wrong rank or shape.
    #[error("input `{name}` has shape {got:?}, expected {expected}")]
    InputShape {
        /// Which `DitInput` field.
        name: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A guidance-distilled model (dev) called without guidance.
    #[error("this model has a guidance embedder (FLUX.1-dev family) and needs `guidance`; none was given")]
    MissingGuidance,
    /// A dtype the model does not run in.
    #[error("unsupported dtype {dtype:?} for {what} (supported: f32, bf16, f16)")]
    UnsupportedDtype {
        /// What was asked.
        what: &'static str,
        /// The dtype.
        dtype: DType,
    },
    /// An error from the shared ops.
    #[error(transparent)]
    Kernels(flux_kernels::Error),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

impl From<flux_kernels::Error> for Error {
    fn from(e: flux_kernels::Error) -> Self {
        use flux_kernels::Error as K;
        match e {
            K::Load(e) => Error::Load(e),
            K::UnsupportedDtype { what, dtype } => Error::UnsupportedDtype { what, dtype },
            K::Candle(e) => Error::Candle(e),
            e => Error::Kernels(e),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
