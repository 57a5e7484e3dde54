//! `flux`: generate images with FLUX.1 from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use flux_pipeline::{
    check_writable, peak_rss, read_png, remove_partial_files, Components, Error, FileRef,
    FluxPipeline, GenerateRequest, ModelSource, OutputNames, PipelineOptions, StageTimes,
    SCHNELL_REPO,
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
    /// Edit a picture with FLUX.1-Kontext (`--image` is the picture to edit; the model must be
    /// a Kontext one, e.g. `--model black-forest-labs/FLUX.1-Kontext-dev`).
    Edit(Box<Generate>),
    /// Inpaint or outpaint with FLUX.1-Fill (`--image` with `--mask` or `--outpaint`; the model
    /// must be a Fill one, e.g. `--model black-forest-labs/FLUX.1-Fill-dev`).
    Fill(Box<Generate>),
    /// Image variation with FLUX.1-Redux on a dev or schnell model: `--image` is the picture,
    /// `--redux` the embedder file (flux1-redux-dev.safetensors), `--siglip` the SigLIP
    /// folder (google/siglip-so400m-patch14-384). The prompt defaults to empty (BFL's); give
    /// one to mix it with the picture. Guidance defaults to 2.5.
    Redux(Box<Generate>),
    /// Generate following a picture's structure with FLUX.1-Canny or FLUX.1-Depth (`--canny
    /// PICTURE`: its edges, found as BFL does; `--depth MAP`: a depth map you made). Guidance
    /// defaults to BFL's 30 (Canny) and 10 (Depth).
    Control(Box<Generate>),
    /// Convert a transformer file (any supported format) to GGUF, as city96's converter does.
    Convert(Convert),
    /// Serve images over HTTP (OpenAI-compatible `/v1/images/generations`, a jobs API with
    /// progress events, a web page at `/`, `/health`, `/metrics`), keeping the model loaded;
    /// with `--queue redis://HOST` it loads no model and hands jobs to `flux worker`s.
    Serve(Serve),
    /// Take jobs from a Redis queue that `flux serve --queue` fills, and run them.
    Worker(Worker),
}

/// The model a server or worker keeps loaded.
#[derive(clap::Args)]
struct ModelArgs {
    /// Model: `schnell`, `dev`, a hub id (owner/name) or a local diffusers folder.
    #[arg(long, short, default_value = SCHNELL_REPO)]
    model: String,
    /// Use only the local Hugging Face cache.
    #[arg(long)]
    offline: bool,
    /// Compute dtype (f32 on CPU; bf16 suits GPUs).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Quantize the transformer and T5 while loading (as flux generate --quantize).
    #[arg(long, value_parser = parse_encoding)]
    quantize: Option<flux_kernels::Encoding>,
    /// Multiply the transformer's block layers in fp8 (as flux generate --fp8-gemm).
    #[arg(long)]
    fp8_gemm: bool,
    /// Release the models after every job (the CLI's memory policy: T5 and the transformer are
    /// never resident together) instead of keeping them loaded.
    #[arg(long)]
    low_memory: bool,
    /// Image side when a request gives no size.
    #[arg(long, default_value_t = 1024)]
    default_size: usize,
}

impl ModelArgs {
    /// The model's id in `/v1/models`: a local folder is named by its last component only (no
    /// path of this machine is shown).
    fn id(&self) -> String {
        match Path::new(&self.model).file_name() {
            Some(n) if Path::new(&self.model).is_dir() => n.to_string_lossy().into_owned(),
            _ => self.model.clone(),
        }
    }

    /// Loads the pipeline, kept loaded unless --low-memory (the text encoders are released
    /// between jobs when not everything fits).
    fn load(&self) -> Result<FluxPipeline, Error> {
        let device = open_device(self.device)?;
        let dtype = match self.dtype {
            Some(DtypeArg::F32) => DType::F32,
            Some(DtypeArg::Bf16) => DType::BF16,
            None if device.is_cuda() => DType::BF16,
            None => DType::F32,
        };
        check_fp8_gemm(self.fp8_gemm, self.quantize)?;
        let located = ModelSource::parse(&self.model, self.offline)?.resolve()?;
        let release_text = !self.low_memory
            && text_must_go(located.memory_estimate(dtype, self.quantize), &device);
        let opts = PipelineOptions {
            dtype,
            device,
            keep_loaded: !self.low_memory,
            release_text,
            quantize: self.quantize,
            fp8_gemm: self.fp8_gemm,
            ..Default::default()
        };
        FluxPipeline::new(located, opts)
    }
}

/// Whether the text encoders are released after each job's prompts are encoded: when all the
/// models together (`need`) take more than four fifths of what the device has free, so that
/// T5 and the transformer are resident together only when they fit. Says which on stderr.
fn text_must_go(need: flux_pipeline::MemoryEstimate, device: &Device) -> bool {
    let gb = |b: u64| b as f64 / 1e9;
    let need = need.total();
    let (release, why) = match flux_pipeline::available_memory(device) {
        Some(free) if need as f64 > free as f64 * 0.8 => (
            true,
            format!(
                "{:.1} GB is free: the text encoders are released after each job's prompts are encoded",
                gb(free)
            ),
        ),
        Some(free) => (false, format!("{:.1} GB is free: all kept loaded", gb(free))),
        None => (
            false,
            "this device's free memory is not known: all kept loaded (--low-memory releases them)"
                .into(),
        ),
    };
    eprintln!("models need about {:.1} GB; {why}", gb(need));
    release
}

