//! `flux`: generate images with FLUX.1 from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use flux_pipeline::{
    check_writable, peak_rss, read_png, write_png, Components, Error, FileRef, FluxPipeline,
    GenerateRequest, ModelSource, PipelineOptions, SCHNELL_REPO,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Large activations are reused rather than returned to the system between blocks and steps.
#[global_allocator]
static ALLOC: flux_kernels::ReuseAlloc = flux_kernels::ReuseAlloc::new();

#[derive(Parser)]
#[command(name = "flux", version, about = "FLUX.1 text-to-image in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Generate(Box<Generate>),
    /// Convert a transformer file (any supported format) to GGUF, as city96's converter does.
    Convert(Convert),
}

#[derive(clap::Args)]
struct Convert {
    /// The block type: q8_0, q6_k, q5_k, q5_0, q5_1, q4_k, q4_0, q4_1, q3_k, q2_k, f16, bf16.
    #[arg(long, value_parser = parse_quant_type)]
    to: flux_kernels::QuantType,
    /// The transformer to convert (BFL names: safetensors, fp8, GGUF, prefixed or all-in-one).
    input: PathBuf,
    /// The GGUF file to write (never overwritten unless --overwrite).
    output: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// A diffusers transformer config.json, for models whose shapes cannot tell their config
    /// (FLUX.1 files never need it).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn parse_quant_type(s: &str) -> Result<flux_kernels::QuantType, String> {
    flux_kernels::QuantType::parse(s).ok_or_else(|| {
        format!("unknown type `{s}`; one of q8_0, q6_k, q5_k, q5_0, q5_1, q4_k, q4_0, q4_1, q3_k, q2_k, f16, bf16, f32")
    })
}

