//! The error type of flux-vae.

use candle::DType;

/// Errors of flux-vae. Every variant names what was wrong.
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
            K::Load(e) => Error::Load(e),
            K::UnsupportedDtype { what, dtype } => Error::UnsupportedDtype { what, dtype },
            K::Candle(e) => Error::Candle(e),
            e => Error::Kernels(e),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
