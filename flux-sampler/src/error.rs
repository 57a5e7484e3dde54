//! The error type of flux-sampler.

use candle::DType;

/// Everything that can go wrong in flux-sampler. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A schedule needs at least one step.
    #[error("num_steps must be at least 1, got 0")]
    ZeroSteps,
    /// The image sequence length for the time shift must be positive.
    #[error("image_seq_len must be at least 1, got 0")]
    ZeroSequenceLength,
    /// Shift parameters that do not define a line (equal sequence lengths) or are not finite.
    #[error("invalid shift parameters: {0}")]
    InvalidShift(String),
    /// img2img strength outside [0, 1] or not a number.
    #[error("strength must be a number in [0, 1], got {0}")]
    InvalidStrength(f64),
    /// A guidance or timestep value that is not finite.
    #[error("{what} must be finite, got {value}")]
    NotFinite {
        /// What the value was.
        what: &'static str,
        /// The value.
        value: f64,
    },
    /// A schedule that increases somewhere, or does not go down overall.
    #[error("schedule must not increase and must end below its start; entry {index} is {value} after {previous}")]
    IncreasingSchedule {
        /// Index of the offending entry.
        index: usize,
        /// The entry before it.
        previous: f32,
        /// The offending entry.
        value: f32,
    },
    /// The schedule slice is too short to step (needs ≥ 2 entries).
    #[error("a schedule needs at least 2 entries (N steps + the final 0), got {0}")]
    ScheduleTooShort(usize),
    /// An image size that is not a multiple of 16 under strict rounding.
    #[error("image size {height}x{width} (HxW) must be a multiple of 16 in both sides (use SizeRounding::Ceil for BFL's rounding or Floor for diffusers')")]
    SizeNotMultipleOf16 {
        /// Height in pixels.
        height: usize,
        /// Width in pixels.
        width: usize,
    },
    /// A zero batch, height or width.
    #[error("batch, height and width must be positive, got batch {batch}, {height}x{width}")]
    EmptySize {
        /// Batch size.
        batch: usize,
        /// Height in pixels.
        height: usize,
        /// Width in pixels.
        width: usize,
    },
    /// A tensor shape with zero elements.
    #[error("shape {0:?} has no elements")]
    EmptyShape(Vec<usize>),
    /// Two tensors that must agree in shape do not.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A dtype the operation does not support.
    #[error("unsupported dtype {dtype:?} for {what} (supported: {supported})")]
    UnsupportedDtype {
        /// The operation.
        what: &'static str,
        /// The dtype given.
        dtype: DType,
        /// What is supported.
        supported: &'static str,
    },
    /// The denoiser returned an error; the step index says where.
    #[error("denoiser failed at step {step}: {source}")]
    Denoiser {
        /// Step index (0-based).
        step: usize,
        /// The denoiser's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
