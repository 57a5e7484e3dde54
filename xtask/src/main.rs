//! `cargo xtask`: project automation (see `cargo xtask help`).

mod bench;
mod fullsize;
mod golden;
mod gpu;

use anyhow::{bail, Result};
use std::path::PathBuf;

const HELP: &str = "\
cargo xtask <command>

Commands:
  golden [--crate NAME]            run every crate's golden tests and print one row per case
  golden gen [COMPONENT] [--verify] regenerate goldens with the pinned Python reference
                                   (COMPONENT: kernels, sampler, dit, lora, lora-text, vae,
                                   text, pipeline, tasks; default all). --verify regenerates
                                   into a temporary folder and checks the committed files are
                                   byte-identical.
  bench [--depth D] [--single S] [--res 256,512,1024] [--threads T] [--iters N]
                                   time our transformer against candle-transformers and
                                   PyTorch on the same seeded weights (full width, reduced
                                   depth; default 1 double + 2 single blocks, 2 threads,
                                   at most 2 forwards from 1024²), then attention alone
                                   against a GEMM of the same tokens; first line: the CPU
  bench --pipeline                 the tiny end-to-end pipeline, time per stage, for
                                   text-to-image and every image task
  bench --cfg-batch                true CFG's two transformer passes one after the other
                                   against one batch of two (full width, reduced depth)
  bench --lora [--res 512]         merging a rank-16 and a rank-64 LoRA into the full-width
                                   transformer, and the per-forward cost of run-time LoRA
  bench --quant q8_0,q4_k          the transformer from GGUF (ours, decode and integer
                                   kernels) against stable-diffusion.cpp on the same file
  bench --quant q8_0,q4_k --full-depth
                                   the same at full depth, 256², on the full-size files of
                                   `xtask fullsize`
  fullsize [--threads T]           full-size random-weight GGUF/T5/CLIP/VAE files (written once
                                   into target/fullsize): load, run, peak memory vs file size,
                                   and the whole pipeline inside 24 GB
  fuzz --minutes N [--target T] [--seed S]
                                   the seeded mutation fuzzer over every parser of user files
                                   (release build; `cargo test` runs a bounded pass); panicking
                                   inputs are saved under target/fuzz-crashes
  help                             this text
";

/// `cargo xtask fuzz`: builds `flux-fuzz` in release and runs it with these arguments.
fn fuzz(rest: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(&cargo)
        .current_dir(root())
        .args(["build", "--profile", "fuzz", "-p", "flux-fuzz"])
        .status()?;
    if !st.success() {
        bail!("building flux-fuzz failed");
    }
    let st = std::process::Command::new(root().join("target/fuzz/flux-fuzz"))
        .arg("run")
        .args(rest)
        .status()?;
    if !st.success() {
        bail!("flux-fuzz: {st} (an abort means an allocation or crash outside a panic: rerun the target named last)");
    }
    Ok(())
}

/// The workspace root (the parent of this crate's folder).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["golden", "gen", rest @ ..] => golden::generate(rest),
        ["golden", rest @ ..] => golden::check(rest),
        ["bench", rest @ ..] => bench::bench(rest),
        ["fullsize", rest @ ..] => fullsize::fullsize(rest),
        ["gpu", rest @ ..] => gpu::gpu(rest),
        ["fuzz", rest @ ..] => fuzz(rest),
        [] | ["help"] | ["--help"] | ["-h"] => {
            print!("{HELP}{}", gpu::HELP);
            Ok(())
        }
        other => {
            eprint!("{HELP}{}", gpu::HELP);
            bail!("unknown command {other:?}")
        }
    }
}