/// `--quantize`: a GGUF block type or `fp8` (e4m3 with a per-tensor scale).
fn parse_encoding(s: &str) -> Result<flux_kernels::Encoding, String> {
    use flux_kernels::{Encoding, Fp8Kind};
    match s.to_ascii_lowercase().as_str() {
        "fp8" | "fp8_e4m3" | "e4m3" => Ok(Encoding::Fp8(Fp8Kind::E4M3)),
        "fp8_e5m2" | "e5m2" => Ok(Encoding::Fp8(Fp8Kind::E5M2)),
        _ => match parse_quant_type(s)? {
            t if t.is_quantized() => Ok(Encoding::Gguf(t)),
            t => Err(format!(
                "{t} is not a quantized type; try q8_0, q6_k, q5_k, q4_k, q4_0 or fp8"
            )),
        },
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
struct Generate {
    /// The prompt.
    #[arg(long, short)]
    prompt: Option<String>,
    /// A separate prompt for T5 (diffusers' prompt_2).
    #[arg(long)]
    prompt_2: Option<String>,
    /// A file with one prompt per line (empty lines skipped).
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Re-run the generation stored in a PNG written by flux (other flags override it).
    #[arg(long)]
    from_image: Option<PathBuf>,
    /// Model: `schnell`, `dev`, a hub id (owner/name) or a local diffusers folder.
    #[arg(long, short, default_value = SCHNELL_REPO)]
    model: String,
    /// Width in pixels (multiple of 16).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (multiple of 16).
    #[arg(long)]
    height: Option<usize>,
    /// Sampling steps (default 4 for schnell, 28 for dev).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance (dev; default 3.5). Ignored by schnell.
    #[arg(long)]
    guidance: Option<f32>,
    /// Seeds: one per image, or one base seed; random (and printed) when absent.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    seed: Vec<u64>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Output file or pattern ({seed}, {index}).
    #[arg(long, short, default_value = "flux-{seed}.png")]
    output: String,
    /// Compute dtype (f32 on CPU; bf16 suits GPUs).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Use only the local Hugging Face cache.
    #[arg(long)]
    offline: bool,
    /// Decode in tiles (large images in bounded memory).
    #[arg(long)]
    tiled_vae: bool,
    /// The transformer from this file instead of the model's (any format: safetensors, fp8,
    /// GGUF; a local path or `owner/name:file` on the hub, of which only that file is fetched).
    #[arg(long)]
    transformer: Option<String>,
    /// The T5 encoder from this file (safetensors, fp8 or a llama.cpp-layout GGUF).
    #[arg(long)]
    t5: Option<String>,
    /// The CLIP-L text model from this file.
    #[arg(long)]
    clip: Option<String>,
    /// The autoencoder from this file (BFL's ae.safetensors layout).
    #[arg(long)]
    vae: Option<String>,
    /// One all-in-one file holding the transformer, CLIP, T5 and the VAE (ComfyUI's layout);
    /// --transformer/--t5/--clip/--vae still replace single parts of it.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Quantize the transformer's block weights while loading: q8_0, q6_k, q5_k, q4_k, q4_0
    /// or fp8 (weights already quantized in the file are kept).
    #[arg(long, value_parser = parse_encoding)]
    quantize: Option<flux_kernels::Encoding>,
    /// How quantized weights are multiplied on the CPU: `decode` (into f32 per product; weights
    /// stay at their file size) or `integer` (candle's integer kernels for Q8_0/Q4_K/Q6_K where
    /// this CPU has them: faster, about twice the weight memory).
    #[arg(long, value_enum, default_value = "decode")]
    quant_matmul: QuantMatmulArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantMatmulArg {
    Decode,
    Integer,
}

fn output_path(pattern: &str, seed: u64, index: usize, count: usize) -> PathBuf {
    let mut s = pattern
        .replace("{seed}", &seed.to_string())
        .replace("{index}", &index.to_string());
    if count > 1 && !pattern.contains("{seed}") && !pattern.contains("{index}") {
        let p = Path::new(&s);
        let stem = p
            .file_stem()
            .map(|x| x.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = p
            .extension()
            .map(|x| x.to_string_lossy().into_owned())
            .unwrap_or_else(|| "png".into());
        s = p
            .with_file_name(format!("{stem}-{index}.{ext}"))
            .to_string_lossy()
            .into_owned();
    }
    PathBuf::from(s)
}

fn run(args: Generate) -> Result<(), Error> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            if !cfg!(feature = "cuda") {
                return Err(Error::Device(
                    "this flux was built without CUDA support; rebuild with `--features cuda` (needs the CUDA toolkit)".into(),
                ));
            }
            Device::new_cuda(0)
                .map_err(|e| Error::Device(format!("cannot open CUDA device 0: {e}")))?
        }
    };
    let dtype = match args.dtype {
        Some(DtypeArg::F32) => DType::F32,
        Some(DtypeArg::Bf16) => DType::BF16,
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    };
    // Request: from a previous image, then the flags.
    let mut req = GenerateRequest::default();
    let mut model = args.model.clone();
    if let Some(png) = &args.from_image {
        let params = read_png(png)?.params.ok_or_else(|| Error::Io {
            path: png.clone(),
            reason: "no flux generation parameters in this PNG".into(),
        })?;
        req.prompts = vec![params.prompt];
        req.prompts_2 = params.prompt_2.map(|p| vec![p]);
        req.width = params.width;
        req.height = params.height;
        req.steps = Some(params.steps);
        req.guidance = params.guidance;
        req.seeds = vec![params.seed];
        req.max_sequence_length = Some(params.max_sequence_length);
        if args.model == SCHNELL_REPO {
            model = params.model;
        }
    }
    if let Some(p) = args.prompt {
        req.prompts = vec![p];
    }
    if let Some(f) = &args.prompt_file {
        let text = std::fs::read_to_string(f).map_err(|e| Error::Io {
            path: f.clone(),
            reason: e.to_string(),
        })?;
        req.prompts = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
    }
    if let Some(p2) = args.prompt_2 {
        req.prompts_2 = Some(vec![p2; req.prompts.len()]);
    }
    if req.prompts.is_empty() {
        return Err(Error::InvalidRequest(
            "give --prompt, --prompt-file or --from-image".into(),
        ));
    }
    req.width = args.width.unwrap_or(req.width);
    req.height = args.height.unwrap_or(req.height);
    req.steps = args.steps.or(req.steps);
    req.guidance = args.guidance.or(req.guidance);
    if !args.seed.is_empty() {
        req.seeds = args.seed.clone();
    }
    req.num_images = args.num_images;
    flux_kernels::set_quant_matmul(match args.quant_matmul {
        QuantMatmulArg::Decode => flux_kernels::QuantMatmul::Decode,
        QuantMatmulArg::Integer => flux_kernels::QuantMatmul::Integer,
    });
    let opts = PipelineOptions {
        dtype,
        device,
        tiled_vae: args.tiled_vae.then(Default::default),
        quantize: args.quantize,
        ..Default::default()
    };
    let file = |s: &Option<String>| s.as_deref().map(FileRef::parse).transpose();
    let mut components = match file(&args.checkpoint)? {
        Some(f) => Components::all_in_one(f),
        None => Components::default(),
    };
    for (slot, arg) in [
        (&mut components.transformer, &args.transformer),
        (&mut components.t5, &args.t5),
        (&mut components.clip, &args.clip),
        (&mut components.vae, &args.vae),
    ] {
        if let Some(f) = file(arg)? {
            *slot = Some(f);
        }
    }
    // Fail on unwritable outputs before any expensive work.
    let count = req.prompts.len() * req.num_images;
    let probe = output_path(
        &args.output,
        req.seeds.first().copied().unwrap_or(0),
        0,
        count,
    );
    check_writable(&probe)?;
    let source = ModelSource::parse(&model, args.offline)?;
    let mut pipe = FluxPipeline::new(source.resolve_with(&components)?, opts)?;
    let steps = req.steps.unwrap_or(pipe.default_steps());
    let started = Instant::now();
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut step_start = Instant::now();
    let out = pipe.generate(&req, |p, _| {
        if p.step == 0 {
            bar.reset();
            bar.set_prefix(format!("image {}/{}", p.image + 1, p.images));
            step_start = Instant::now();
        }
        bar.set_position(p.step as u64 + 1);
        let per = step_start.elapsed().as_secs_f64() / (p.step + 1) as f64;
        bar.set_message(format!("{per:.2} s/step"));
    })?;
    bar.finish_and_clear();
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    for (i, g) in out.images.iter().enumerate() {
        let path = output_path(&args.output, g.params.seed, i, out.images.len());
        write_png(&path, &g.rgb, &g.params)?;
        println!("{} (seed {})", path.display(), g.params.seed);
    }
    let t = out.times;
    let rss = peak_rss()
        .map(|b| format!(", peak memory {:.0} MiB", b as f64 / 1048576.0))
        .unwrap_or_default();
    eprintln!(
        "encode {:.1} s, denoise {:.1} s, decode {:.1} s, total {:.1} s{rss}",
        t.encode.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.decode.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn convert(args: Convert) -> Result<(), Error> {
    if args.output.exists() && !args.overwrite {
        return Err(Error::Io {
            path: args.output.clone(),
            reason: "exists; pass --overwrite to replace it".into(),
        });
    }
    check_writable(&args.output)?;
    let started = Instant::now();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("converting [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let config = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::Io {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            Some(flux_dit::Config::from_diffusers_json(&text)?)
        }
        None => None,
    };
    let report = flux_dit::convert_to_gguf(
        &args.input,
        config.as_ref(),
        &args.output,
        args.to,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "{} ({} FLUX transformer, {}; {:.2} GB of tensors) in {:.1} s",
        args.output.display(),
        report.config.variant(),
        types.join(", "),
        report.bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(g) => run(*g),
        Command::Convert(c) => convert(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(h) = e.hint() {
                eprintln!("hint: {h}");
            }
            ExitCode::FAILURE
        }
    }
}
