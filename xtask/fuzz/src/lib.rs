//! Seeded mutation fuzzing, on stable Rust, of every parser that reads user files: each target
//! takes bytes, writes them where the parser expects a file when it needs one, and parses
//! them; an `Err` is the right answer to garbage, a panic is a bug. Inputs are the committed
//! seeds (`corpus/<target>/`) mutated by a deterministic generator, so a run is reproducible
//! from its seed and input count; `regressions/<target>/` holds inputs that once failed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle::{DType, Device};

/// One parser under test.
pub struct Target {
    /// Name (also the corpus folder's).
    pub name: &'static str,
    /// Parses `bytes`; `scratch` is a folder it may write its input files into.
    pub run: fn(bytes: &[u8], scratch: &Path),
}

fn write(scratch: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch.join(name);
    std::fs::write(&p, bytes).expect("the scratch folder is writable");
    p
}

/// Everything a checkpoint can be asked for: each tensor dense, as a linear weight, and the
/// transformer config detected from its shapes.
fn exercise_checkpoint(p: &Path) {
    let Ok(ck) = flux_kernels::Checkpoint::open(&[p.to_path_buf()], DType::F32, &Device::Cpu)
    else {
        return;
    };
    for name in ck.names().into_iter().take(32) {
        let shape = ck.shape(&name).map(<[usize]>::to_vec).unwrap_or_default();
        let _ = ck.get(&name, None);
        if shape.len() == 2 {
            let _ = ck.linear(&name, None, shape[1], shape[0]);
        }
    }
    if let Ok(w) = flux_dit::Weights::open_file(p, DType::F32, &Device::Cpu) {
        let _ = w.detect_config();
    }
    let _ = flux_text::T5Config::detect(&ck);
}

/// The tiny dev transformer of flux-dit's goldens (the LoRA seeds' model), zero weights.
fn tiny_dit() -> Option<flux_dit::Flux> {
    let cfg = flux_dit::Config {
        in_channels: 16,
        out_channels: 16,
        vec_in_dim: 20,
        context_in_dim: 24,
        hidden_size: 16,
        mlp_ratio: 4.0,
        num_heads: 2,
        depth: 2,
        depth_single_blocks: 2,
        axes_dim: vec![2, 2, 4],
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: true,
    };
    let t = flux_dit::bfl_tensor_shapes(&cfg)
        .into_iter()
        .map(|(k, s)| Ok((k, candle::Tensor::zeros(s, DType::F32, &Device::Cpu)?)))
        .collect::<candle::Result<std::collections::HashMap<_, _>>>()
        .ok()?;
    let ck = flux_kernels::Checkpoint::from_tensors(t, DType::F32, &Device::Cpu, "tiny").ok()?;
    let w = flux_dit::Weights::from_checkpoint(ck, flux_dit::Layout::Bfl);
    flux_dit::Flux::load(&cfg, &w, Default::default()).ok()
}

/// A LoRA file read, checked against the tiny transformer and applied to it both ways.
fn exercise_lora(p: &Path) {
    let Ok(lora) = flux_dit::Lora::open(p) else {
        return;
    };
    let mut set = flux_dit::LoraSet::new();
    set.push(std::sync::Arc::new(lora), 0.7);
    let Some(mut m) = tiny_dit() else {
        return;
    };
    for mode in [flux_dit::LoraMode::Merge, flux_dit::LoraMode::Runtime] {
        let opts = flux_dit::LoraOptions {
            mode,
            lenient: true,
            ..Default::default()
        };
        let _ = set.check(m.config(), opts);
        let _ = m.apply_loras(&set, opts);
    }
}

fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// Every target.
pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "safetensors",
            run: |b, s| exercise_checkpoint(&write(s, "in.safetensors", b)),
        },
        Target {
            name: "gguf",
            run: |b, s| {
                let _ = flux_kernels::gguf::parse(b);
                exercise_checkpoint(&write(s, "in.gguf", b));
            },
        },
        Target {
            name: "lora",
            run: |b, s| exercise_lora(&write(s, "in.safetensors", b)),
        },
        Target {
            name: "png",
            run: |b, s| {
                let _ = flux_pipeline::read_png(&write(s, "in.png", b));
            },
        },
        Target {
            name: "dit-config",
            run: |b, _| {
                if let Ok(c) = flux_dit::Config::from_diffusers_json(&text(b)) {
                    let _ = flux_dit::bfl_tensor_shapes(&c);
                }
            },
        },
        Target {
            name: "vae-config",
            run: |b, _| {
                let _ = flux_vae::Config::from_diffusers_json(&text(b));
            },
        },
        Target {
            name: "t5-config",
            run: |b, _| {
                if let Ok(c) = flux_text::T5Config::from_json(&text(b)) {
                    if c.validate().is_ok() {
                        let _ = c.tensor_shapes();
                    }
                }
            },
        },
        Target {
            name: "clip-config",
            run: |b, _| {
                if let Ok(c) = flux_text::ClipConfig::from_json(&text(b)) {
                    if c.validate().is_ok() {
                        let _ = c.tensor_shapes("text_model.");
                    }
                }
            },
        },
        Target {
            name: "shard-index",
            run: |b, s| {
                write(s, "model.safetensors.index.json", b);
                let _ = flux_kernels::sharded_files(s, "model");
                let _ = std::fs::remove_file(s.join("model.safetensors.index.json"));
            },
        },
        Target {
            name: "t5-tokenizer",
            run: |b, s| {
                if let Ok(t) = flux_text::T5Tokenizer::from_file(write(s, "tokenizer.json", b), 32)
                {
                    let _ = t.encode("a photo of a cat </s> 日本");
                }
            },
        },
        Target {
            name: "clip-vocab",
            run: |b, s| {
                let merges = write(s, "merges.txt", b"#version: 0.2\nc a\nca t\n");
                if let Ok(t) =
                    flux_text::ClipTokenizer::from_vocab_merges(write(s, "vocab.json", b), merges)
                {
                    let _ = t.encode("a photo of a cat");
                }
            },
        },
    ]
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// From a seed (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545F4914F6CDD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// A position biased towards the start, where headers live.
fn pos(rng: &mut Rng, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let window = len.min(1 << (4 + rng.below(14)));
    rng.below(window)
}

