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
    /// A checkpoint lacks a tensor the model needs.
    #[error("missing tensor `{name}` in {source_desc}")]
    MissingTensor {
        /// Key in the checkpoint.
        name: String,
        /// Which checkpoint.
        source_desc: String,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Key in the checkpoint.
        name: String,
        /// The shape the config requires.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A checkpoint holds tensors the model does not use.
    #[error("{} unexpected tensor(s) in {source_desc}: {}", names.len(), names.iter().take(8).cloned().collect::<Vec<_>>().join(", "))]
    UnexpectedTensors {
        /// The unused keys, sorted.
        names: Vec<String>,
        /// Which checkpoint.
        source_desc: String,
    },
    /// A checkpoint file that cannot be read or parsed.
    #[error("cannot read checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
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
            K::MissingTensor { name, source_desc } => Error::MissingTensor { name, source_desc },
            K::TensorShape {
                name,
                expected,
                got,
            } => Error::ShapeMismatch {
                name,
                expected,
                got,
            },
            K::Checkpoint { path, reason } => Error::Checkpoint { path, reason },
            K::UnsupportedDtype { what, dtype } => Error::UnsupportedDtype {
                what,
                dtype,
                why: "supported: f32, bf16",
            },
            K::UnexpectedTensors { names, source_desc } => {
                Error::UnexpectedTensors { names, source_desc }
            }
            K::Candle(e) => Error::Candle(e),
            e => Error::Kernels(e),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
