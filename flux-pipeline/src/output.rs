//! Where images go: an output pattern checked whole before any model loads, and names that
//! never replace an existing file (unless asked) nor collide within one run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use flux_vae::Rgb8;

use crate::png::{encode_png, partial_path, remove_partial};
use crate::{Error, ImageParams, Result};

/// The file name used inside a folder given as the output.
pub const DEFAULT_FILE: &str = "flux-{seed}.png";

/// The longest file name most file systems take (bytes).
const NAME_MAX: usize = 255;

/// Names for a run's images from a pattern such as `out/flux-{seed}.png` (templates `{seed}`
/// and `{index}`, in the file name only). A folder (existing, or written with a trailing `/`)
/// gets [`DEFAULT_FILE`] inside it. With several images and no template, `-{index}` is added.
/// Unless `overwrite`, a name that exists (or was already used in this run) becomes
/// `name-1.png`, `name-2.png`, … and the file is created without ever replacing one that
/// appears meanwhile.
#[derive(Debug)]
pub struct OutputNames {
    dir: PathBuf,
    file: String,
    count: usize,
    overwrite: bool,
    used: HashSet<PathBuf>,
}

fn bad(pattern: &str, why: impl std::fmt::Display) -> Error {
    Error::InvalidRequest(format!("output `{pattern}`: {why}"))
}

impl OutputNames {
    /// Checks `pattern` for `count` images: templates, extension, name length (with the
    /// temporary name's suffix), and that its folder exists and accepts files.
    pub fn new(pattern: &str, count: usize, overwrite: bool) -> Result<Self> {
        if pattern.trim().is_empty() {
            return Err(bad(pattern, "empty"));
        }
        let p = Path::new(pattern);
        let (dir, file) = if pattern.ends_with('/') || p.is_dir() {
            (p.to_path_buf(), DEFAULT_FILE.to_string())
        } else {
            let file = p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .filter(|f| f != "." && f != "..")
                .ok_or_else(|| bad(pattern, "no file name"))?;
            // empty for a bare name: paths are then printed as the user gave them
            let dir = p.parent().map_or_else(PathBuf::new, Path::to_path_buf);
            (dir, file)
        };
        if dir.to_string_lossy().contains(['{', '}']) {
            return Err(bad(
                pattern,
                "templates ({seed}, {index}) are allowed in the file name only, not in folders",
            ));
        }
        // every brace must open a known template
        let mut rest = file.as_str();
        while let Some(i) = rest.find(['{', '}']) {
            let tail = &rest[i..];
            match ["{seed}", "{index}"].iter().find(|t| tail.starts_with(**t)) {
                Some(t) => rest = &tail[t.len()..],
                None => {
                    return Err(bad(
                        pattern,
                        format!(
                            "unknown template at `{}` (use {{seed}} or {{index}})",
                            tail.chars().take(12).collect::<String>()
                        ),
                    ))
                }
            }
        }
        let file = match Path::new(&file).extension().map(|e| e.to_string_lossy()) {
            None => format!("{file}.png"),
            Some(e) if e.eq_ignore_ascii_case("png") => file,
            Some(e) => {
                return Err(bad(
                    pattern,
                    format!("flux writes PNG files; `.{e}` would mislabel them (use .png)"),
                ))
            }
        };
        let names = OutputNames {
            dir,
            file,
            count,
            overwrite,
            used: HashSet::new(),
        };
        // the longest name this run can make: a 20-digit seed and index, a numbering
        // suffix, and the temporary name's `.` + `.partial-<pid>`
        let longest = names.expand(u64::MAX, usize::MAX);
        let longest = longest.file_name().map_or(0, |f| f.len()) + "-99999".len();
        let temp = partial_path(Path::new("x")).as_os_str().len() - 1;
        if longest + temp > NAME_MAX {
            return Err(bad(
                pattern,
                format!("file names would be up to {} bytes with the temporary suffix; the limit is {NAME_MAX}", longest + temp),
            ));
        }
        let folder = if names.dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            names.dir.as_path()
        };
        if !folder.is_dir() {
            return Err(Error::Write {
                path: folder.to_path_buf(),
                reason: if folder.exists() {
                    "is not a folder".into()
                } else {
                    "no such folder".into()
                },
            });
        }
        crate::png::check_writable(&names.expand(0, 0))?;
        Ok(names)
    }

    /// The name for image `index` with `seed`, before any numbering.
    pub fn expand(&self, seed: u64, index: usize) -> PathBuf {
        let mut name = self
            .file
            .replace("{seed}", &seed.to_string())
            .replace("{index}", &index.to_string());
        if self.count > 1 && !self.file.contains("{seed}") && !self.file.contains("{index}") {
            let p = Path::new(&name);
            let stem = p
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            name = format!("{stem}-{index}.png");
        }
        self.dir.join(name)
    }

    /// Writes image `index` (PNG with `params`) under its name, numbered when that is taken;
    /// returns the path written. The file appears whole or not at all.
    pub fn write(
        &mut self,
        seed: u64,
        index: usize,
        image: &Rgb8,
        params: &ImageParams,
    ) -> Result<PathBuf> {
        let first = self.expand(seed, index);
        let tmp = partial_path(&first);
        encode_png(&tmp, image, params).map_err(|reason| {
            remove_partial(&tmp);
            Error::Write {
                path: first.clone(),
                reason,
            }
        })?;
        let result = self.place(&tmp, &first);
        remove_partial(&tmp);
        let path = result?;
        self.used.insert(path.clone());
        Ok(path)
    }

    fn place(&self, tmp: &Path, first: &Path) -> Result<PathBuf> {
        let err = |p: &Path, e: std::io::Error| Error::Write {
            path: p.to_path_buf(),
            reason: e.to_string(),
        };
        let stem = first
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        for n in 0..100_000usize {
            let cand = match n {
                0 => first.to_path_buf(),
                n => first.with_file_name(format!("{stem}-{n}.png")),
            };
            if self.used.contains(&cand) {
                continue;
            }
            if self.overwrite {
                return std::fs::rename(tmp, &cand)
                    .map(|_| cand.clone())
                    .map_err(|e| err(&cand, e));
            }
            // a hard link never replaces an existing file, even one created meanwhile
            match std::fs::hard_link(tmp, &cand) {
                Ok(()) => return Ok(cand),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(_) if cand.symlink_metadata().is_err() => {
                    // no hard links here (some network and FAT file systems): rename, having
                    // just seen the name free
                    return std::fs::rename(tmp, &cand)
                        .map(|_| cand.clone())
                        .map_err(|e| err(&cand, e));
                }
                Err(_) => continue,
            }
        }
        Err(Error::Write {
            path: first.to_path_buf(),
            reason: "every numbered name up to -99999 is taken".into(),
        })
    }
}
