//! `cargo xtask golden`: check goldens (run each crate's golden tests, print a table) and
//! `cargo xtask golden gen`: regenerate them with the pinned Python reference.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::root;

/// Library crates, in dependency order; each may have golden tests (`tests/golden*.rs`).
const CRATES: &[&str] = &[
    "flux-kernels",
    "flux-sampler",
    "flux-dit",
    "flux-vae",
    "flux-text",
    "flux-pipeline",
];

/// Reference generators: component name, script in `xtask/reference/`, crate that owns the output.
const GENERATORS: &[(&str, &str, &str)] = &[
    ("kernels", "gen_kernels.py", "flux-kernels"),
    ("sampler", "gen_sampler.py", "flux-sampler"),
    ("dit", "gen_dit.py", "flux-dit"),
    ("lora", "gen_lora.py", "flux-dit"),
    ("lora-text", "gen_lora_text.py", "flux-text"),
    ("vae", "gen_vae.py", "flux-vae"),
    ("text", "gen_text.py", "flux-text"),
    ("pipeline", "gen_pipeline.py", "flux-pipeline"),
    ("tasks", "gen_tasks.py", "flux-pipeline"),
];

const REGEN: &str = "cargo xtask golden gen";

fn golden_targets(krate: &str) -> Result<Vec<String>> {
    let dir = root().join(krate).join("tests");
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".rs") {
                if stem.starts_with("golden") {
                    out.push(stem.to_string());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `cargo xtask golden [--crate NAME]`.
pub fn check(args: &[&str]) -> Result<()> {
    let only = match args {
        [] => None,
        ["--crate", name] => {
            if !CRATES.contains(name) {
                bail!("unknown crate {name}; known: {}", CRATES.join(", "));
            }
            Some(*name)
        }
        other => bail!("usage: cargo xtask golden [--crate NAME] (got {other:?})"),
    };
    let report =
        std::env::temp_dir().join(format!("flux-golden-report-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let mut broken = vec![];
    for krate in CRATES.iter().filter(|c| only.is_none_or(|o| o == **c)) {
        for target in golden_targets(krate)? {
            let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(root())
                .args(["test", "--quiet", "-p", krate, "--test", &target])
                .env(flux_report_env(), &report)
                .output()
                .with_context(|| format!("running cargo test -p {krate} --test {target}"))?;
            if !out.status.success() {
                broken.push((krate.to_string(), target.clone(), out));
            }
        }
    }
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let mut rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|r: &Vec<&str>| r.len() == 7)
        .collect();
    rows.sort_by(|a, b| {
        (CRATES.iter().position(|c| *c == a[0]), a[1])
            .cmp(&(CRATES.iter().position(|c| *c == b[0]), b[1]))
    });
    let header = [
        "crate",
        "case",
        "dtype",
        "max-abs",
        "max-rel",
        "tolerance",
        "result",
    ];
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let s: Vec<String> = cells
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(&header);
    for r in &rows {
        line(r);
    }
    let passed = rows.iter().filter(|r| r[6] == "PASS").count();
    let mut failed = rows.len() - passed;
    for (krate, target, out) in &broken {
        // A failing check already has its FAIL row; a crash or a build error has none.
        let has_fail_row = rows.iter().any(|r| r[0] == krate && r[6] == "FAIL");
        if !has_fail_row {
            failed += 1;
        }
        eprintln!("\n--- cargo test -p {krate} --test {target} failed; its output ends:");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = all.lines().collect();
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{l}");
        }
    }
    if rows.is_empty() && broken.is_empty() {
        bail!("no golden cases ran");
    }
    if failed > 0 {
        eprintln!("\nIf the reference changed on purpose, regenerate goldens with `{REGEN}` and review the diff.");
    }
    println!("golden: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn flux_report_env() -> &'static str {
    // Mirrors flux_golden::REPORT_ENV (xtask does not link the test helper).
    "FLUX_GOLDEN_REPORT"
}

fn reference_dir() -> PathBuf {
    root().join("xtask").join("reference")
}

/// Creates (or reuses) the reference virtualenv and returns its python.
fn venv_python() -> Result<PathBuf> {
    let dir = reference_dir();
    let venv = dir.join(".venv");
    let python = venv.join("bin").join("python");
    let reqs = std::fs::read_to_string(dir.join("requirements.txt"))
        .context("reading xtask/reference/requirements.txt")?;
    let stamp = venv.join("flux-requirements.txt");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(reqs.as_str()) {
        return Ok(python);
    }
    if !python.exists() {
        eprintln!("creating the reference virtualenv in xtask/reference/.venv");
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    eprintln!("installing the pinned reference (xtask/reference/requirements.txt); this downloads several GB once");
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "-r"])
        .arg(dir.join("requirements.txt")))?;
    std::fs::write(&stamp, reqs)?;
    Ok(python)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// `cargo xtask golden gen [COMPONENT] [--verify]`.
pub fn generate(args: &[&str]) -> Result<()> {
    let verify = args.contains(&"--verify");
    let names: Vec<&str> = args.iter().copied().filter(|a| *a != "--verify").collect();
    let selected: Vec<_> = match names.as_slice() {
        [] | ["all"] => GENERATORS.iter().collect(),
        [one] => match GENERATORS.iter().find(|g| g.0 == *one) {
            Some(g) => vec![g],
            None => bail!(
                "unknown component {one}; known: {}",
                GENERATORS
                    .iter()
                    .map(|g| g.0)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        other => bail!("usage: cargo xtask golden gen [COMPONENT] [--verify] (got {other:?})"),
    };
    let python = venv_python()?;
    let mut differing = vec![];
    for (name, script, krate) in selected {
        let committed = root().join(krate).join("tests").join("golden");
        // Generators write `<crate>/tests/golden` and may write siblings (`tests/manifests`).
        let scratch =
            std::env::temp_dir().join(format!("flux-golden-verify-{}-{name}", std::process::id()));
        let out = if verify {
            scratch.join("golden")
        } else {
            committed.clone()
        };
        eprintln!("golden gen {name}: {script} -> {}", out.display());
        run(Command::new(&python)
            .current_dir(root())
            .arg(reference_dir().join(script))
            .arg("--out")
            .arg(&out))?;
        if verify {
            let tests = root().join(krate).join("tests");
            for sub in ["golden", "manifests", "data"] {
                differing.extend(compare_dirs(&scratch.join(sub), &tests.join(sub))?);
            }
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    if verify {
        if differing.is_empty() {
            println!("golden gen --verify: regenerated files are byte-identical to the committed goldens");
        } else {
            for d in &differing {
                println!("differs: {d}");
            }
            bail!(
                "{} golden file(s) differ from a fresh generation",
                differing.len()
            );
        }
    }
    Ok(())
}

fn list_files(
    base: &Path,
    dir: &Path,
    out: &mut std::collections::BTreeSet<PathBuf>,
) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let path = e?.path();
        // Symbolic links (test models sharing other crates' components) are compared as links.
        let is_link = std::fs::symlink_metadata(&path)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if path.is_dir() && !is_link {
            list_files(base, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(base) {
            out.insert(rel.to_path_buf());
        }
    }
    Ok(())
}

/// The files a fresh generation wrote that differ from (or are missing among) the committed
/// ones, recursively. A folder the generator did not write is skipped.
fn compare_dirs(fresh: &Path, committed: &Path) -> Result<Vec<String>> {
    if !fresh.exists() {
        return Ok(vec![]);
    }
    // Only what this generator writes: a crate's golden folder holds several generators'
    // files (flux-dit: dit and lora; flux-pipeline: pipeline and tasks).
    let mut names = std::collections::BTreeSet::new();
    list_files(fresh, fresh, &mut names)?;
    let mut differing = vec![];
    let content = |p: PathBuf| -> Option<Vec<u8>> {
        match std::fs::read_link(&p) {
            Ok(target) => Some(format!("symlink -> {}", target.display()).into_bytes()),
            Err(_) => std::fs::read(&p).ok(),
        }
    };
    for n in names {
        let a = content(fresh.join(&n));
        let b = content(committed.join(&n));
        if a.is_none() || a != b {
            let p = committed.join(&n);
            differing.push(p.strip_prefix(root()).unwrap_or(&p).display().to_string());
        }
    }
    Ok(differing)
}
