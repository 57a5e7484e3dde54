//! The golden-tensor harness shared by every crate's golden tests.
//!
//! Golden files are safetensors written by the pinned Python reference (`cargo xtask golden gen`)
//! into `<crate>/tests/golden/<file>.safetensors`. Each holds the inputs, the weights and the
//! reference outputs of one or more cases, plus one metadata key, `golden`, whose value is a JSON
//! record (reference versions, configs, seeds, tolerances).
//!
//! A test opens a file with [`Golden::open`], runs the Rust code on the stored inputs and calls
//! [`Golden::check`], which compares against the stored output with a [`Tolerance`], appends one
//! row to the report that `cargo xtask golden` prints, and panics with a short, precise message
//! (case, first and worst mismatch, actual vs expected there) when the comparison fails. Whole
//! tensors are never printed.
//!
//! This crate is a dev-dependency only (`publish = false`); it may panic, since a panic is how a
//! Rust test fails.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};

/// Environment variable naming a file to which every check appends one report row.
/// `cargo xtask golden` sets it; plain `cargo test` leaves it unset and nothing is written.
pub const REPORT_ENV: &str = "FLUX_GOLDEN_REPORT";

/// The command that regenerates goldens, printed in failure messages.
pub const REGEN_COMMAND: &str = "cargo xtask golden gen";

/// Comparison tolerance: an element passes when `|actual − expected| ≤ abs + rel·|expected|`
/// (numpy's `allclose` rule); optionally the whole tensor must also reach a cosine similarity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f64,
    /// Relative part, scaled by `|expected|`.
    pub rel: f64,
    /// Minimum cosine similarity of the flattened tensors, for loose (bf16) checks.
    pub min_cosine: Option<f64>,
}

impl Tolerance {
    /// Bit-for-bit equality.
    pub const EXACT: Tolerance = Tolerance {
        abs: 0.0,
        rel: 0.0,
        min_cosine: None,
    };
    /// Structural f32 goldens.
    pub const F32: Tolerance = Tolerance {
        abs: 1e-5,
        rel: 1e-5,
        min_cosine: None,
    };
    /// f32 where a sinusoid of large arguments dominates (timestep embedding).
    pub const F32_SINUSOID: Tolerance = Tolerance {
        abs: 1e-4,
        rel: 1e-5,
        min_cosine: None,
    };
    /// bf16 runs compared with a bf16 reference run.
    pub const BF16: Tolerance = Tolerance {
        abs: 3e-2,
        rel: 3e-2,
        min_cosine: Some(0.999),
    };

    /// A tolerance from explicit parts.
    pub const fn new(abs: f64, rel: f64) -> Self {
        Tolerance {
            abs,
            rel,
            min_cosine: None,
        }
    }

    /// Adds a cosine-similarity floor.
    pub const fn with_min_cosine(mut self, c: f64) -> Self {
        self.min_cosine = Some(c);
        self
    }

    /// The default preset for a dtype.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::BF16 | DType::F16 => Self::BF16,
            _ => Self::F32,
        }
    }
}

impl fmt::Display for Tolerance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.abs == 0.0 && self.rel == 0.0 && self.min_cosine.is_none() {
            return write!(f, "exact");
        }
        write!(f, "abs={:e},rel={:e}", self.abs, self.rel)?;
        if let Some(c) = self.min_cosine {
            write!(f, ",cos>={c}")?;
        }
        Ok(())
    }
}

/// The outcome of comparing two tensors.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Number of elements compared.
    pub len: usize,
    /// Elements outside the tolerance (NaN against a number counts).
    pub mismatches: usize,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Multi-index of the largest absolute difference.
    pub max_abs_index: Vec<usize>,
    /// Actual and expected values at `max_abs_index`.
    pub at_max: (f64, f64),
    /// Largest relative difference, over elements with `|expected|` above the absolute tolerance
    /// (or above 1e-30 for exact checks), so values near zero do not dominate.
    pub max_rel: f64,
    /// Multi-index, actual and expected value of the first element outside the tolerance.
    pub first_mismatch: Option<(Vec<usize>, f64, f64)>,
    /// Cosine similarity of the flattened tensors.
    pub cosine: f64,
    /// Relative L2 error ‖actual − expected‖ / ‖expected‖; NaN when a difference is not finite
    /// (a NaN or infinity against a number).
    pub rel_l2: f64,
    /// Whether the comparison passed.
    pub passed: bool,
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            idx[d] = flat % n;
            flat /= n;
        }
    }
    idx
}

