//! `flux-fuzz run [--target NAME] [--minutes M] [--inputs N] [--seed S] [--mem-gb G]`: fuzzes
//! each target (all by default) and prints one line per target; panicking inputs are saved in
//! `target/fuzz-crashes/<target>/`. Memory is capped (`--mem-gb`, default 4) so that an
//! allocation sized from a corrupt header fails at once instead of exhausting the machine;
//! such a failure aborts the process, and the line printed before it names the target.
//!
//! `flux-fuzz seed DIR`: writes the seed corpus (small valid files of every kind) into DIR.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flux_fuzz::{fuzz, targets, Budget};

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{name} needs a value"))?;
            Ok(Some(
                v.parse()
                    .map_err(|_| anyhow::anyhow!("{name}: bad value {v}"))?,
            ))
        }
    }
}

fn limit_memory(gb: u64) {
    let bytes = gb << 30;
    let lim = libc_rlimit(bytes);
    if !lim {
        eprintln!("flux-fuzz: could not cap memory at {gb} GB");
    }
}

#[cfg(unix)]
fn libc_rlimit(bytes: u64) -> bool {
    // RLIMIT_AS through the C library, without a libc crate dependency
    #[repr(C)]
    struct RLimit {
        cur: u64,
        max: u64,
    }
    extern "C" {
        fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
    }
    const RLIMIT_AS: i32 = 9;
    let r = RLimit {
        cur: bytes,
        max: bytes,
    };
    // SAFETY: setrlimit reads one struct of the layout above.
    unsafe { setrlimit(RLIMIT_AS, &r) == 0 }
}

#[cfg(not(unix))]
fn libc_rlimit(_: u64) -> bool {
    false
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(&args),
        Some("seed") => {
            let dir = args.get(1).context("usage: flux-fuzz seed DIR")?;
            seed::write_corpus(Path::new(dir))
        }
        _ => bail!(
            "usage: flux-fuzz run [--target NAME] [--minutes M] [--inputs N] [--seed S] | seed DIR"
        ),
    }
}

fn run(args: &[String]) -> Result<()> {
    let only: Option<String> = arg(args, "--target")?;
    let minutes: Option<f64> = arg(args, "--minutes")?;
    let inputs: u64 = arg(args, "--inputs")?.unwrap_or(u64::MAX);
    let seed: u64 = arg(args, "--seed")?.unwrap_or(1);
    limit_memory(arg(args, "--mem-gb")?.unwrap_or(4));
    if minutes.is_none() && inputs == u64::MAX {
        bail!("give --minutes or --inputs");
    }
    let all = targets();
    let chosen: Vec<_> = all
        .iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.name))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no target {only:?}; targets: {}",
            all.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        );
    }
    let crashes = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-crashes");
    let per = minutes.map(|m| Duration::from_secs_f64(m * 60.0 / chosen.len() as f64));
    let mut failed = 0;
    for t in chosen {
        eprintln!("flux-fuzz: {} …", t.name);
        let start = Instant::now();
        let budget = Budget {
            inputs,
            until: per.map(|d| start + d),
        };
        let r = fuzz(t, seed, budget, Some(&crashes));
        let secs = start.elapsed().as_secs_f64();
        println!(
            "fuzz: target={} inputs={} panics={} secs={secs:.1} rate={:.0}/s",
            t.name,
            r.inputs,
            r.panics.len(),
            r.inputs as f64 / secs.max(1e-9)
        );
        for (i, msg, saved) in r.panics.iter().take(10) {
            let at = saved
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            println!("  input {i}: {msg} {at}");
        }
        failed += r.panics.len();
    }
    if failed > 0 {
        bail!("{failed} panicking inputs");
    }
    Ok(())
}

mod seed {
    //! The seed corpus: small valid files of every kind the targets read.

    use std::collections::HashMap;
    use std::path::Path;

    use anyhow::Result;
    use candle::{DType, Device, Tensor};

    fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)?;
        Ok(())
    }

    pub fn write_corpus(dir: &Path) -> Result<()> {
        let dev = Device::Cpu;
        // safetensors: a few dtypes and ranks, BFL-like names
        let mut t = HashMap::new();
        t.insert(
            "img_in.weight".to_string(),
            Tensor::arange(0f32, 32.0, &dev)?.reshape((4, 8))?,
        );
        t.insert(
            "img_in.bias".to_string(),
            Tensor::ones(4, DType::BF16, &dev)?,
        );
        t.insert(
            "txt_in.weight".to_string(),
            Tensor::ones((2, 4), DType::F16, &dev)?,
        );
        let tmp = std::env::temp_dir().join(format!("flux-fuzz-seed-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let st = tmp.join("a.safetensors");
        candle::safetensors::save(&t, &st)?;
        put(
            dir,
            "safetensors",
            "bfl-small.safetensors",
            &std::fs::read(&st)?,
        )?;
        // GGUF: one tensor of a float type and two block types
        use flux_kernels::gguf::{self, TensorOut, Value};
        use flux_kernels::QuantType;
        let mut data = vec![];
        let specs = [
            ("img_in.weight", QuantType::Q8_0, vec![2usize, 32usize]),
            ("txt_in.weight", QuantType::Q4_K, vec![256]),
            ("img_in.bias", QuantType::F16, vec![2]),
        ];
        for (_, ty, shape) in &specs {
            let n: usize = shape.iter().product();
            let inner = *shape.last().unwrap_or(&1);
            let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            data.push(flux_kernels::quantize(*ty, &values, inner)?);
        }
        let tensors: Vec<TensorOut> = specs
            .iter()
            .zip(&data)
            .map(|((name, ty, shape), d)| TensorOut {
                name,
                ty: *ty,
                shape,
                data: d,
            })
            .collect();
        let meta = [
            ("general.architecture", Value::Str("flux".into())),
            ("general.quantization_version", Value::U64(2)),
        ];
        let g = tmp.join("a.gguf");
        gguf::write(&g, &meta, &tensors)?;
        put(dir, "gguf", "small.gguf", &std::fs::read(&g)?)?;
        // PNG with parameters
        let params: flux_pipeline::ImageParams = serde_json::from_value(serde_json::json!({
            "prompt": "a cat", "prompt_2": null, "model": "black-forest-labs/FLUX.1-schnell",
            "seed": 1, "steps": 4, "guidance": null, "width": 8, "height": 8, "dtype": "f32",
            "max_sequence_length": 256, "version": "0.1.0"
        }))?;
        let image = flux_vae::Rgb8 {
            width: 8,
            height: 8,
            data: (0..8 * 8 * 3).map(|i| (i * 7) as u8).collect(),
        };
        let png = tmp.join("a.png");
        flux_pipeline::write_png(&png, &image, &params)?;
        put(dir, "png", "params.png", &std::fs::read(&png)?)?;
        // configs: the committed tiny model's, and FLUX.1's own shape
        let tiny =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../flux-pipeline/tests/golden/tiny-dev");
        for (target, rel) in [
            ("dit-config", "transformer/config.json"),
            ("vae-config", "vae/config.json"),
            ("t5-config", "text_encoder_2/config.json"),
            ("clip-config", "text_encoder/config.json"),
            ("shard-index", "text_encoder_2/model.safetensors.index.json"),
        ] {
            put(dir, target, "tiny.json", &std::fs::read(tiny.join(rel))?)?;
        }
        put(
            dir,
            "dit-config",
            "flux-dev.json",
            br#"{"_class_name":"FluxTransformer2DModel","attention_head_dim":128,"axes_dims_rope":[16,56,56],"guidance_embeds":true,"in_channels":64,"joint_attention_dim":4096,"num_attention_heads":24,"num_layers":19,"num_single_layers":38,"patch_size":1,"pooled_projection_dim":768}"#,
        )?;
        // tokenizers: a tiny unigram tokenizer.json and a tiny CLIP vocabulary
        put(
            dir,
            "t5-tokenizer",
            "tiny-unigram.json",
            br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":0,"content":"<pad>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},{"id":1,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},{"id":2,"content":"<unk>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":null,"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"WhitespaceSplit"},{"type":"Metaspace","replacement":"\u2581","prepend_scheme":"always","split":true}]},"post_processor":null,"decoder":null,"model":{"type":"Unigram","unk_id":2,"vocab":[["<pad>",0.0],["</s>",0.0],["<unk>",0.0],["\u2581a",-1.0],["\u2581cat",-2.0],["\u2581photo",-2.5],["\u2581of",-1.5],["\u2581",-3.0],["c",-4.0],["a",-4.0],["t",-4.0]],"byte_fallback":false}}"#,
        )?;
        put(
            dir,
            "clip-vocab",
            "tiny-vocab.json",
            br#"{"a</w>":0,"c":1,"a":2,"t</w>":3,"ca":4,"cat</w>":5,"photo</w>":6,"of</w>":7,"<|startoftext|>":8,"<|endoftext|>":9}"#,
        )?;
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(())
    }
}
