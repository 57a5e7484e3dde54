//! The error type of flux-dit.

/// Errors of this crate. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor the model needs is absent from the checkpoint.
    #[error("missing tensor `{name}`")]
    MissingTensor {
        /// Checkpoint key.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Checkpoint key or input name.
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// A configuration that breaks an invariant of the model.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A dtype this crate does not support here.
    #[error("unsupported dtype {0:?}")]
    UnsupportedDtype(candle::DType),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