/// Compares `actual` with `expected` (same shape; any float dtype; computed in f64).
pub fn compare(actual: &Tensor, expected: &Tensor, tol: Tolerance) -> Result<Comparison, String> {
    if actual.dims() != expected.dims() {
        return Err(format!(
            "shape mismatch: actual {:?}, expected {:?}",
            actual.dims(),
            expected.dims()
        ));
    }
    let to_vec = |t: &Tensor| -> Result<Vec<f64>, String> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| e.to_string())
    };
    let a = to_vec(actual)?;
    let e = to_vec(expected)?;
    Ok(compare_values(&a, &e, actual.dims(), tol))
}

/// Compares two flat slices read as tensors of `shape`.
pub fn compare_values(a: &[f64], e: &[f64], shape: &[usize], tol: Tolerance) -> Comparison {
    let rel_floor = if tol.abs > 0.0 { tol.abs } else { 1e-30 };
    let mut c = Comparison {
        len: a.len(),
        mismatches: 0,
        max_abs: 0.0,
        max_abs_index: vec![0; shape.len()],
        at_max: (
            a.first().copied().unwrap_or(0.0),
            e.first().copied().unwrap_or(0.0),
        ),
        max_rel: 0.0,
        first_mismatch: None,
        cosine: 1.0,
        rel_l2: 0.0,
        passed: true,
    };
    let (mut dot, mut na, mut ne, mut dd) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (i, (&x, &y)) in a.iter().zip(e.iter()).enumerate() {
        let both_nan = x.is_nan() && y.is_nan();
        let same_inf = x.is_infinite() && x == y;
        let diff = if both_nan || same_inf {
            0.0
        } else {
            (x - y).abs()
        };
        let ok = both_nan || same_inf || diff <= tol.abs + tol.rel * y.abs();
        if !ok {
            c.mismatches += 1;
            if c.first_mismatch.is_none() {
                c.first_mismatch = Some((unravel(i, shape), x, y));
            }
        }
        // NaN differences rank above every number.
        let rank = if diff.is_nan() { f64::INFINITY } else { diff };
        if rank > c.max_abs || (c.max_abs.is_nan() && !ok) {
            c.max_abs = if diff.is_nan() { f64::NAN } else { diff };
            c.max_abs_index = unravel(i, shape);
            c.at_max = (x, y);
        }
        if y.abs() > rel_floor && diff.is_finite() {
            c.max_rel = c.max_rel.max(diff / y.abs());
        }
        dd += diff * diff;
        if x.is_finite() && y.is_finite() {
            dot += x * y;
            na += x * x;
            ne += y * y;
        }
    }
    c.cosine = if na == 0.0 && ne == 0.0 {
        1.0
    } else {
        dot / (na.sqrt() * ne.sqrt()).max(f64::MIN_POSITIVE)
    };
    c.rel_l2 = if dd == 0.0 {
        0.0
    } else {
        dd.sqrt() / ne.sqrt().max(f64::MIN_POSITIVE)
    };
    let cos_ok = tol.min_cosine.is_none_or(|m| c.cosine >= m);
    c.passed = c.mismatches == 0 && cos_ok;
    c
}