/// One mutant of `seed`: 1–4 edits (bit flips, interesting bytes and integers, deletions,
/// insertions, duplications, truncation, numbers in text replaced by extreme ones).
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let p = pos(rng, len);
                v[p] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let p = pos(rng, len);
                v[p] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 if len >= 8 => {
                let p = pos(rng, len - 7);
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let bytes = x.to_le_bytes();
                v[p..p + width].copy_from_slice(&bytes[..width]);
            }
            3 if len > 0 => {
                let p = pos(rng, len);
                let n = 1 + rng.below((len - p).min(64));
                v.drain(p..p + n);
            }
            4 => {
                let p = pos(rng, len);
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.bits() as u8).collect();
                v.splice(p..p, ins);
            }
            5 if len > 0 => {
                let p = pos(rng, len);
                let n = 1 + rng.below((len - p).min(256));
                let chunk = v[p..p + n].to_vec();
                let q = pos(rng, len);
                v.splice(q..q, chunk);
            }
            6 if len > 0 => v.truncate(pos(rng, len)),
            7 => {
                // a number in text: the first digit run after a random point
                let start = pos(rng, len);
                if let Some(i) = v[start..].iter().position(u8::is_ascii_digit) {
                    let i = start + i;
                    let j = v[i..]
                        .iter()
                        .position(|c| !c.is_ascii_digit())
                        .map_or(len, |k| i + k);
                    let with: &[u8] = match rng.below(6) {
                        0 => b"0",
                        1 => b"-1",
                        2 => b"4294967296",
                        3 => b"18446744073709551615",
                        4 => b"99999999999999999999999",
                        _ => b"1e309",
                    };
                    v.splice(i..j, with.iter().copied());
                }
            }
            _ => {
                let p = pos(rng, len);
                v.insert(p, INTERESTING[rng.below(INTERESTING.len())] as u8);
            }
        }
    }
    v
}

/// The committed seeds of `target` (`xtask/fuzz/corpus/<target>/`).
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    files_in(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target),
    )
}

/// Inputs that once failed (`xtask/fuzz/regressions/<target>/`).
pub fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v.into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn files_in(dir: &Path) -> Vec<Vec<u8>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v.into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// How long a run goes on.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// At most this many inputs.
    pub inputs: u64,
    /// And no longer than this.
    pub until: Option<Instant>,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs tried (seeds included).
    pub inputs: u64,
    /// Panics: the input's index, its message, and where it was saved.
    pub panics: Vec<(u64, String, Option<PathBuf>)>,
}

/// Runs one input, catching a panic (its message).
pub fn run_one(t: &Target, bytes: &[u8], scratch: &Path) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| (t.run)(bytes, scratch))).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// Fuzzes `t` from its corpus with generator `seed`; panicking inputs are written into
/// `crashes` when given. Panic messages are silenced for the run (and reported).
pub fn fuzz(t: &Target, seed: u64, budget: Budget, crashes: Option<&Path>) -> Report {
    let seeds = corpus(t.name);
    let scratch = std::env::temp_dir().join(format!(
        "flux-fuzz-{}-{}-{}",
        t.name,
        std::process::id(),
        seed
    ));
    std::fs::create_dir_all(&scratch).expect("a scratch folder");
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let empty = vec![vec![]];
    let pool = if seeds.is_empty() { &empty } else { &seeds };
    while report.inputs < budget.inputs && budget.until.is_none_or(|u| Instant::now() < u) {
        let i = report.inputs;
        let input = if (i as usize) < pool.len() {
            pool[i as usize].clone()
        } else {
            let base = &pool[rng.below(pool.len())];
            mutate(&mut rng, base)
        };
        if let Err(msg) = run_one(t, &input, &scratch) {
            let saved = crashes.and_then(|d| {
                let d = d.join(t.name);
                std::fs::create_dir_all(&d).ok()?;
                let p = d.join(format!("seed{seed}-input{i}"));
                std::fs::write(&p, &input).ok().map(|_| p)
            });
            report.panics.push((i, msg, saved));
        }
        report.inputs += 1;
    }
    std::panic::set_hook(hook);
    let _ = std::fs::remove_dir_all(&scratch);
    report
}
