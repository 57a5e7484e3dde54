//! `cargo xtask gpu`: CUDA builds on a machine without a GPU, for a lent GPU machine without
//! Rust.
//!
//! - `toolchain` (run by the others): the pinned CUDA 13.0 compiler and libraries from PyPI in
//!   `target/cuda/pip`, and a CUDA root `target/cuda/root` that candle's build accepts: `bin`,
//!   `include`, `nvvm` linked to the pip folders, `lib/lib*.so` linked to the versioned pip
//!   libraries, and `lib/stubs/libcuda.so`, a stub driver (soname `libcuda.so.1`) that defines
//!   every `cu*` symbol cudarc's bindings declare, so that binaries link here. The real driver
//!   replaces it on the GPU machine.
//! - `check`: compiles every `.cu` of flux-kernels for sm_90a and prints ptxas' resource
//!   report (registers, shared memory, stack, spills), no GPU needed; fails when the Hopper
//!   kernel (`*_sm90.cu`) spills or ptxas reports a "Potential Performance Loss" (serialised
//!   wgmma) for it.
//! - `build`: `flux` and `flux-gpu-check` with `--features cuda` for sm_90, stripped and
//!   xz-compressed, staged with `run.sh` in `target/gpu-stage` (carry that folder to the GPU
//!   machine; the script unpacks them there).
//! - `run`: runs the staged script (on a machine with a GPU and this checkout).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::root;

/// The CUDA 13.0 wheels (cudarc 0.19 knows CUDA ≤ 13.4; the lent machines' driver runs 13.0).
const PINS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
];

/// Shared libraries the CUDA root exposes unversioned (for the linker).
const LIBS: &[(&str, &str)] = &[
    ("libcudart.so", "libcudart.so.13"),
    ("libcublas.so", "libcublas.so.13"),
    ("libcublasLt.so", "libcublasLt.so.13"),
    ("libcurand.so", "libcurand.so.10"),
    ("libnvrtc.so", "libnvrtc.so.13"),
];

/// The most the staged folder may take: a GPU machine accepts 64 MiB with the checkout (≈ 14 MiB).
const STAGE_LIMIT: u64 = 44 << 20;

pub const HELP: &str =
    "  gpu check                        compile flux-kernels' .cu files for sm_90a with the pinned
                                   CUDA 13.0 from PyPI (installed once into target/cuda) and
                                   print ptxas' register/shared-memory/spill report; fails
                                   if the Hopper attention kernel spills or ptxas serialises
                                   its wgmma
  gpu build                        build `flux` and `flux-gpu-check` with --features cuda for
                                   sm_90 (fake CUDA root + stub libcuda, no GPU needed), strip
                                   and xz them, stage them with run.sh in target/gpu-stage
                                   (≤ 64 MiB with the checkout)
  gpu run [ARGS]                   run target/gpu-stage/run.sh here (needs a GPU); on a lent
                                   machine without Rust run `target/gpu-stage/run.sh` itself
";

pub fn gpu(args: &[&str]) -> Result<()> {
    match args {
        ["check"] => check(),
        ["build"] => build(),
        ["run", rest @ ..] => {
            let script = stage_dir().join("run.sh");
            if !script.exists() {
                bail!(
                    "{} is missing: run `cargo xtask gpu build` first",
                    script.display()
                );
            }
            let st = Command::new("bash").arg(&script).args(rest).status()?;
            if !st.success() {
                bail!("run.sh failed ({st})");
            }
            Ok(())
        }
        _ => bail!("usage: cargo xtask gpu check|build|run"),
    }
}

fn cuda_dir() -> PathBuf {
    root().join("target").join("cuda")
}

fn stage_dir() -> PathBuf {
    root().join("target").join("gpu-stage")
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

/// Installs the wheels (once) and lays out the CUDA root. Returns the root.
pub fn toolchain() -> Result<PathBuf> {
    let pip = cuda_dir().join("pip");
    let cu13 = pip.join("nvidia").join("cu13");
    let stamp = cuda_dir().join("pins.txt");
    let want = PINS.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        eprintln!(
            "gpu: installing the CUDA 13.0 toolchain from PyPI into {} (≈ 1.2 GB, once)",
            pip.display()
        );
        let _ = std::fs::remove_dir_all(&pip);
        std::fs::create_dir_all(&pip)?;
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&pip)
            .args(PINS))?;
        std::fs::write(&stamp, &want)?;
    }
    let cuda_root = cuda_dir().join("root");
    let lib = cuda_root.join("lib");
    std::fs::create_dir_all(lib.join("stubs"))?;
    for d in ["bin", "include", "nvvm"] {
        relink(&cu13.join(d), &cuda_root.join(d))?;
    }
    for (name, versioned) in LIBS {
        relink(&cu13.join("lib").join(versioned), &lib.join(name))?;
    }
    // nvcc looks for lib64 on some paths
    relink(&lib, &cuda_root.join("lib64"))?;
    let stub = lib.join("stubs").join("libcuda.so");
    if !stub.exists() {
        write_driver_stub(&stub)?;
    }
    Ok(cuda_root)
}