/// One golden file, opened from a crate's `tests/golden/` folder.
pub struct Golden {
    krate: String,
    file: String,
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Golden {
    /// Opens `<manifest_dir>/tests/golden/<file>.safetensors`; pass `env!("CARGO_MANIFEST_DIR")`.
    ///
    /// Panics with the regeneration command if the file is missing or unreadable.
    pub fn open(manifest_dir: &str, file: &str) -> Golden {
        let dir = Path::new(manifest_dir);
        let krate = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unknown".into());
        let path = dir
            .join("tests")
            .join("golden")
            .join(format!("{file}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "golden file {} unreadable ({e}); regenerate with `{REGEN_COMMAND}`",
                path.display()
            )
        });
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .unwrap_or_else(|e| panic!("golden file {} is not safetensors: {e}", path.display()));
        let meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("golden"))
            .map(|s| serde_json::from_str(s).unwrap_or(serde_json::Value::Null))
            .unwrap_or(serde_json::Value::Null);
        let tensors = candle::safetensors::load_buffer(&bytes, &Device::Cpu)
            .unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
        Golden {
            krate,
            file: file.to_string(),
            path,
            tensors,
            meta,
        }
    }

    /// The stored tensor `name`; panics listing similar names when absent.
    pub fn tensor(&self, name: &str) -> Tensor {
        match self.tensors.get(name) {
            Some(t) => t.clone(),
            None => {
                let prefix = name.split('/').next().unwrap_or(name);
                let mut near: Vec<_> = self
                    .tensors
                    .keys()
                    .filter(|k| k.starts_with(prefix))
                    .cloned()
                    .collect();
                near.sort();
                near.truncate(8);
                panic!(
                    "golden {}: no tensor `{name}` (similar: {near:?}); regenerate with `{REGEN_COMMAND}`",
                    self.path.display()
                )
            }
        }
    }

    /// Names of every stored tensor, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    /// The JSON metadata record written by the reference.
    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    /// The metadata of one case (`meta["cases"][case]`), or `Null`.
    pub fn case_meta(&self, case: &str) -> &serde_json::Value {
        &self.meta["cases"][case]
    }

    /// Compares `actual` with `expected`, records a report row and panics on failure.
    pub fn check(
        &self,
        case: &str,
        actual: &Tensor,
        expected: &Tensor,
        tol: Tolerance,
    ) -> Comparison {
        let dtype = format!("{:?}", actual.dtype()).to_lowercase();
        let result = compare(actual, expected, tol);
        self.finish(case, &dtype, result, tol)
    }

    /// Compares flat values (for non-tensor results such as schedules) and records a row.
    pub fn check_values(
        &self,
        case: &str,
        dtype: &str,
        actual: &[f64],
        expected: &[f64],
        tol: Tolerance,
    ) -> Comparison {
        let result = if actual.len() == expected.len() {
            Ok(compare_values(actual, expected, &[actual.len()], tol))
        } else {
            Err(format!(
                "length mismatch: actual {}, expected {}",
                actual.len(),
                expected.len()
            ))
        };
        self.finish(case, dtype, result, tol)
    }

    fn finish(
        &self,
        case: &str,
        dtype: &str,
        result: Result<Comparison, String>,
        tol: Tolerance,
    ) -> Comparison {
        // Report rows are whitespace-separated: keep the case one field.
        let case = format!("{}/{case}", self.file).replace(char::is_whitespace, "_");
        match result {
            Err(msg) => {
                record(&format!("{} {case} {dtype} - - {tol} FAIL", self.krate));
                panic!("golden {} {case}: {msg}", self.krate);
            }
            Ok(c) => {
                let verdict = if c.passed { "PASS" } else { "FAIL" };
                record(&format!(
                    "{} {case} {dtype} {:.3e} {:.3e} {tol} {verdict}",
                    self.krate, c.max_abs, c.max_rel
                ));
                if !c.passed {
                    let first = c
                        .first_mismatch
                        .as_ref()
                        .map(|(i, a, e)| {
                            format!("first mismatch at {i:?}: actual {a:e}, expected {e:e}; ")
                        })
                        .unwrap_or_default();
                    panic!(
                        "golden {} {case} ({dtype}) outside {tol}: {} of {} elements differ; {first}\
                         max abs {:.3e} at {:?} (actual {:e}, expected {:e}); max rel {:.3e}; cosine {:.6}. \
                         If the reference changed on purpose, regenerate with `{REGEN_COMMAND}`",
                        self.krate,
                        c.mismatches,
                        c.len,
                        c.max_abs,
                        c.max_abs_index,
                        c.at_max.0,
                        c.at_max.1,
                        c.max_rel,
                        c.cosine
                    );
                }
                c
            }
        }
    }
}

