//! A process-wide switch: chosen in code, else by an environment variable read once, else the
//! default (the CUDA attention kernel, the CUDA product path).

use std::str::FromStr;
use std::sync::Mutex;

use crate::{Error, Result};

/// `None` until chosen or read.
pub(crate) struct Switch<T: 'static> {
    env: &'static str,
    cell: Mutex<Option<T>>,
}

impl<T: Copy + Default + FromStr<Err = Error>> Switch<T> {
    pub(crate) const fn new(env: &'static str) -> Self {
        Switch {
            env,
            cell: Mutex::new(None),
        }
    }

    pub(crate) fn set(&self, value: T) {
        *self.cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    }

    /// The chosen value, else the variable's (an error when it names none), else the default.
    pub(crate) fn get(&self) -> Result<T> {
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = *cell {
            return Ok(v);
        }
        let v = match std::env::var(self.env) {
            Ok(s) if !s.trim().is_empty() => s.parse()?,
            _ => T::default(),
        };
        *cell = Some(v);
        Ok(v)
    }
}

/// `T::from_str` over its named values: the value whose name is `s` (trimmed), else an error
/// that names the variable, the text and every accepted name.
pub(crate) fn parse_named<T: Copy>(
    env: &str,
    s: &str,
    values: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T> {
    values
        .iter()
        .copied()
        .find(|v| name(*v) == s.trim())
        .ok_or_else(|| {
            let names: Vec<&str> = values.iter().map(|v| name(*v)).collect();
            Error::InvalidArgument(format!("{env}={s:?}: expected {}", names.join(", ")))
        })
}
