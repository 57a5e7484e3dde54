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
    /// Invalid op parameters (odd RoPE axis, axes not summing to the head dim, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