fn relink(target: &Path, link: &Path) -> Result<()> {
    if !target.exists() {
        bail!("{} is missing from the CUDA wheels", target.display());
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {}", link.display()))
}

/// Every `cu*` function cudarc's driver bindings declare, each returning CUDA_ERROR_UNKNOWN.
fn write_driver_stub(out: &Path) -> Result<()> {
    let meta = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "flux-kernels/cuda",
        ])
        .current_dir(root())
        .output()?;
    if !meta.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&meta.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in the dependency graph of flux-kernels/cuda")?;
    let bindings = Path::new(manifest)
        .parent()
        .unwrap()
        .join("src/driver/sys/mod.rs");
    let text = std::fs::read_to_string(&bindings)
        .with_context(|| format!("cannot read {}", bindings.display()))?;
    let mut names: Vec<&str> = text
        .split("fn ")
        .skip(1)
        .filter_map(|s| s.split('(').next())
        .filter(|n| n.starts_with("cu") && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.len() < 100 {
        bail!(
            "found only {} driver functions in {}",
            names.len(),
            bindings.display()
        );
    }
    let c: String = names
        .iter()
        .map(|n| format!("int {n}(void) {{ return 999; }}\n"))
        .collect();
    let src = out.with_extension("c");
    std::fs::write(&src, c)?;
    run(Command::new("gcc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(out)
        .arg(&src))?;
    let _ = std::fs::remove_file(out.with_extension("so.1"));
    std::os::unix::fs::symlink("libcuda.so", out.with_extension("so.1"))?;
    eprintln!(
        "gpu: stub driver with {} symbols at {}",
        names.len(),
        out.display()
    );
    Ok(())
}

fn cuda_env(cmd: &mut Command, cuda_root: &Path) {
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("CUDA_HOME", cuda_root)
        .env("CUDA_PATH", cuda_root)
        .env(
            "PATH",
            format!("{}:{path}", cuda_root.join("bin").display()),
        )
        .env("LD_LIBRARY_PATH", cuda_root.join("lib"))
        .env("CUDA_COMPUTE_CAP", "90");
}

/// The `.cu` sources of flux-kernels.
fn cu_sources() -> Result<Vec<PathBuf>> {
    let dir = root().join("flux-kernels").join("cuda");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    v.sort();
    Ok(v)
}

fn check() -> Result<()> {
    let cuda_root = toolchain()?;
    let out = cuda_dir().join("check");
    std::fs::create_dir_all(&out)?;
    let mut report = String::new();
    for src in cu_sources()? {
        let name = src.file_stem().unwrap().to_string_lossy().to_string();
        let mut cmd = Command::new(cuda_root.join("bin").join("nvcc"));
        cuda_env(&mut cmd, &cuda_root);
        let o = cmd
            .args([
                "-cubin",
                "-O3",
                "-std=c++17",
                "-gencode=arch=compute_90a,code=sm_90a",
            ])
            .args(["-Xptxas", "-v", "-o"])
            .arg(out.join(format!("{name}.cubin")))
            .arg(&src)
            .output()?;
        let text =
            String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            bail!("nvcc failed on {}:\n{text}", src.display());
        }
        report += &format!("== {name}.cu (sm_90a)\n");
        let mut losses = vec![];
        for line in text.lines() {
            let l = line.trim_start_matches("ptxas info    : ");
            if l.starts_with("Compiling entry")
                || l.starts_with("Function properties")
                || l.starts_with("Used")
                || l.contains("spill")
                || l.contains("Potential Performance Loss")
            {
                report += &format!("  {l}\n");
            }
            // the Hopper kernel must keep its products asynchronous and its registers in place
            let spills =
                l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads");
            if name.ends_with("_sm90") && (l.contains("Potential Performance Loss") || spills) {
                losses.push(l.to_string());
            }
        }
        if !losses.is_empty() {
            print!("{report}");
            bail!(
                "{name}.cu: ptxas serialises wgmma or spills (every such line is a regression):\n{}",
                losses.join("\n")
            );
        }
    }
    print!("{report}");
    std::fs::write(out.join("ptxas.txt"), &report)?;
    println!(
        "gpu check: every .cu compiles for sm_90a; report in {}",
        out.join("ptxas.txt").display()
    );
    Ok(())
}

fn build() -> Result<()> {
    let cuda_root = toolchain()?;
    let target = root().join("target").join("gpu");
    let mut cmd = Command::new(env!("CARGO"));
    cuda_env(&mut cmd, &cuda_root);
    run(cmd
        .current_dir(root())
        .args(["build", "--release", "--features", "cuda"])
        .args(["-p", "flux-pipeline", "-p", "flux-gpu-check"])
        .args(["--bin", "flux", "--bin", "flux-gpu-check"])
        .arg("--target-dir")
        .arg(&target))?;
    let stage = stage_dir();
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    // Stripped and xz-compressed: two CUDA binaries are ~40 MB each, mostly embedded PTX text.
    for bin in ["flux", "flux-gpu-check"] {
        let dst = stage.join(bin);
        std::fs::copy(target.join("release").join(bin), &dst)?;
        run(Command::new("strip").arg(&dst))?;
        run(Command::new("xz").args(["-T0", "-6", "-f"]).arg(&dst))?;
    }
    let script = stage.join("run.sh");
    std::fs::copy(root().join("xtask").join("gpu").join("run.sh"), &script)?;
    let total: u64 = std::fs::read_dir(&stage)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    for e in std::fs::read_dir(&stage)? {
        let e = e?;
        println!(
            "  {:>10} {}",
            e.metadata()?.len(),
            e.file_name().to_string_lossy()
        );
    }
    if total > STAGE_LIMIT {
        bail!("staged files take {total} bytes, over the 44 MiB left beside the checkout in the 64 MiB a GPU machine accepts");
    }
    println!(
        "gpu build: staged {:.1} MiB in {}; on the GPU machine run `target/gpu-stage/run.sh` from the repository root",
        total as f64 / (1 << 20) as f64,
        stage.display()
    );
    Ok(())
}
