//! With the `cuda` feature, compiles `cuda/*.cu` with the nvcc that candle's CUDA build uses
//! too (`CUDA_HOME`/`CUDA_PATH`, else `PATH`) into fatbins for `CUDA_COMPUTE_CAP` (default 80):
//! machine code for that capability, which loads without any JIT, and its PTX, which the driver
//! JIT-compiles for newer GPUs. With a 9.x capability the Hopper attention kernel is built too,
//! for sm_90a. Without the feature, does nothing: CPU builds never need a CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // The Hopper kernel needs sm_90a (wgmma, setmaxnreg): built only for compute capability 9.x,
    // an empty module elsewhere (the host then never picks it).
    let hopper = cap.starts_with('9') && cap.len() == 2;
    if !hopper {
        std::fs::write(out.join("flash_attn_sm90.fatbin"), "").expect("write OUT_DIR");
    }
    let mut kernels = vec![("flash_attn", cap.clone()), ("fused", cap.clone())];
    if hopper {
        kernels.push(("flash_attn_sm90", "90a".to_string()));
    }
    for (name, arch) in kernels {
        let src = PathBuf::from("cuda").join(format!("{name}.cu"));
        let fatbin = out.join(format!("{name}.fatbin"));
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!(
                "--generate-code=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"
            ))
            .arg("-o")
            .arg(&fatbin)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {} to compile {} (the `cuda` feature needs the CUDA toolkit; set CUDA_HOME): {e}", nvcc.display(), src.display())
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
