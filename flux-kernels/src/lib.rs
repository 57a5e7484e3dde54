#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod attention;
mod checkpoint;
mod error;
mod linear;
mod ops;
mod rope;

pub use attention::{attention, softmax_last_dim, AttnOpts};
pub use checkpoint::{sharded_files, Checkpoint};
pub use error::{Error, Result};
pub use linear::Linear;
pub use ops::{gelu_tanh, group_norm, layer_norm, modulate, quick_gelu, rms_norm, silu};
pub use rope::{apply_rope, rope_table, AngleMode, RopeTable};
