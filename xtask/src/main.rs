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
                                   (COMPONENT: kernels, sampler, dit, vae,
                                   text, pipeline; default all). --verify regenerates
                                   into a temporary folder and checks the committed files are
                                   byte-identical.
  bench [--depth D] [--single S] [--res 256,512] [--threads T] [--iters N]
                                   time our transformer against candle-transformers and
                                   PyTorch on the same seeded weights (full width, reduced
                                   depth; default 1 double + 2 single blocks, 2 threads)
  bench --pipeline                 the tiny end-to-end pipeline, time per stage
  bench --quant q8_0,q4_k          the transformer from GGUF (ours, decode and integer
                                   kernels) against stable-diffusion.cpp on the same file
  fullsize [--threads T]           full-size random-weight GGUF/T5/CLIP/VAE files (written once
                                   into target/fullsize): load, run, peak memory vs file size,
                                   and the whole pipeline inside 24 GB
  help                             this text
";

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
