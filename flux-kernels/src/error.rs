//! The error type of flux-kernels.

use candle::DType;

/// Errors of the shared ops. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An input has the wrong shape.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Which input.
        what: &'static str,
        /// The shape (or pattern) required; `usize::MAX` marks a free dimension.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// An input has the wrong rank.
    #[error("{what}: expected rank {expected}, got shape {got:?}")]
    RankMismatch {
        /// Which input.
        what: &'static str,
        /// The rank required.
        expected: usize,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A dtype the op does not support.
    #[error("{what}: unsupported dtype {dtype:?}")]
    UnsupportedDtype {
        /// Which op.
        what: &'static str,
        /// The dtype given.
        dtype: DType,
    },
    /// A checkpoint lacks a tensor.
    #[error("missing tensor `{name}` in {source_desc}")]
    MissingTensor {
        /// Key in the file.
        name: String,
        /// Which checkpoint.
        source_desc: String,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// Key in the file.
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A checkpoint holds tensors the model does not use (a different model or variant).
    #[error("{} unexpected tensor(s) in {source_desc}: {}", names.len(), names.iter().take(8).cloned().collect::<Vec<_>>().join(", "))]
    UnexpectedTensors {
        /// The unused keys, sorted.
        names: Vec<String>,
        /// Which checkpoint.
        source_desc: String,
    },
    /// A checkpoint file that cannot be read or parsed (missing, truncated, corrupt).
    #[error("cannot read checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Invalid op parameters (odd RoPE axis, axes not summing to the head dim, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