#[derive(clap::Args)]
struct Serve {
    #[command(flatten)]
    model: ModelArgs,
    /// Hand jobs to workers through this Redis (`redis://HOST[:PORT][/DB]`) instead of running
    /// them here; no model is loaded (--model only names it).
    #[arg(long)]
    queue: Option<String>,
    /// Address to listen on; anything but loopback needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0: any free one, printed).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// The bearer token clients must send (`Authorization: Bearer TOKEN`) [env: FLUX_API_TOKEN].
    #[arg(long)]
    token: Option<String>,
    /// Jobs that may wait (accepted by this server and not started); one more is refused
    /// with 429.
    #[arg(long, default_value_t = 16)]
    queue_size: usize,
    /// Largest width or height a request may ask for.
    #[arg(long, default_value_t = 2048)]
    max_side: usize,
    /// Most steps a request may ask for.
    #[arg(long, default_value_t = 100)]
    max_steps: usize,
    /// Most images per request.
    #[arg(long, default_value_t = 4)]
    max_images: usize,
    /// Seconds a running job may take to finish at shutdown before it is cancelled.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
}

/// `flux serve`: until Ctrl-C or SIGTERM, then a graceful shutdown.
fn serve(args: Serve) -> Result<(), Error> {
    use flux_pipeline::serve::{Limits, ServeOptions, Server};
    let token = args
        .token
        .or_else(|| std::env::var("FLUX_API_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let opts = ServeOptions {
        addr: std::net::SocketAddr::new(args.host, args.port),
        token,
        limits: Limits {
            queue: args.queue_size,
            max_side: args.max_side,
            max_steps: args.max_steps,
            max_images: args.max_images,
            ..Default::default()
        },
        model_id: args.model.id(),
        files: Default::default(),
        default_size: args.model.default_size,
    };
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = match &args.queue {
        Some(q) => Server::start_front(opts, q)?,
        None => Server::start(args.model.load()?, opts)?,
    };
    let _ = ctrlc::set_handler(move || {
        let _ = tx.send(());
    });
    say(format_args!(
        "serving {} on http://{}{}",
        args.model.model,
        server.addr(),
        match &args.queue {
            Some(_) => " (jobs go to the Redis queue's workers)",
            None => "",
        }
    ));
    let _ = rx.recv();
    note(format_args!("shutting down: finishing the running job"));
    server.shutdown(std::time::Duration::from_secs(args.shutdown_grace));
    Ok(())
}

#[derive(clap::Args)]
struct Worker {
    #[command(flatten)]
    model: ModelArgs,
    /// The Redis queue that `flux serve --queue` fills (`redis://HOST[:PORT][/DB]`).
    #[arg(long)]
    queue: String,
    /// This worker's name among the workers (default: host name and process id).
    #[arg(long)]
    name: Option<String>,
    /// Seconds a job may go without its worker's heartbeat before another worker takes it
    /// over and runs it again.
    #[arg(long, default_value_t = 30)]
    claim_timeout: u64,
    /// Runs of a job whose workers died after which it fails.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
}

/// `flux worker`: until Ctrl-C or SIGTERM (the running job is finished first).
fn worker(args: Worker) -> Result<(), Error> {
    use flux_pipeline::serve::{run_worker, WorkerOptions};
    if args.claim_timeout == 0 {
        return Err(Error::InvalidRequest(
            "--claim-timeout is at least 1".into(),
        ));
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into());
    let opts = WorkerOptions {
        queue: args.queue.clone(),
        name: args
            .name
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        claim_timeout: std::time::Duration::from_secs(args.claim_timeout),
        max_attempts: args.max_attempts,
        default_size: args.model.default_size,
        files: Default::default(),
        stop: flux_pipeline::Cancel::new(),
    };
    let pipe = args.model.load()?;
    let stop = opts.stop.clone();
    let _ = ctrlc::set_handler(move || stop.cancel());
    say(format_args!(
        "worker {}: {} loaded; taking jobs from the queue",
        opts.name, args.model.model
    ));
    run_worker(pipe, &opts)
}

/// The device a `--device` flag names.
fn open_device(arg: DeviceArg) -> Result<Device, Error> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !cfg!(feature = "cuda") {
                return Err(Error::Device(
                    "this flux was built without CUDA support; rebuild with `--features cuda` (needs the CUDA toolkit)".into(),
                ));
            }
            let dev = Device::new_cuda(0)
                .map_err(|e| Error::Device(format!("cannot open CUDA device 0: {e}")))?;
            // the driver compiles the kernels' PTX while the weights load (FLUX_CUDA_WARM_UP=0:
            // on first use instead, for comparison)
            #[cfg(feature = "cuda")]
            if let Device::Cuda(cuda) = &dev {
                if std::env::var("FLUX_CUDA_WARM_UP").as_deref() != Ok("0") {
                    drop(flux_kernels::warm_up_cuda(cuda));
                }
            }
            Ok(dev)
        }
    }
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

