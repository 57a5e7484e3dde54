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

/// The lines of the help for one command (its entries and their continuation lines), or
/// `None` for a command the help does not name.
fn command_help(cmd: &str) -> Option<String> {
    let full = format!("{HELP}{}", gpu::HELP);
    let mut out = String::new();
    let mut inside = false;
    for line in full.lines() {
        let entry = line.strip_prefix("  ").filter(|l| !l.starts_with(' '));
        match entry {
            Some(l) => inside = l.split_whitespace().next() == Some(cmd),
            None if !line.starts_with("   ") => inside = false,
            None => {}
        }
        if inside {
            out += line;
            out += "\n";
        }
    }
    (!out.is_empty()).then(|| format!("cargo xtask {cmd} …\n\n{out}"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // `cargo xtask CMD --help` (or -h, or `help` after the command): that command's help, before
    // anything runs
    if let [cmd, rest @ ..] = args.as_slice() {
        if rest.iter().any(|a| matches!(*a, "--help" | "-h" | "help")) {
            match command_help(cmd) {
                Some(h) => {
                    print!("{h}");
                    return Ok(());
                }
                None => {
                    eprint!("{HELP}{}", gpu::HELP);
                    bail!("unknown command {cmd:?}");
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::command_help;

    #[test]
    fn every_command_has_its_own_help() {
        for (cmd, wants) in [
            ("gpu", ["gpu check", "gpu build", "gpu run"].as_slice()),
            ("golden", &["golden [--crate NAME]", "golden gen"]),
            ("bench", &["bench [--depth D]", "bench --quant"]),
            ("fullsize", &["fullsize [--threads T]"]),
            ("fuzz", &["fuzz --minutes N"]),
        ] {
            let h = command_help(cmd).unwrap_or_else(|| panic!("no help for {cmd}"));
            for w in wants {
                assert!(h.contains(w), "{cmd}: {w:?} missing from\n{h}");
            }
            // only that command's entries
            assert!(!h.contains("  help "), "{cmd}:\n{h}");
        }
        assert!(command_help("gpu").unwrap().contains("ptxas"));
        assert!(!command_help("gpu").unwrap().contains("golden gen"));
        assert!(command_help("nope").is_none());
    }
}