/// The name → shape list of a manifest written by the reference
/// (`<manifest_dir>/tests/manifests/<name>.json`, key `tensors`).
pub fn manifest(manifest_dir: &str, name: &str) -> std::collections::BTreeMap<String, Vec<usize>> {
    let path = Path::new(manifest_dir)
        .join("tests")
        .join("manifests")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; regenerate with `{REGEN_COMMAND}`", path.display()));
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = json["tensors"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no `tensors` object", path.display()));
    tensors
        .iter()
        .map(|(k, v)| {
            let shape = v.as_array().map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64())
                    .map(|d| d as usize)
                    .collect()
            });
            (
                k.clone(),
                shape.unwrap_or_else(|| panic!("{}: bad shape for {k}", path.display())),
            )
        })
        .collect()
}

/// The largest absolute difference between two tensors of the same shape (any float dtype),
/// for tests that need one number; panics (a test failure) on a shape mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "max_abs_diff: shapes differ");
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// The largest `|value|` of `t` (0 for an empty tensor).
pub fn max_abs(t: &Tensor) -> f64 {
    if t.elem_count() == 0 {
        return 0.0;
    }
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Deterministic values uniform in [−1, 1) from a 64-bit LCG (test inputs independent of
/// candle's RNG), f32 on the CPU.
pub fn uniform(shape: &[usize], mut seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Asserts that `ours` names exactly the tensors of `want` with the same shapes, listing what is
/// missing, extra or misshapen.
pub fn assert_same_tensors(
    ours: &[(String, Vec<usize>)],
    want: &std::collections::BTreeMap<String, Vec<usize>>,
    what: &str,
) {
    let mine: std::collections::BTreeMap<&str, &Vec<usize>> =
        ours.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(
        mine.len(),
        ours.len(),
        "{what}: our list names a tensor twice"
    );
    let missing: Vec<&String> = want
        .keys()
        .filter(|k| !mine.contains_key(k.as_str()))
        .collect();
    let extra: Vec<&&str> = mine.keys().filter(|k| !want.contains_key(**k)).collect();
    let shapes: Vec<String> = want
        .iter()
        .filter_map(|(k, s)| {
            mine.get(k.as_str())
                .filter(|m| **m != s)
                .map(|m| format!("{k}: ours {m:?}, real {s:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && shapes.is_empty(),
        "{what}: we miss {missing:?}; we have extra {extra:?}; shapes differ: {shapes:?}"
    );
}

fn record(line: &str) {
    let Ok(path) = std::env::var(REPORT_ENV) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("flux-golden: cannot append to report {path}: {e}");
    }
}

/// This test process's own scratch folder, made new and empty the first time it is asked for.
/// Its name carries the process id and the time, and it is created exclusively, so no earlier
/// run that left files behind (the same process id, another checkout) and no other process
/// sharing the temporary folder can hand a test someone else's files.
pub fn scratch_root() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for n in 0u32.. {
            let d =
                std::env::temp_dir().join(format!("flux-test-{}-{nanos}-{n}", std::process::id()));
            match std::fs::create_dir(&d) {
                Ok(()) => return d,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create the scratch folder {}: {e}", d.display()),
            }
        }
        unreachable!()
    })
}

/// A path named `name` in [`scratch_root`] (nothing is created).
pub fn scratch(name: &str) -> PathBuf {
    scratch_root().join(name)
}

/// A new, empty folder named `name` in [`scratch_root`] (emptied if this process made it before).
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = scratch(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_folders_start_empty_and_belong_to_this_process() {
        let root = scratch_root();
        let name = root.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("flux-test-{}-", std::process::id())),
            "{name}"
        );
        assert_eq!(scratch_root(), root, "one root per process");
        let d = scratch_dir("stale");
        std::fs::write(d.join("left.png"), b"x").unwrap();
        let d = scratch_dir("stale");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "emptied");
        assert_eq!(scratch("a.png"), root.join("a.png"));
    }

    #[test]
    fn rel_l2_is_the_norm_ratio_and_nan_on_non_finite() {
        // ‖(0, 3, 4) − (0, 0, 0)‖ is 5; ‖expected‖ = ‖(3, 4, 0)‖ = 5 → with a = e + (0, 3, 4): 1
        let e = [3.0, 4.0, 0.0];
        let a = [3.0, 7.0, 4.0];
        let c = compare_values(&a, &e, &[3], Tolerance::new(f64::INFINITY, 0.0));
        assert!((c.rel_l2 - 1.0).abs() < 1e-15, "{}", c.rel_l2);
        assert_eq!(compare_values(&e, &e, &[3], Tolerance::EXACT).rel_l2, 0.0);
        let c = compare_values(
            &[3.0, f64::NAN, 0.0],
            &e,
            &[3],
            Tolerance::new(f64::INFINITY, 0.0),
        );
        assert!(c.rel_l2.is_nan());
        assert_eq!(c.mismatches, 1);
    }

    #[test]
    fn exact_tolerance_catches_one_ulp() {
        let a = [1.0, 2.0, 3.0];
        let e = [1.0, 2.0 + f64::EPSILON * 2.0, 3.0];
        let c = compare_values(&a, &e, &[3], Tolerance::EXACT);
        assert!(!c.passed);
        assert_eq!(c.mismatches, 1);
        assert_eq!(c.max_abs_index, vec![1]);
        assert_eq!(
            c.first_mismatch.as_ref().map(|m| m.0.clone()),
            Some(vec![1])
        );
    }

    #[test]
    fn allclose_rule_and_multi_index() {
        let a = [0.0, 1.0, 100.0, 5.0, 5.0, 5.0];
        let e = [0.0, 1.0, 100.0005, 5.0, 5.0, 5.5];
        let c = compare_values(&a, &e, &[2, 3], Tolerance::new(1e-5, 1e-5));
        assert_eq!(c.mismatches, 1);
        assert_eq!(c.max_abs_index, vec![1, 2]);
        assert!((c.max_abs - 0.5).abs() < 1e-12);
        let c = compare_values(&a[..3], &e[..3], &[3], Tolerance::new(1e-5, 1e-5));
        assert!(c.passed, "0.0005 ≤ 1e-5 + 1e-5·100.0005");
    }

    #[test]
    fn nan_is_a_mismatch_unless_both() {
        let c = compare_values(&[f64::NAN, 1.0], &[1.0, 1.0], &[2], Tolerance::F32);
        assert!(!c.passed);
        assert!(c.max_abs.is_nan());
        let c = compare_values(&[f64::NAN, 1.0], &[f64::NAN, 1.0], &[2], Tolerance::EXACT);
        assert!(c.passed);
    }

    #[test]
    fn cosine_floor() {
        let c = compare_values(
            &[1.0, 0.0],
            &[0.0, 1.0],
            &[2],
            Tolerance::new(10.0, 0.0).with_min_cosine(0.9),
        );
        assert_eq!(c.mismatches, 0);
        assert!(!c.passed);
    }

    #[test]
    #[should_panic(expected = "we miss")]
    fn manifest_comparison_names_missing_tensors() {
        let want = [("a".to_string(), vec![2]), ("b".to_string(), vec![3])]
            .into_iter()
            .collect();
        assert_same_tensors(&[("a".to_string(), vec![2])], &want, "test");
    }

    #[test]
    #[should_panic(expected = "shapes differ")]
    fn manifest_comparison_names_wrong_shapes() {
        let want = [("a".to_string(), vec![2])].into_iter().collect();
        assert_same_tensors(&[("a".to_string(), vec![3])], &want, "test");
    }

    #[test]
    fn tensor_shape_mismatch_is_an_error() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(compare(&a, &e, Tolerance::F32).is_err());
    }
}