/// `--outpaint LEFT,TOP,RIGHT,BOTTOM` in pixels.
fn parse_border(s: &str) -> Result<[usize; 4], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{s}`: {e}"))?;
    <[usize; 4]>::try_from(v).map_err(|v| {
        format!(
            "`{s}`: four pixel counts LEFT,TOP,RIGHT,BOTTOM, got {}",
            v.len()
        )
    })
}

/// `--fp8-gemm` multiplies e4m3 weights: `--quantize` may then only be fp8 (checked before
/// anything loads). Memory estimates keep counting the block weights at `--quantize`'s size (an
/// overestimate with fp8 GEMMs: the text encoders are released sooner, never later).
fn check_fp8_gemm(fp8_gemm: bool, quantize: Option<flux_kernels::Encoding>) -> Result<(), Error> {
    let e4m3 = flux_kernels::Encoding::Fp8(flux_kernels::Fp8Kind::E4M3);
    match quantize {
        Some(q) if fp8_gemm && q != e4m3 => Err(Error::InvalidRequest(format!(
            "--fp8-gemm multiplies e4m3 weights: it cannot be combined with --quantize {q}"
        ))),
        _ => Ok(()),
    }
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
enum ReferenceArg {
    Bfl,
    Diffusers,
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
    /// True CFG: what to steer away from (diffusers' negative_prompt); needs --true-cfg above 1.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// True CFG scale (diffusers' true_cfg_scale, e.g. 4): above 1 with --negative-prompt, two
    /// transformer passes per step [default: 1, off].
    #[arg(long)]
    true_cfg: Option<f32>,
    /// img2img: start from this picture (PNG; its size is the output size unless --width and
    /// --height say otherwise, and then it is resized to them: LANCZOS, aspect not kept).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Inpainting: a PNG of the picture's size, white = repaint, black = keep (with --image).
    /// With a FLUX.1-Fill transformer (detected from its 384 input channels) this is Fill.
    #[arg(long, requires = "image")]
    mask: Option<PathBuf>,
    /// Outpainting: grow the picture by LEFT,TOP,RIGHT,BOTTOM pixels and paint the border (with
    /// --image and a FLUX.1-Fill model; the grown sides must be multiples of 16).
    #[arg(long, requires = "image", conflicts_with = "mask", value_parser = parse_border)]
    outpaint: Option<[usize; 4]>,
    /// FLUX.1-Canny: follow this picture's edges (found with BFL's Canny detector, thresholds
    /// 50/200; the picture must have the output size, which it gives by default).
    #[arg(long, conflicts_with_all = ["image", "depth"])]
    canny: Option<PathBuf>,
    /// FLUX.1-Redux: the Redux embedder file (flux1-redux-dev.safetensors).
    #[arg(long)]
    redux: Option<PathBuf>,
    /// FLUX.1-Redux: the SigLIP vision model folder (transformers layout, e.g. a local copy of
    /// google/siglip-so400m-patch14-384).
    #[arg(long)]
    siglip: Option<PathBuf>,
    /// FLUX.1-Depth: follow this depth map (a picture of the output size; near = bright, as
    /// Depth Anything's maps).
    #[arg(long, conflicts_with = "image")]
    depth: Option<PathBuf>,
    /// img2img: how much of the picture to change, in (0, 1] [default: 0.6, as diffusers; 1 for
    /// FLUX.1-Fill models].
    #[arg(long, requires = "image")]
    strength: Option<f64>,
    /// flux edit: keep the picture's own size (it must be on the 16-pixel grid) instead of
    /// resizing it to Kontext's preferred resolution for its aspect ratio (BFL's list).
    #[arg(long)]
    keep_size: bool,
    /// Re-run the generation stored in a PNG written by flux (other flags override it).
    #[arg(long)]
    from_image: Option<PathBuf>,
    /// Model: `schnell`, `dev`, a hub id (owner/name) or a local diffusers folder [default:
    /// black-forest-labs/FLUX.1-schnell, or the one recorded in --from-image].
    #[arg(long, short)]
    model: Option<String>,
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
    /// Transformer rows per pass: images denoised together (true CFG's negative rows count
    /// too, so 2 runs its two passes as one batch), 1 to 64, or `auto`: as many as fit in the
    /// memory available now (CPU). Same images as one at a time; more memory.
    #[arg(long, default_value = "1", value_parser = parse_batch)]
    batch: usize,
    /// Output file or pattern ({seed}, {index} in the file name), or a folder. An existing file
    /// is never replaced: the new one gets a numbered name (`name-1.png`), unless --overwrite.
    #[arg(long, short, default_value = "flux-{seed}.png")]
    output: String,
    /// Replace existing output files instead of numbering new names.
    #[arg(long)]
    overwrite: bool,
    /// Whose conventions to follow where BFL and diffusers differ (noise dtype, schedule,
    /// img2img start step, posterior mean vs sample, Fill's soft mask and T5 length) [default:
    /// bfl for flux edit/fill/control/redux, BFL's tools; diffusers for flux generate].
    #[arg(long, value_enum)]
    reference: Option<ReferenceArg>,
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
    /// Quantize the transformer's block weights and T5's linear weights while loading: q8_0,
    /// q6_k, q5_k, q4_k, q4_0 or fp8 (weights already quantized in the file are kept).
    #[arg(long, value_parser = parse_encoding)]
    quantize: Option<flux_kernels::Encoding>,
    /// Multiply the transformer's block layers in fp8: weights in e4m3 with one scale each
    /// (dense ones encoded while loading), activations quantized per tensor before each product,
    /// cuBLASLt's fp8 GEMMs on CUDA (Hopper/Ada; bf16 or f16 out). On the CPU the rounding is
    /// emulated, to see its effect on an image (slower, not faster). With --quantize only fp8.
    #[arg(long)]
    fp8_gemm: bool,
    /// How quantized weights are multiplied on the CPU: `decode` (into f32 per product; weights
    /// stay at their file size) or `integer` (candle's integer kernels for Q8_0/Q4_K/Q6_K where
    /// this CPU has them: faster, about twice the weight memory).
    #[arg(long, value_enum, default_value = "decode")]
    quant_matmul: QuantMatmulArg,
    /// Apply a LoRA (or LyCORIS LoKr/LoHa, DoRA, full-diff) file with a strength:
    /// `FILE[:STRENGTH]` [default strength 1; BFL's tools use 0.85 for their control LoRAs].
    /// Repeat for several; every layout trainers write is read (kohya, ComfyUI, diffusers/PEFT,
    /// OneTrainer, XLabs, LyCORIS, BFL control, fal Kontext, DiffSynth). Replaces the LoRAs
    /// a --from-image re-run would apply.
    #[arg(long, value_parser = parse_lora)]
    lora: Vec<(PathBuf, f32)>,
    /// Skip (with a warning) LoRA modules that match no layer of the transformer, instead of
    /// failing.
    #[arg(long)]
    lora_lenient: bool,
    /// How LoRAs are applied: `auto` (merged into dense weights, at run time on quantized or fp8
    /// ones), `merge`, or `runtime` (weights untouched).
    #[arg(long, value_enum, default_value = "auto")]
    lora_mode: LoraModeArg,
    /// A --from-image re-run without the LoRAs the image was made with.
    #[arg(long, conflicts_with = "lora")]
    no_lora: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LoraModeArg {
    Auto,
    Merge,
    Runtime,
}

/// `--batch`: 1..=64, or `auto` (0 for the pipeline).
fn parse_batch(s: &str) -> Result<usize, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(0);
    }
    match s.parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("`{s}`: 1 to 64, or auto")),
    }
}

/// `--lora FILE[:STRENGTH]`: the part after the last `:` is the strength when it is a number
/// (so `C:\x.safetensors` and `a:b.safetensors` stay paths).
fn parse_lora(s: &str) -> Result<(PathBuf, f32), String> {
    if let Some((path, m)) = s.rsplit_once(':') {
        if let Ok(m) = m.trim().parse::<f32>() {
            if !m.is_finite() {
                return Err(format!("`{s}`: the strength must be a finite number"));
            }
            if path.is_empty() {
                return Err(format!("`{s}`: no file before the strength"));
            }
            return Ok((PathBuf::from(path), m));
        }
    }
    if s.is_empty() {
        return Err("an empty --lora".into());
    }
    Ok((PathBuf::from(s), 1.0))
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantMatmulArg {
    Decode,
    Integer,
}

/// Largest prompt file read (bytes).
const MAX_PROMPT_FILE: u64 = 16 << 20;
/// Prompts encoded and generated together; a prompt file is worked through in such batches
/// so its embeddings stay bounded.
const PROMPT_BATCH: usize = 16;

/// A line of results on stdout. When the reader has gone (`flux generate … | head -1`) the
/// program ends quietly, having written every image it reported.
fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            remove_partial_files();
            std::process::exit(0);
        }
    }
}

/// A message on stderr; a closed stderr is ignored (never a panic).
fn note(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(line).and_then(|()| err.write_all(b"\n"));
}

/// The prompts of a prompt file: one per line, empty lines skipped. The file is read with a
/// size cap; NUL bytes and invalid UTF-8 are errors naming the line.
fn read_prompt_file(path: &Path) -> Result<Vec<String>, Error> {
    use std::io::Read;
    let io = |reason: String| Error::Io {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| io(e.to_string()))?;
    let mut bytes = vec![];
    f.take(MAX_PROMPT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io(e.to_string()))?;
    if bytes.len() as u64 > MAX_PROMPT_FILE {
        return Err(io(format!(
            "larger than {} MiB; split it",
            MAX_PROMPT_FILE >> 20
        )));
    }
    let line_of = |at: usize| bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(io(format!("line {} contains a NUL byte", line_of(at))));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        io(format!(
            "line {} is not valid UTF-8",
            line_of(e.valid_up_to())
        ))
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Which subcommand runs [`run`]: they share every flag and differ in what they require.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Generate,
    /// `--image` is the picture to edit (Kontext).
    Edit,
    /// `--image` with `--mask` or `--outpaint` (FLUX.1-Fill).
    Fill,
    /// `--canny` or `--depth` (FLUX.1-Canny/Depth).
    Control,
    /// `--image` is the picture for FLUX.1-Redux.
    Redux,
}

/// `flux generate`, `flux edit`, `flux fill` and `flux control`.
fn run(args: Generate, mode: Mode) -> Result<(), Error> {
    let edit = mode == Mode::Edit;
    if mode == Mode::Fill
        && (args.image.is_none() || (args.mask.is_none() && args.outpaint.is_none()))
        && args.from_image.is_none()
    {
        return Err(Error::InvalidRequest(
            "flux fill needs --image and --mask (inpaint) or --outpaint (outpaint)".into(),
        ));
    }
    if mode == Mode::Control
        && args.canny.is_none()
        && args.depth.is_none()
        && args.from_image.is_none()
    {
        return Err(Error::InvalidRequest(
            "flux control needs --canny PICTURE or --depth MAP".into(),
        ));
    }
    if edit && (args.canny.is_some() || args.depth.is_some()) {
        return Err(Error::InvalidRequest(
            "--canny and --depth are for FLUX.1-Canny/Depth (flux control), not for editing".into(),
        ));
    }
    let device = open_device(args.device)?;
    // Request: from a previous image, then the flags.
    let mut req = GenerateRequest::default();
    let mut from = None;
    if let Some(png) = &args.from_image {
        let params = read_png(png)?.params.ok_or_else(|| Error::Io {
            path: png.clone(),
            reason: "no flux generation parameters in this PNG".into(),
        })?;
        req.prompts = vec![params.prompt.clone()];
        req.prompts_2 = params.prompt_2.clone().map(|p| vec![p]);
        req.width = params.width;
        req.height = params.height;
        req.steps = Some(params.steps);
        req.guidance = params.guidance;
        req.seeds = vec![params.seed];
        req.max_sequence_length = Some(params.max_sequence_length);
        from = Some(params);
    }
    let mut warnings = vec![];
    // BFL's conventions for BFL's tools, diffusers' for the rest (and what a re-run records)
    let reference = match (args.reference, &from) {
        (Some(ReferenceArg::Bfl), _) => flux_pipeline::Reference::Bfl,
        (Some(ReferenceArg::Diffusers), _) => flux_pipeline::Reference::Diffusers,
        (None, Some(p)) if p.reference.as_deref() == Some("bfl") => flux_pipeline::Reference::Bfl,
        (None, Some(_)) => flux_pipeline::Reference::Diffusers,
        (None, None) if mode == Mode::Generate => flux_pipeline::Reference::Diffusers,
        (None, None) => flux_pipeline::Reference::Bfl,
    };
    let dtype = match (args.dtype, from.as_ref().map(|p| p.dtype.as_str())) {
        (Some(DtypeArg::F32), _) | (None, Some("f32")) => DType::F32,
        (Some(DtypeArg::Bf16), _) | (None, Some("bf16")) => DType::BF16,
        (None, other) => {
            if let Some(d) = other {
                warnings.push(format!(
                    "the image's dtype `{d}` is unknown here; using the default"
                ));
            }
            if device.is_cuda() {
                DType::BF16
            } else {
                DType::F32
            }
        }
    };
    if let Some(p) = &from {
        let here = if device.is_cuda() { "cuda" } else { "cpu" };
        if let Some(d) = p.device.as_deref().filter(|d| *d != here) {
            warnings.push(format!(
                "the image was made on {d}; on {here} the pixels can differ slightly"
            ));
        }
        if p.version != env!("CARGO_PKG_VERSION") {
            warnings.push(format!(
                "the image was made by flux {}; this is {}",
                p.version,
                env!("CARGO_PKG_VERSION")
            ));
        }
    }
    // the model and its parts: flags, else the image's record; a model named only by the image
    // is never downloaded (only the local cache is read)
    let recorded = |key: &str| from.as_ref().and_then(|p| p.files.get(key).cloned());
    // a picture or file: the flag's (when `when`), else the one the re-run image records
    let path_or_recorded = |flag: &Option<PathBuf>, when: bool, key: &str| {
        flag.clone()
            .filter(|_| when)
            .or_else(|| recorded(key).map(PathBuf::from))
    };
    let (model, from_record) = match (&args.model, &from) {
        (Some(m), _) => (m.clone(), false),
        (None, Some(p)) => (p.model.clone(), true),
        (None, None) => (SCHNELL_REPO.to_string(), false),
    };
    let offline = args.offline || from_record;
    let quantize =
        match (
            args.quantize,
            from.as_ref().and_then(|p| p.quantize.as_deref()),
        ) {
            (Some(q), _) => Some(q),
            (None, Some(q)) => Some(parse_encoding(q).map_err(|e| {
                Error::InvalidRequest(format!("the image's quantization `{q}`: {e}"))
            })?),
            (None, None) => None,
        };
    let tiled_vae = args.tiled_vae || from.as_ref().is_some_and(|p| p.tiled_vae);
    let fp8_gemm = args.fp8_gemm || from.as_ref().is_some_and(|p| p.fp8_gemm);
    check_fp8_gemm(fp8_gemm, quantize)?;
    // a new prompt replaces the image's, its T5 prompt included
    if let Some(p) = args.prompt {
        req.prompts = vec![p];
        req.prompts_2 = None;
    }
    if let Some(f) = &args.prompt_file {
        req.prompts = read_prompt_file(f)?;
        req.prompts_2 = None;
    }
    if let Some(p2) = args.prompt_2 {
        req.prompts_2 = Some(vec![p2; req.prompts.len()]);
    }
    // FLUX.1-Redux: `flux redux --image`, or the picture a re-run image records; BFL's empty
    // prompt unless one is given
    let redux_path = path_or_recorded(&args.image, mode == Mode::Redux, "redux_image");
    if mode == Mode::Redux && redux_path.is_none() {
        return Err(Error::InvalidRequest(
            "flux redux needs --image (the picture to vary)".into(),
        ));
    }
    let redux_file = path_or_recorded(&args.redux, true, "redux");
    let siglip_dir = path_or_recorded(&args.siglip, true, "siglip");
    if let Some(path) = &redux_path {
        let (Some(rf), Some(sd)) = (&redux_file, &siglip_dir) else {
            return Err(Error::InvalidRequest(
                "FLUX.1-Redux needs --redux FILE (flux1-redux-dev.safetensors) and --siglip DIR (google/siglip-so400m-patch14-384)".into(),
            ));
        };
        let picture = read_png(path)?.image;
        let redux = flux_pipeline::Redux::load(sd, rf, dtype, &device)?;
        req.redux = Some(redux.encode(&[picture], &device)?);
        if req.prompts.is_empty() {
            req.prompts = vec![String::new()];
        }
        if args.guidance.is_none() && from.is_none() {
            req.guidance = Some(2.5);
        }
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
    req.negative_prompt = args
        .negative_prompt
        .clone()
        .or_else(|| from.as_ref().and_then(|p| p.negative_prompt.clone()));
    req.true_cfg = args
        .true_cfg
        .or(from.as_ref().and_then(|p| p.true_cfg))
        .unwrap_or(1.0);
    // img2img: the flag's picture, else the one the re-run image records
    // Kontext: `flux edit --image`, or the picture a re-run image records
    let edit_path = path_or_recorded(&args.image, edit, "edit");
    if edit && edit_path.is_none() {
        return Err(Error::InvalidRequest(
            "flux edit needs --image (the picture to edit)".into(),
        ));
    }
    let mut edit_size = None;
    if let Some(path) = &edit_path {
        if args.strength.is_some() || args.mask.is_some() {
            return Err(Error::InvalidRequest(
                "--strength and --mask are img2img/inpainting flags, not for editing".into(),
            ));
        }
        let mut picture = read_png(path)?.image;
        // BFL's flux kontext: the picture resized to its preferred resolution, which is also
        // the output size (unless --keep-size, or the re-run image says otherwise)
        let size = match &from {
            Some(p) => p.edit_size,
            None if args.keep_size => None,
            None => {
                let (w, h) = flux_pipeline::kontext_size(picture.width, picture.height, reference);
                Some([w, h])
            }
        };
        if let Some([w, h]) = size {
            picture = flux_pipeline::resize(&picture, w, h, flux_pipeline::Filter::Lanczos)?;
        }
        edit_size = size;
        if args.width.is_none() && args.height.is_none() && from.is_none() {
            (req.width, req.height) = (picture.width, picture.height);
        }
        req.edit_image = Some(picture);
    }
    let init = path_or_recorded(&args.image, !edit && mode != Mode::Redux, "image");
    let border = args.outpaint.or(from.as_ref().and_then(|p| p.outpaint));
    if let Some(path) = &init {
        let mut picture = read_png(path)?.image;
        let mut grown_mask = None;
        if let Some(b) = border {
            let (canvas, m) = flux_pipeline::outpaint(&picture, b)?;
            picture = canvas;
            grown_mask = Some(m);
        }
        if args.width.is_none() && args.height.is_none() && from.is_none() {
            (req.width, req.height) = (picture.width, picture.height);
        }
        let strength = args
            .strength
            .or(from.as_ref().and_then(|p| p.strength))
            .unwrap_or(0.6);
        let mask_path = path_or_recorded(&args.mask, true, "mask");
        let mask = match (&mask_path, grown_mask) {
            (_, Some(m)) => Some(m),
            (Some(m), None) => Some(read_png(m)?.image),
            (None, None) => None,
        };
        req.image = Some(flux_pipeline::InitImage {
            image: picture,
            strength,
            mask,
        });
    }
    // FLUX.1-Canny/Depth: the control picture (Canny edges found here), BFL's guidance
    let canny = path_or_recorded(&args.canny, true, "canny");
    let depth = path_or_recorded(&args.depth, true, "depth");
    if let Some(path) = canny.as_ref().or(depth.as_ref()) {
        let picture = read_png(path)?.image;
        if args.width.is_none() && args.height.is_none() && from.is_none() {
            (req.width, req.height) = (picture.width, picture.height);
        }
        req.control_image = Some(if canny.is_some() {
            flux_pipeline::canny_control(&picture)?
        } else {
            picture
        });
        if req.guidance.is_none() {
            req.guidance = Some(if canny.is_some() { 30.0 } else { 10.0 });
        }
    }
    flux_kernels::set_quant_matmul(match args.quant_matmul {
        QuantMatmulArg::Decode => flux_kernels::QuantMatmul::Decode,
        QuantMatmulArg::Integer => flux_kernels::QuantMatmul::Integer,
    });
    // LoRAs: the flags, else (unless --no-lora) the ones the re-run image records
    let mut loras = flux_pipeline::LoraSet::new();
    let recorded_loras = from.as_ref().map(|p| p.loras.clone()).unwrap_or_default();
    if !args.lora.is_empty() {
        for (path, m) in &args.lora {
            loras.add(path, *m)?;
        }
    } else if !args.no_lora {
        for l in &recorded_loras {
            let path = PathBuf::from(&l.file);
            if !path.is_file() {
                return Err(Error::InvalidRequest(format!(
                    "the image was made with the LoRA {} (strength {}), which is not there: give it with --lora FILE:{}, or re-run without it with --no-lora",
                    l.file, l.strength, l.strength
                )));
            }
            let sum = flux_pipeline::file_sha256(&path)?;
            if sum != l.sha256 {
                warnings.push(format!(
                    "the LoRA {} changed since the image was made (SHA-256 {}, now {sum})",
                    l.file, l.sha256
                ));
            }
            loras.add(&path, l.strength)?;
        }
    }
    let opts = PipelineOptions {
        dtype,
        device,
        reference,
        tiled_vae: tiled_vae.then(Default::default),
        quantize,
        fp8_gemm,
        batch: args.batch,
        loras,
        lora: flux_pipeline::LoraOptions {
            lenient: args.lora_lenient,
            mode: match args.lora_mode {
                LoraModeArg::Auto => flux_pipeline::LoraMode::Auto,
                LoraModeArg::Merge => flux_pipeline::LoraMode::Merge,
                LoraModeArg::Runtime => flux_pipeline::LoraMode::Runtime,
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let mut files = std::collections::BTreeMap::new();
    let mut sha256 = std::collections::BTreeMap::new();
    let mut file = |key: &str, arg: &Option<String>| -> Result<Option<FileRef>, Error> {
        let Some(s) = arg.clone().or_else(|| recorded(key)) else {
            return Ok(None);
        };
        let f = FileRef::parse(&s)?;
        files.insert(key.to_string(), f.to_string());
        Ok(Some(f))
    };
    let mut components = match file("checkpoint", &args.checkpoint)? {
        Some(f) => Components::all_in_one(f),
        None => Components::default(),
    };
    for (key, arg) in [
        ("transformer", &args.transformer),
        ("t5", &args.t5),
        ("clip", &args.clip),
        ("vae", &args.vae),
    ] {
        if let Some(f) = file(key, arg)? {
            let slot = match key {
                "transformer" => &mut components.transformer,
                "t5" => &mut components.t5,
                "clip" => &mut components.clip,
                _ => &mut components.vae,
            };
            *slot = Some(f);
        }
    }
    let mask = path_or_recorded(&args.mask, true, "mask");
    for (key, path) in [
        ("image", &init),
        ("mask", &mask.filter(|_| init.is_some())),
        ("edit", &edit_path),
        ("canny", &canny),
        ("depth", &depth),
        ("redux_image", &redux_path),
        ("redux", &redux_file.filter(|_| redux_path.is_some())),
    ] {
        if let Some(path) = path {
            let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            files.insert(key.to_string(), abs.display().to_string());
            let sum = flux_pipeline::file_sha256(path)?;
            if let Some(was) = from.as_ref().and_then(|p| p.sha256.get(key)) {
                if *was != sum {
                    warnings.push(format!(
                        "the {key} picture {} changed since the image was made (SHA-256 {was}, now {sum})",
                        abs.display()
                    ));
                }
            }
            sha256.insert(key.to_string(), sum);
        }
    }
    if let Some(d) = siglip_dir.as_ref().filter(|_| redux_path.is_some()) {
        let abs = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        files.insert("siglip".to_string(), abs.display().to_string());
    }
    // Every check before any model loads: seeds, output names, the folder.
    let count = req.prompts.len() * req.num_images;
    if !matches!(req.seeds.len(), 0 | 1) && req.seeds.len() != count {
        return Err(Error::InvalidRequest(format!(
            "{} seeds for {count} images: give one per image, or one base seed",
            req.seeds.len()
        )));
    }
    let mut names = OutputNames::new(&args.output, count, args.overwrite)?;
    let located = ModelSource::parse(&model, offline).and_then(|s| s.resolve_with(&components));
    let located = located.map_err(|e| match e {
        Error::ModelSource { what, .. } if from_record => Error::ModelSource {
            what: format!("the image was made with `{model}`: {what}"),
            hint: format!("a re-run reads only local models; pass --model {model} (and the component flags) to fetch it"),
        },
        e => e,
    })?;
    let mut pipe = FluxPipeline::new(located, opts)?;
    // FLUX.1-Fill regenerates from pure noise by default (strength 1, as diffusers and BFL)
    if pipe.config().in_channels == 384 && args.strength.is_none() {
        if let Some(init) = req.image.as_mut().filter(|_| from.is_none()) {
            init.strength = 1.0;
        }
    }
    if let Some(was) = from.as_ref().and_then(|p| p.model_fingerprint.as_deref()) {
        if was != pipe.fingerprint() {
            warnings.push(format!(
                "the model's files differ from the ones that made the image (fingerprint {was}, now {}): the pixels may differ",
                pipe.fingerprint()
            ));
        }
    }
    for w in &warnings {
        note(format_args!("warning: {w}"));
    }
    let steps = req.steps.unwrap_or(pipe.default_steps());
    let started = Instant::now();
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut step_start = Instant::now();
    let mut times = StageTimes::default();
    let (prompts, prompts_2) = (req.prompts.clone(), req.prompts_2.clone());
    let batches = prompts.len().div_ceil(PROMPT_BATCH);
    let done = std::cell::Cell::new(0usize); // images written so far
    for (b, chunk) in prompts.chunks(PROMPT_BATCH).enumerate() {
        let first = b * PROMPT_BATCH;
        let n = chunk.len() * req.num_images;
        let mut r = req.clone();
        r.prompts = chunk.to_vec();
        r.prompts_2 = prompts_2
            .as_ref()
            .map(|v| v.get(first..first + chunk.len()).map(<[String]>::to_vec))
            .map(|v| v.ok_or_else(|| Error::InvalidRequest("fewer T5 prompts than prompts".into())))
            .transpose()?;
        r.seeds = match req.seeds.as_slice() {
            [] => vec![],
            [base] => vec![base.wrapping_add(done.get() as u64)],
            all => all
                .get(done.get()..done.get() + n)
                .ok_or_else(|| Error::InvalidRequest("fewer seeds than images".into()))?
                .to_vec(),
        };
        let out = pipe.generate_each(
            &r,
            |p, _| {
                if p.step == 0 {
                    bar.reset();
                    bar.set_prefix(format!("image {}/{count}", done.get() + p.image + 1));
                    step_start = Instant::now();
                }
                bar.set_position(p.step as u64 + 1);
                let per = step_start.elapsed().as_secs_f64() / (p.step + 1) as f64;
                bar.set_message(format!("{per:.2} s/step"));
            },
            |g| {
                let mut params = g.params.clone();
                params.files = files.clone();
                params.sha256 = sha256.clone();
                params.outpaint = border.filter(|_| init.is_some());
                params.edit_size = edit_size;
                let path = names.write(params.seed, done.get(), &g.rgb, &params)?;
                done.set(done.get() + 1);
                bar.suspend(|| say(format_args!("{} (seed {})", path.display(), g.params.seed)));
                Ok(())
            },
        )?;
        let prefix = match batches {
            1 => String::new(),
            _ => format!("prompts {}–{}: ", first + 1, first + chunk.len()),
        };
        for w in &out.warnings {
            bar.suspend(|| note(format_args!("warning: {prefix}{w}")));
        }
        times.encode += out.times.encode;
        times.denoise += out.times.denoise;
        times.decode += out.times.decode;
    }
    bar.finish_and_clear();
    let rss = peak_rss()
        .map(|b| format!(", peak memory {:.0} MiB", b as f64 / 1048576.0))
        .unwrap_or_default();
    note(format_args!(
        "encode {:.1} s, denoise {:.1} s, decode {:.1} s, total {:.1} s{rss}",
        times.encode.as_secs_f64(),
        times.denoise.as_secs_f64(),
        times.decode.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn convert(args: Convert) -> Result<(), Error> {
    if args.output.exists() && !args.overwrite {
        return Err(Error::Write {
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
            let text = flux_kernels::read_text(p, flux_kernels::MAX_CONFIG_BYTES).map_err(|e| {
                Error::Io {
                    path: p.clone(),
                    reason: e.to_string(),
                }
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
    say(format_args!(
        "{} ({} FLUX transformer, {}; {:.2} GB of tensors) in {:.1} s",
        args.output.display(),
        report.config.variant(),
        types.join(", "),
        report.bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C: no temporary PNG is left behind (images already written stay); `flux serve`
    // shuts down gracefully instead
    if !matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
        let _ = ctrlc::set_handler(|| {
            remove_partial_files();
            std::process::exit(130);
        });
    }
    let result = match cli.command {
        Command::Generate(g) => run(*g, Mode::Generate),
        Command::Edit(g) => run(*g, Mode::Edit),
        Command::Fill(g) => run(*g, Mode::Fill),
        Command::Control(g) => run(*g, Mode::Control),
        Command::Redux(g) => run(*g, Mode::Redux),
        Command::Convert(c) => convert(c),
        Command::Serve(s) => serve(s),
        Command::Worker(w) => worker(w),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note(format_args!("error: {e}"));
            if let Some(h) = e.hint() {
                note(format_args!("hint: {h}"));
            }
            ExitCode::FAILURE
        }
    }
}
