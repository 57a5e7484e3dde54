//! The error type of flux-vae.

use candle::DType;
use std::path::PathBuf;

/// Errors of flux-vae. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration that breaks an invariant of the model.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A checkpoint lacks a tensor the model needs.
    #[error("missing tensor `{name}` in {source_desc}")]
    MissingTensor {
        /// Key in the checkpoint's own layout.
        name: String,
        /// Which checkpoint.
        source_desc: String,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Key in the checkpoint's own layout.
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
    /// A file that holds no FLUX autoencoder.
    #[error("{source_desc} does not look like a FLUX autoencoder in the {layout} layout (its keys look like: {})", sample_keys.join(", "))]
    NotAnAutoencoder {
        /// Which checkpoint.
        source_desc: String,
        /// The layout tried.
        layout: &'static str,
        /// A few of the file's keys.
        sample_keys: Vec<String>,
    },
    /// A checkpoint file that cannot be read or parsed.
    #[error("cannot read checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An image or latent with the wrong rank, channel count or size.
    #[error("{name} has shape {got:?}, expected {expected}")]
    InputShape {
        /// Which input.
        name: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The shape given.
        got: Vec<usize>,
    },
    /// NaN or infinite values in an input or output.
    #[error("{what} contains {nan} NaN and {inf} infinite value(s)")]
    NonFinite {
        /// Which tensor.
        what: &'static str,
        /// NaN count.
        nan: usize,
        /// ±inf count.
        inf: usize,
    },
    /// A dtype the model does not run in.
    #[error("unsupported dtype {dtype:?} for {what} (supported: f32, bf16, f16)")]
    UnsupportedDtype {
        /// What was asked.
        what: &'static str,
        /// The dtype.
        dtype: DType,
    },
    /// Invalid tiling or conversion options.
    #[error("invalid option: {0}")]
    InvalidOption(String),
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
            K::UnsupportedDtype { what, dtype } => Error::UnsupportedDtype { what, dtype },
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
