//! The error type of flux-text.

use candle::DType;
use std::path::PathBuf;

/// Errors of flux-text. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tokenizer file that is missing, not UTF-8, or not a tokenizer.
    #[error("tokenizer file {path}: {reason}")]
    TokenizerFile {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer library failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A maximum sequence length outside what the encoder supports.
    #[error("max length {got} is invalid for {what}: must be between {min} and {max}")]
    InvalidMaxLength {
        /// Which tokenizer.
        what: &'static str,
        /// The length asked for.
        got: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed (CLIP: its position embeddings).
        max: usize,
    },
    /// A configuration that breaks an invariant of the model.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A checkpoint that cannot be read or does not fit the model (missing, unexpected or
    /// misshapen tensors, corrupt files, unsupported tensor types).
    #[error(transparent)]
    Load(#[from] flux_kernels::LoadError),
    /// Token ids that do not fit the model (shape, vocabulary, length).
    #[error("input ids: {0}")]
    InvalidIds(String),
    /// A dtype the encoder does not run in (T5 in f16 overflows).
    #[error("unsupported dtype {dtype:?} for {what}: {why}")]
    UnsupportedDtype {
        /// Which model.
        what: &'static str,
        /// The dtype.
        dtype: DType,
        /// Why.
        why: &'static str,
    },
    /// An encoder used after its weights were released.
    #[error("the {0} encoder was unloaded; load it again to encode")]
    Unloaded(&'static str),
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
            K::UnsupportedDtype { what, dtype } => Error::UnsupportedDtype {
                what,
                dtype,
                why: "supported: f32, bf16",
            },
            K::Candle(e) => Error::Candle(e),
            e => Error::Kernels(e),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
