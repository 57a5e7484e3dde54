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
    /// A checkpoint could not be read or does not fit the model.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Invalid op parameters (odd RoPE axis, axes not summing to the head dim, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// Why a checkpoint could not be loaded: the one set of loading errors every model crate
/// reports (each wraps it as its own `Load` variant).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
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
        /// Key in the file (or the keys a tensor is assembled from).
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A checkpoint holds tensors the model does not use (a different model or variant).
    #[error("{} unexpected tensor(s) in {source_desc}: {}", names.len(), preview(names))]
    UnexpectedTensors {
        /// The unused keys, sorted.
        names: Vec<String>,
        /// Which checkpoint.
        source_desc: String,
    },
    /// A tensor stored in a type this workspace cannot use where it is needed.
    #[error("tensor `{name}` is stored as {stored}, which {why}")]
    UnsupportedTensorType {
        /// Key in the file.
        name: String,
        /// The stored type (`F8_E8M0`, `Q4_K`, …).
        stored: String,
        /// What is unsupported about it.
        why: String,
    },
    /// A GGUF file whose header is corrupt or out of range.
    #[error("cannot read GGUF file {path}: {source}")]
    Gguf {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        source: Box<crate::gguf::GgufError>,
    },
    /// A checkpoint file or model folder that cannot be read or parsed (missing, truncated,
    /// corrupt, not a model file).
    #[error("cannot read checkpoint {path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// The first eight names, and how many more there are.
pub fn preview(names: &[String]) -> String {
    let mut s = names.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        s.push_str(&format!(", … ({} more)", names.len() - 8));
    }
    s
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// The first `(name, value, limit)` whose value exceeds its limit, as a message naming the
/// field and the limit (config validation: sizes are bounded before anything is allocated
/// from them).
pub fn over_limit(fields: &[(&str, usize, usize)]) -> Option<String> {
    fields
        .iter()
        .find(|(_, v, max)| v > max)
        .map(|(name, v, max)| format!("{name} {v} is larger than {max}"))
}
