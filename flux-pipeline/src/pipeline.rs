//! `FluxPipeline`: prompt → encode → noise → sample → decode, composing the crates. No math here.

use std::time::{Duration, Instant};

use candle::{DType, Device, Tensor};
use flux_dit::{img_ids, txt_ids, unpack, DitInput, Flux, FluxOptions, LoraOptions, LoraSet};
use flux_sampler::{
    diffusers_sigmas, latent_shape, sample_with, schedule, true_cfg, NoiseDtype, NoiseOptions,
    Reference, SampleOptions, SizeRounding, StepInfo, TimestepRounding, TorchCpuKernel,
};
use flux_text::{
    ClipTextModel, ClipTokenizer, PromptEmbeds, PromptEncoder, T5Encoder, T5Tokenizer,
};
use flux_vae::{to_rgb8, AutoEncoder, ByteRounding, Rgb8, TileOptions};

use crate::png::{ImageParams, LoraParam};
use crate::source::{read_transformer_config, ModelFiles, ModelSource, TransformerFiles, VaeFiles};
use crate::task::{InitImage, ModelKind, Start, Starts};
use crate::{Error, Result};

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Weights and activations (f32 on CPU; bf16 on GPU).
    pub dtype: DType,
    /// Where to run.
    pub device: Device,
    /// Whose arithmetic to reproduce where the references differ (schedule, timestep rounding,
    /// bf16 Euler): diffusers by default, the reference of the golden tests.
    pub reference: Reference,
    /// Keep encoders, transformer and VAE loaded between calls (more memory, faster reruns).
    /// By default each is dropped after use, so T5 and the transformer are never held together.
    pub keep_loaded: bool,
    /// With `keep_loaded`, still release the text encoders after each call's prompts are
    /// encoded (they load again for the next), so that T5 and the transformer are never
    /// resident together when they do not both fit (see [`ModelFiles::memory_estimate`]).
    ///
    /// [`ModelFiles::memory_estimate`]: crate::ModelFiles::memory_estimate
    pub release_text: bool,
    /// Decode in tiles (bounded memory for large images).
    pub tiled_vae: Option<TileOptions>,
    /// Encode the transformer's block weights and T5's linear weights while loading
    /// (`--quantize`), e.g. `Encoding::Gguf(QuantType::Q8_0)`; weights already quantized in the
    /// file stay as they are.
    pub quantize: Option<flux_kernels::Encoding>,
    /// Multiply the transformer's block layers in fp8 (`--fp8-gemm`; see
    /// [`flux_dit::FluxOptions::fp8_gemm`]): e4m3 weights, activations quantized per tensor; on
    /// CUDA cuBLASLt's fp8 GEMMs, elsewhere an emulation (for checking quality, not speed).
    /// `quantize` may then only be fp8 e4m3 or `None`.
    pub fp8_gemm: bool,
    /// Transformer rows per pass: images denoised together, with true CFG counting each
    /// image's negative row too (so 2 runs the positive and negative passes as one batch).
    /// Results equal one-at-a-time runs up to float rounding; memory for activations grows
    /// with it. 0: as many as the request has that fit in 80 % of the memory available now
    /// (on the CPU; elsewhere 1, as free device memory is not queried), estimated per row from
    /// the token count and the model's widths. Default 1 (one image, one pass at a time, as
    /// diffusers' true CFG).
    pub batch: usize,
    /// LoRAs applied to the transformer when it loads (see [`FluxPipeline::set_loras`]).
    pub loras: LoraSet,
    /// How they are applied (merged or at run time; strict or lenient). Whether merges keep
    /// the weights as loaded is the pipeline's choice: only with `keep_loaded` (a transformer
    /// dropped after each call is reloaded with the LoRAs instead).
    pub lora: LoraOptions,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            reference: Reference::Diffusers,
            keep_loaded: false,
            release_text: false,
            tiled_vae: None,
            quantize: None,
            fp8_gemm: false,
            batch: 1,
            loras: LoraSet::new(),
            lora: LoraOptions::default(),
        }
    }
}

/// One generation request. Unset fields take the model's defaults.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompts; each gives `num_images` images.
    pub prompts: Vec<String>,
    /// T5-only prompts (diffusers' `prompt_2`), one per prompt.
    pub prompts_2: Option<Vec<String>>,
    /// Image width in pixels (multiple of 16). Default 1024.
    pub width: usize,
    /// Image height in pixels (multiple of 16). Default 1024.
    pub height: usize,
    /// Steps: default 4 (schnell) or 28 (dev; BFL's CLI uses 50).
    pub steps: Option<usize>,
    /// Guidance for the dev family (default 3.5); ignored by schnell, with a warning.
    pub guidance: Option<f32>,
    /// Seeds, one per image, or one base seed (image `i` uses `seed + i`); empty: random seeds,
    /// reported in the output.
    pub seeds: Vec<u64>,
    /// Images per prompt.
    pub num_images: usize,
    /// Starting latents instead of seeded noise, packed `(images, L_img, 64)`.
    pub latents: Option<Tensor>,
    /// T5 length: default 256 (schnell) or 512 (dev).
    pub max_sequence_length: Option<usize>,
    /// img2img: start from this picture instead of pure noise.
    pub image: Option<InitImage>,
    /// FLUX.1-Kontext editing: the picture to edit (8-bit RGB, sides multiples of 16, any
    /// size; not resized). Its latent joins the transformer's image tokens with position ids
    /// `(1, r, c)` and is cut from the output. Needs a Kontext transformer (its shapes are
    /// dev's, so this cannot be checked).
    pub edit_image: Option<Rgb8>,
    /// FLUX.1-Canny/Depth: the control picture (Canny edges, e.g. from
    /// [`crate::canny_control`], or a depth map), 8-bit RGB of the output size. Its latent is
    /// joined to every step's input channels. Needs a 128-channel transformer.
    pub control_image: Option<Rgb8>,
    /// FLUX.1-Redux: image tokens `(1, L, T5 width)` ([`crate::Redux::encode`]) joined after
    /// every prompt's T5 tokens (diffusers' `FluxPriorReduxPipeline` then `FluxPipeline`).
    pub redux: Option<Tensor>,
    /// True classifier-free guidance (diffusers' `negative_prompt`): what to steer away from,
    /// for every prompt. Used only with `true_cfg` > 1.
    pub negative_prompt: Option<String>,
    /// diffusers' `true_cfg_scale`: > 1 with a negative prompt runs the transformer twice per
    /// step and uses `neg + scale·(pos − neg)`. Default 1 (off).
    pub true_cfg: f32,
    /// Stops the generation when cancelled (before the next step or image):
    /// [`FluxPipeline::generate`] then returns [`Error::Cancelled`], images already handed to
    /// `on_image` stay handed.
    pub cancel: Option<Cancel>,
}

/// A flag that stops a running generation ([`GenerateRequest::cancel`]); clones share it, so
/// another thread can cancel.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    /// A flag not yet raised.
    pub fn new() -> Self {
        Self::default()
    }
    /// Raises the flag: the generation stops before its next step.
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// `Err(Error::Cancelled)` once raised.
    fn check(flag: Option<&Cancel>) -> Result<()> {
        match flag {
            Some(c) if c.is_cancelled() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompts: vec![],
            prompts_2: None,
            width: 1024,
            height: 1024,
            steps: None,
            guidance: None,
            seeds: vec![],
            num_images: 1,
            latents: None,
            max_sequence_length: None,
            image: None,
            negative_prompt: None,
            true_cfg: 1.0,
            edit_image: None,
            control_image: None,
            redux: None,
            cancel: None,
        }
    }
}

/// Progress of one sampling step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Image index (0-based).
    pub image: usize,
    /// Images in the request.
    pub images: usize,
    /// Step index (0-based).
    pub step: usize,
    /// Steps per image.
    pub steps: usize,
    /// Schedule value of the step.
    pub t: f32,
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Decoded image `(1, 3, H, W)` in f32, before clamping (≈ [−1, 1]).
    pub image: Tensor,
    /// Final packed latents `(1, L_img, 64)`.
    pub latents: Tensor,
    /// 8-bit RGB (diffusers' rounding).
    pub rgb: Rgb8,
    /// The parameters, for PNG metadata and reruns.
    pub params: ImageParams,
}

/// Wall time per stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    /// Loading the text encoders and encoding.
    pub encode: Duration,
    /// Loading the transformer and sampling.
    pub denoise: Duration,
    /// Loading the VAE and decoding.
    pub decode: Duration,
}

/// The result of [`FluxPipeline::generate`].
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// The images, prompt-major.
    pub images: Vec<Generated>,
    /// Things the user should know (ignored guidance, truncated prompts).
    pub warnings: Vec<String>,
    /// Time per stage.
    pub times: StageTimes,
}

/// Activation bytes one transformer row needs at its peak, estimated: the single blocks' fused
/// `[q, k, v, mlp]` projection of every token and its neighbours in flight, about four such
/// tensors (measured at 512² on the full-width model: 0.37 GB per extra row, this gives 0.44).
pub(crate) fn row_bytes(cfg: &flux_dit::Config, tokens: usize, dtype: DType) -> u64 {
    let width = 3 * cfg.hidden_size + cfg.mlp_hidden();
    (tokens as u64) * (width as u64) * 4 * dtype.size_in_bytes() as u64
}

/// Rows per pass for `batch: 0`: as many of `wanted` as fit in 80 % of `available` bytes at
/// `per_row` each (at least 1, at most 64); 1 when the memory is unknown.
pub(crate) fn auto_rows(available: Option<u64>, per_row: u64, wanted: usize) -> usize {
    let Some(avail) = available else {
        return 1;
    };
    let fit = (avail as f64 * 0.8 / per_row.max(1) as f64) as usize;
    fit.clamp(1, 64).min(wanted.max(1))
}

/// Memory available for new allocations: `MemAvailable` of `/proc/meminfo` on the CPU (Linux);
/// `None` elsewhere and on other devices.
pub fn available_memory(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Each LoRA's file and strength, for the text encoder.
fn clip_files(set: &LoraSet) -> Vec<(&flux_kernels::lora::AdapterFile, f32)> {
    set.entries().iter().map(|(l, m)| (l.file(), *m)).collect()
}

/// Which of a pipeline's parts are loaded ([`FluxPipeline::resident`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// The text encoders (CLIP and T5).
    pub text: bool,
    /// The transformer.
    pub transformer: bool,
    /// The autoencoder.
    pub vae: bool,
}

/// The FLUX.1 text-to-image pipeline.
pub struct FluxPipeline {
    files: ModelFiles,
    fingerprint: String,
    /// The transformer's config as loaded, and as the LoRAs make it (`cfg`).
    base_cfg: flux_dit::Config,
    cfg: flux_dit::Config,
    /// The LoRAs' records for the images' metadata.
    lora_params: Vec<LoraParam>,
    /// What lenient LoRA loading skipped, for the next generation's warnings.
    lora_warnings: Vec<String>,
    /// CLIP modules among the LoRAs (applied to the text encoder when it loads).
    clip_loras: usize,
    opts: PipelineOptions,
    text: Option<PromptEncoder>,
    dit: Option<Flux>,
    vae: Option<AutoEncoder>,
}

impl std::fmt::Debug for FluxPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluxPipeline")
            .field("model", &self.files.name)
            .finish_non_exhaustive()
    }
}

/// A checked request with the model's defaults filled in.
struct Plan {
    /// True CFG's scale, when on.
    cfg: Option<f32>,
    steps: usize,
    guidance: Option<f32>,
    max_len: usize,
    seeds: Vec<u64>,
    warnings: Vec<String>,
}

const MAX_SIDE: usize = 8192;
const MAX_STEPS: usize = 1000;
/// The most rows (steps × passes × batch) whose modulations a run prepares up front: each row
/// holds every layer's modulation, 1.06 M values at full size (4.2 MB in f32), so 64 rows cost
/// ≈ 270 MB. Longer or wider runs compute them per step, as before.
const MAX_PREPARED_ROWS: usize = 64;

impl FluxPipeline {
    /// Prepares a pipeline for located files; weights are loaded when first needed.
    pub fn new(files: ModelFiles, opts: PipelineOptions) -> Result<Self> {
        if !matches!(opts.dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidRequest(format!(
                "dtype {:?} is not supported (f32 or bf16)",
                opts.dtype
            )));
        }
        let cfg = match &files.transformer {
            TransformerFiles::Diffusers(dir) => read_transformer_config(dir)?,
            TransformerFiles::File(file) => {
                flux_dit::Weights::open_file(file, DType::F32, &Device::Cpu)?.detect_config()?
            }
            TransformerFiles::Bfl { config, .. } => config.clone(),
        };
        cfg.validate()?;
        let base_cfg = cfg;
        // every other config too, now rather than when its stage comes
        match &files.vae {
            VaeFiles::Diffusers(dir) => {
                let text = crate::source::read_config(&dir.join("config.json"))?;
                flux_vae::Config::from_diffusers_json(&text)?.validate()?;
            }
            VaeFiles::Bfl { config, .. } => config.validate()?,
        }
        if files.text_encoder_2.is_dir() {
            let text = crate::source::read_config(&files.text_encoder_2.join("config.json"))?;
            flux_text::T5Config::from_json(&text)?.validate()?;
        }
        let clip_dir = match &files.text_encoder_config {
            Some(d) => Some(d),
            None => Some(&files.text_encoder).filter(|d| d.is_dir()),
        };
        if let Some(d) = clip_dir {
            flux_text::ClipConfig::from_dir(d)?.validate()?;
        }
        let fingerprint = fingerprint(&files);
        let (loras, lora) = (opts.loras.clone(), opts.lora);
        let mut pipe = FluxPipeline {
            files,
            fingerprint,
            cfg: base_cfg.clone(),
            base_cfg,
            lora_params: vec![],
            lora_warnings: vec![],
            clip_loras: 0,
            opts,
            text: None,
            dit: None,
            vae: None,
        };
        pipe.set_loras(loras, lora)?;
        Ok(pipe)
    }

    /// Replaces the LoRAs (an empty set removes them). They are checked against the
    /// transformer's config first (every module placed, every shape fitting); when the
    /// transformer is loaded they are applied at once, switching without reloading it, else
    /// when it loads. Each file's SHA-256 is recorded for the images' metadata.
    pub fn set_loras(&mut self, set: LoraSet, opts: LoraOptions) -> Result<()> {
        let (cfg, reports) = set.check(&self.base_cfg, opts)?;
        let files = clip_files(&set);
        let clip_reports = ClipTextModel::check_loras(&self.clip_config()?, &files, &opts)?;
        let clip_loras: usize = clip_reports.iter().map(|r| r.0).sum();
        if ModelKind::of(cfg.in_channels).is_none() {
            return Err(Error::InvalidRequest(format!(
                "this transformer takes {} input channels; the pipeline runs base models (64), FLUX.1-Canny/Depth (128) and FLUX.1-Fill (384)",
                cfg.in_channels
            )));
        }
        let mut params = vec![];
        for (lora, strength) in set.entries() {
            let path = std::fs::canonicalize(lora.path()).unwrap_or_else(|_| lora.path().into());
            params.push(LoraParam {
                file: path.display().to_string(),
                sha256: crate::png::file_sha256(lora.path())?,
                strength: *strength,
            });
        }
        self.opts.lora = opts;
        let o = self.lora_options();
        if let Some(dit) = self.dit.as_mut() {
            dit.apply_loras(&set, o)?;
        }
        if let Some(clip) = self.text.as_mut().and_then(|t| t.clip_mut()) {
            clip.apply_loras(&files, &o)?;
        }
        self.lora_warnings = reports
            .iter()
            .filter(|r| r.skipped.1 > 0)
            .map(|r| {
                format!(
                    "LoRA {} ({}): {} module(s) match no layer and were skipped: {}",
                    r.path.display(),
                    r.format,
                    r.skipped.1,
                    r.skipped.0.join(", ")
                )
            })
            .chain(
                clip_reports
                    .iter()
                    .zip(set.entries())
                    .filter(|(r, _)| !r.1.is_empty())
                    .map(|(r, (lora, _))| {
                        format!(
                            "LoRA {}: {} CLIP module(s) match no layer and were skipped: {}",
                            lora.path().display(),
                            r.1.len(),
                            flux_kernels::preview(&r.1)
                        )
                    }),
            )
            .collect();
        self.clip_loras = clip_loras;
        self.cfg = cfg;
        self.lora_params = params;
        self.opts.loras = set;
        self.opts.lora = opts;
        Ok(())
    }

    /// The CLIP config the text encoder will have (for checking LoRAs before it loads).
    fn clip_config(&self) -> Result<flux_text::ClipConfig> {
        let f = &self.files;
        Ok(match &f.text_encoder_config {
            Some(dir) => flux_text::ClipConfig::from_dir(dir)?,
            None if f.text_encoder.is_dir() => flux_text::ClipConfig::from_dir(&f.text_encoder)?,
            // a single file is CLIP-L (its width is checked when it loads)
            None => flux_text::ClipConfig::vit_l_14(),
        })
    }

    /// The LoRA options as applied: merges are reversible only when the transformer is kept.
    fn lora_options(&self) -> LoraOptions {
        LoraOptions {
            reversible: self.opts.keep_loaded,
            ..self.opts.lora
        }
    }

    /// The LoRAs applied (file, SHA-256, strength).
    pub fn loras(&self) -> &[LoraParam] {
        &self.lora_params
    }

    /// Resolves `source` (downloading if needed) and prepares the pipeline.
    pub fn from_source(source: &ModelSource, opts: PipelineOptions) -> Result<Self> {
        Self::new(source.resolve()?, opts)
    }

    /// What the transformer does, from its input channels (checked in [`FluxPipeline::new`]).
    fn kind(&self) -> ModelKind {
        ModelKind::of(self.cfg.in_channels).unwrap_or(ModelKind::Base)
    }

    /// Whether the model is guidance-distilled (the dev family).
    pub fn is_dev(&self) -> bool {
        self.cfg.guidance_embed
    }

    /// The model's files.
    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// A fingerprint of the model's files (names, sizes and config texts of every component),
    /// recorded in each image: a re-run can tell that the files under a path have changed
    /// without hashing gigabytes of weights.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The transformer config.
    pub fn config(&self) -> &flux_dit::Config {
        &self.cfg
    }

    /// Which parts are resident now (between calls: what `keep_loaded` and `release_text`
    /// kept).
    pub fn resident(&self) -> Resident {
        Resident {
            text: self.text.is_some(),
            transformer: self.dit.is_some(),
            vae: self.vae.is_some(),
        }
    }

    /// Default steps: 28 for dev (diffusers; BFL's CLI uses 50), 4 for schnell.
    pub fn default_steps(&self) -> usize {
        if self.is_dev() {
            28
        } else {
            4
        }
    }

    /// Default T5 length: 512 for dev, 256 for schnell.
    pub fn default_max_sequence_length(&self) -> usize {
        match (self.kind(), self.opts.reference) {
            // BFL's fill tool loads T5 with 128 tokens
            (ModelKind::Fill, Reference::Bfl) => 128,
            _ if self.is_dev() => 512,
            _ => 256,
        }
    }

    fn text(&mut self, max_len: usize) -> Result<&PromptEncoder> {
        let reload = self.text.as_ref().is_none_or(|t| !t.is_loaded());
        if reload {
            let (d, dt) = (&self.opts.device, self.opts.dtype);
            let f = &self.files;
            self.text = Some(PromptEncoder::new(
                ClipTokenizer::from_dir(&f.tokenizer)?,
                T5Tokenizer::from_dir(&f.tokenizer_2, max_len)?,
                {
                    let mut clip = if f.text_encoder.is_file() {
                        let cfg = match &f.text_encoder_config {
                            Some(dir) => Some(flux_text::ClipConfig::from_dir(dir)?),
                            None => None,
                        };
                        ClipTextModel::from_file(&f.text_encoder, cfg.as_ref(), dt, d)?
                    } else {
                        ClipTextModel::from_dir(&f.text_encoder, dt, d)?
                    };
                    if self.clip_loras > 0 {
                        let files = clip_files(&self.opts.loras);
                        clip.apply_loras(&files, &self.lora_options())?;
                    }
                    clip
                },
                T5Encoder::from_path(&f.text_encoder_2, dt, d, self.opts.quantize)?,
                d,
            ));
        }
        self.text
            .as_ref()
            .ok_or(Error::InvalidRequest("text encoders unavailable".into()))
    }

    fn dit(&mut self) -> Result<&Flux> {
        if self.dit.is_none() {
            let rope = match self.opts.reference {
                Reference::Bfl => flux_dit::AngleMode::F32,
                Reference::Diffusers => flux_dit::AngleMode::F64,
            };
            let o = FluxOptions {
                rope,
                quantize: self.opts.quantize,
                fp8_gemm: self.opts.fp8_gemm,
                ..Default::default()
            };
            let (d, dt) = (&self.opts.device, self.opts.dtype);
            let mut dit = match &self.files.transformer {
                TransformerFiles::Diffusers(dir) => Flux::from_diffusers_folder(dir, dt, d, o)?,
                TransformerFiles::File(file) => Flux::from_file(file, dt, d, o)?,
                TransformerFiles::Bfl { file, config } => {
                    Flux::from_bfl_file(file, config, dt, d, o)?
                }
            };
            if !self.opts.loras.is_empty() {
                dit.apply_loras(&self.opts.loras, self.lora_options())?;
            }
            self.dit = Some(dit);
        }
        self.dit
            .as_ref()
            .ok_or(Error::InvalidRequest("transformer unavailable".into()))
    }

    fn vae(&mut self) -> Result<&AutoEncoder> {
        if self.vae.is_none() {
            let (d, dt) = (&self.opts.device, self.opts.dtype);
            self.vae = Some(match &self.files.vae {
                VaeFiles::Diffusers(dir) => AutoEncoder::from_diffusers_folder(dir, dt, d)?,
                VaeFiles::Bfl { file, config } => AutoEncoder::from_bfl_file(file, config, dt, d)?,
            });
        }
        self.vae
            .as_ref()
            .ok_or(Error::InvalidRequest("autoencoder unavailable".into()))
    }

    /// Checks a request and fills the model's defaults.
    fn plan(&self, req: &GenerateRequest) -> Result<Plan> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if req.prompts.is_empty() {
            return bad("no prompt given".into());
        }
        let mut all = req.prompts.iter().chain(req.prompts_2.iter().flatten());
        if let Some(i) = all.position(|p| p.contains('\0')) {
            return bad(format!(
                "prompt {} contains a NUL character (the tokenizers would keep it as text)",
                i % req.prompts.len() + 1
            ));
        }
        if let Some(p2) = &req.prompts_2 {
            if p2.len() != req.prompts.len() {
                return bad(format!(
                    "{} prompts but {} T5 prompts",
                    req.prompts.len(),
                    p2.len()
                ));
            }
        }
        if req.num_images == 0 || req.num_images > 1000 {
            return bad(format!(
                "num_images must be in 1..=1000, got {}",
                req.num_images
            ));
        }
        for (what, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % 16 != 0 {
                return bad(format!("{what} {v} is not a positive multiple of 16"));
            }
            if v > MAX_SIDE {
                return bad(format!("{what} {v} is larger than {MAX_SIDE}"));
            }
        }
        let steps = req.steps.unwrap_or(self.default_steps());
        if steps == 0 || steps > MAX_STEPS {
            return bad(format!("steps must be in 1..={MAX_STEPS}, got {steps}"));
        }
        let mut warnings = self.lora_warnings.clone();
        let kind = self.kind();
        let fill = kind == ModelKind::Fill;
        if fill && req.image.as_ref().is_none_or(|i| i.mask.is_none()) {
            return bad("FLUX.1-Fill needs a picture and a mask (--image, --mask)".into());
        }
        match (kind, &req.control_image) {
            (ModelKind::Control, None) => {
                return bad("FLUX.1-Canny/Depth needs a control picture (flux control --canny PICTURE or --depth MAP)".into())
            }
            (ModelKind::Control, Some(c)) => {
                if c.width == 0 || c.height == 0 || c.data.len() != c.width * c.height * 3 {
                    return bad("the control picture has the wrong number of bytes for its size".into());
                }
                if req.image.is_some() || req.edit_image.is_some() {
                    return bad("FLUX.1-Canny/Depth runs from noise with its control picture; an init image or a picture to edit is not supported with it".into());
                }
            }
            (_, Some(_)) => {
                return bad(format!(
                    "a control picture needs a FLUX.1-Canny/Depth transformer (128 input channels); this one has {}",
                    self.cfg.in_channels
                ))
            }
            (_, None) => {}
        }
        let guidance = if self.is_dev() {
            // diffusers' FluxFillPipeline and BFL's Fill default to 30
            let g = req.guidance.unwrap_or(if fill { 30.0 } else { 3.5 });
            if !g.is_finite() || g < 0.0 {
                return bad(format!("guidance must be a non-negative number, got {g}"));
            }
            Some(g)
        } else {
            if let Some(g) = req.guidance {
                warnings.push(format!(
                    "guidance {g} ignored: this model has no guidance input (schnell)"
                ));
            }
            None
        };
        let max_len = req
            .max_sequence_length
            .unwrap_or(self.default_max_sequence_length());
        if max_len == 0 || max_len > 512 {
            return bad(format!(
                "max_sequence_length must be in 1..=512, got {max_len}"
            ));
        }
        let n = req.prompts.len() * req.num_images;
        let seeds = match req.seeds.len() {
            0 => (0..n).map(|_| random_seed()).collect(),
            1 => (0..n as u64)
                .map(|i| req.seeds[0].wrapping_add(i))
                .collect(),
            k if k == n => req.seeds.clone(),
            k => {
                return bad(format!(
                    "{k} seeds for {n} images: give one per image, or one base seed"
                ))
            }
        };
        if let Some(init) = &req.image {
            if req.latents.is_some() {
                return bad("give either an init image or start latents, not both".into());
            }
            crate::task::check(init, steps, self.opts.reference)?;
        }
        if let Some(e) = &req.edit_image {
            if kind != ModelKind::Base {
                return bad(format!(
                    "editing needs a FLUX.1-Kontext transformer (64 input channels); this one has {}",
                    self.cfg.in_channels
                ));
            }
            if req.image.is_some() {
                return bad(
                    "give either an image to edit (Kontext) or an init image (img2img), not both"
                        .into(),
                );
            }
            let (w, h) = (e.width, e.height);
            if w == 0 || h == 0 || w % 16 != 0 || h % 16 != 0 || w > MAX_SIDE || h > MAX_SIDE {
                return bad(format!(
                    "the image to edit is {w}×{h}: its sides must be positive multiples of 16 up to {MAX_SIDE} (resize it)"
                ));
            }
            if e.data.len() != w * h * 3 {
                return bad("the image to edit has the wrong number of bytes for its size".into());
            }
        }
        if let Some(l) = &req.latents {
            let want = [n, (req.height / 16) * (req.width / 16), 64];
            if l.dims() != want {
                return bad(format!(
                    "latents have shape {:?}, expected {:?} (packed)",
                    l.dims(),
                    want
                ));
            }
        }
        if !req.true_cfg.is_finite() || req.true_cfg < 0.0 {
            return bad(format!(
                "true_cfg must be a non-negative number, got {}",
                req.true_cfg
            ));
        }
        let cfg = match (&req.negative_prompt, req.true_cfg > 1.0) {
            (Some(_), true) => Some(req.true_cfg),
            (Some(_), false) => {
                warnings.push(format!(
                    "negative prompt ignored: true CFG is off (scale {}; use a scale above 1)",
                    req.true_cfg
                ));
                None
            }
            (None, true) => {
                warnings.push(format!(
                    "true CFG scale {} ignored: it needs a negative prompt",
                    req.true_cfg
                ));
                None
            }
            (None, false) => None,
        };
        if let Some(neg) = req.negative_prompt.as_ref().filter(|_| cfg.is_some()) {
            if neg.contains('\0') {
                return bad("the negative prompt contains a NUL character".into());
            }
        }
        Ok(Plan {
            cfg,
            steps,
            guidance,
            max_len,
            seeds,
            warnings,
        })
    }

    /// Generates images. `on_step` is called after every sampling step with the progress and
    /// the packed latent `(1, L_img, 64)` after that step.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_step: impl FnMut(&Progress, &Tensor),
    ) -> Result<GenerateOutput> {
        self.generate_each(req, on_step, |_| Ok(()))
    }

    /// [`FluxPipeline::generate`], handing each image to `on_image` as soon as it is decoded
    /// (before the next image is denoised), so that a caller can save it at once: an error or
    /// interrupt at image k loses none of images 0…k−1. An error from `on_image` stops the run.
    pub fn generate_each(
        &mut self,
        req: &GenerateRequest,
        mut on_step: impl FnMut(&Progress, &Tensor),
        mut on_image: impl FnMut(&Generated) -> Result<()>,
    ) -> Result<GenerateOutput> {
        let Plan {
            cfg,
            steps,
            guidance,
            max_len,
            seeds,
            mut warnings,
        } = self.plan(req)?;
        let fitted = crate::task::fit_pictures(req, &mut warnings)?;
        let req = fitted.as_ref().unwrap_or(req);
        let (dev, dtype) = (self.opts.device.clone(), self.opts.dtype);
        let n = seeds.len();
        // 1. text: encode every prompt (and the negative one), then release the encoders
        let start = Instant::now();
        Cancel::check(req.cancel.as_ref())?;
        let (mut emb, negative_emb) = self.encode_prompts(req, cfg, max_len, &mut warnings)?;
        if let Some(r) = &req.redux {
            let (rows, width) = (emb.t5.dim(0)?, emb.t5.dim(2)?);
            if r.rank() != 3 || r.dim(0)? != 1 || r.dim(2)? != width {
                return Err(Error::InvalidRequest(format!(
                    "Redux tokens have shape {:?}; the text encoder's are (1, L, {width})",
                    r.dims()
                )));
            }
            let r = r
                .to_device(&emb.t5.device().clone())?
                .to_dtype(emb.t5.dtype())?;
            emb.t5 = Tensor::cat(&[&emb.t5, &r.repeat((rows, 1, 1))?], 1)?;
        }
        if !self.opts.keep_loaded || self.opts.release_text {
            self.text = None;
        }
        let encode = start.elapsed();
        // 2. denoise and decode each image in turn (transformer and VAE loaded together; T5
        //    already released), then release them
        let start = Instant::now();
        let shape = latent_shape(1, req.height, req.width, SizeRounding::Strict)?;
        let (lh, lw) = (shape[2], shape[3]);
        let seq = (lh / 2) * (lw / 2);
        let (ts, sopts, noise_opts) = self.sampling(steps, seq, guidance)?;
        let ids_img = img_ids(1, lh, lw, 0.0, &dev)?;
        let ids_txt = txt_ids(1, emb.t5.dim(1)?, &dev)?;
        let tiled = self.opts.tiled_vae;
        let model_name = self.files.name.clone();
        let mut images = Vec::with_capacity(n);
        self.dit()?;
        let mut denoise = start.elapsed();
        let start = Instant::now();
        self.vae()?;
        let mut decode = start.elapsed();
        let run = {
            let (Some(dit), Some(vae)) = (self.dit.as_ref(), self.vae.as_ref()) else {
                return Err(Error::InvalidRequest("models unavailable".into()));
            };
            let reference = self.opts.reference;
            let starts = Starts::prepare(
                req,
                self.kind(),
                vae,
                &shape,
                seeds[0],
                steps,
                noise_opts,
                reference,
                &dev,
            )?;
            let group = Group {
                dit,
                starts: &starts,
                ts: &ts,
                sopts: &sopts,
                emb: &emb,
                negative: negative_emb.as_ref(),
                ids_img: starts.token_ids(&ids_img)?,
                ids_txt: ids_txt.clone(),
                latents: req.latents.as_ref(),
                num_images: req.num_images,
                cancel: req.cancel.as_ref(),
                joint_cfg: false,
                dtype,
                device: dev.clone(),
            };
            // transformer rows per pass: as asked, or (0) as many as free memory allows
            let tokens = group.ids_img.dim(1)? + ids_txt.dim(1)?;
            let rows_wanted = n * if cfg.is_some() { 2 } else { 1 };
            let batch = match self.opts.batch {
                0 => auto_rows(
                    available_memory(&dev),
                    row_bytes(&self.cfg, tokens, dtype),
                    rows_wanted,
                ),
                b => b,
            };
            let group = Group {
                joint_cfg: batch >= 2,
                ..group
            };
            // images per transformer pass: with true CFG the negative rows count too
            let per_pass = match cfg {
                Some(_) if batch >= 2 => batch / 2,
                _ => batch,
            }
            .max(1);
            let all: Vec<(usize, u64)> = seeds.iter().copied().enumerate().collect();
            all.chunks(per_pass).try_for_each(|items| -> Result<()> {
                let start = Instant::now();
                Cancel::check(req.cancel.as_ref())?;
                let lat = group.run(items, steps, n, &mut on_step)?;
                denoise += start.elapsed();
                for (k, &(i, seed)) in items.iter().enumerate() {
                    let start = Instant::now();
                    let lat = lat.narrow(0, k, 1)?;
                    let image = decode_latents(vae, &lat, lh, lw, tiled)?;
                    let rgb = to_rgb8(&image, ByteRounding::Round)?
                        .into_iter()
                        .next()
                        .ok_or_else(|| {
                            Error::InvalidRequest("the autoencoder returned no image".into())
                        })?;
                    let p = i / req.num_images;
                    let g = Generated {
                        image,
                        latents: lat,
                        rgb,
                        params: ImageParams {
                            prompt: req.prompts[p].clone(),
                            prompt_2: req.prompts_2.as_ref().map(|v| v[p].clone()),
                            model: model_name.clone(),
                            seed,
                            steps,
                            guidance,
                            width: req.width,
                            height: req.height,
                            dtype: format!("{dtype:?}").to_lowercase(),
                            max_sequence_length: max_len,
                            version: env!("CARGO_PKG_VERSION").to_string(),
                            device: Some(if dev.is_cuda() { "cuda" } else { "cpu" }.into()),
                            quantize: self.opts.quantize.map(|q| q.to_string()),
                            tiled_vae: tiled.is_some(),
                            fp8_gemm: self.opts.fp8_gemm,
                            negative_prompt: req.negative_prompt.clone().filter(|_| cfg.is_some()),
                            true_cfg: cfg,
                            strength: req.image.as_ref().map(|i| i.strength),
                            files: Default::default(),
                            sha256: Default::default(),
                            outpaint: None,
                            edit_size: None,
                            reference: (self.opts.reference == Reference::Bfl)
                                .then(|| "bfl".to_string()),
                            model_fingerprint: Some(self.fingerprint.clone()),
                            loras: self.lora_params.clone(),
                        },
                    };
                    decode += start.elapsed();
                    on_image(&g)?;
                    images.push(g);
                }
                Ok(())
            })
        };
        if !self.opts.keep_loaded {
            self.dit = None;
            self.vae = None;
        }
        // a cancelled step reaches here as the sampler's error naming that step
        if run.is_err() && req.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Err(Error::Cancelled);
        }
        run?;
        Ok(GenerateOutput {
            images,
            warnings,
            times: StageTimes {
                encode,
                denoise,
                decode,
            },
        })
    }

    /// Encodes the request's prompts and, with true CFG, its negative prompt (once, after
    /// them); warns of truncation. Returns the embeddings and `(scale, T5, pooled)` of the
    /// negative.
    #[allow(clippy::type_complexity)]
    fn encode_prompts(
        &mut self,
        req: &GenerateRequest,
        cfg: Option<f32>,
        max_len: usize,
        warnings: &mut Vec<String>,
    ) -> Result<(PromptEmbeds, Option<(f32, Tensor, Tensor)>)> {
        let negative = req.negative_prompt.as_deref().filter(|_| cfg.is_some());
        let mut prompts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
        let mut prompts_2: Option<Vec<&str>> = req
            .prompts_2
            .as_ref()
            .map(|v| v.iter().map(String::as_str).collect());
        if let Some(neg) = negative {
            prompts.push(neg);
            if let Some(p2) = &mut prompts_2 {
                p2.push(neg);
            }
        }
        let emb: PromptEmbeds = self.text(max_len)?.encode(&prompts, prompts_2.as_deref())?;
        check_finite(&emb.t5, "T5 text encoder")?;
        check_finite(&emb.pooled, "CLIP text encoder")?;
        let negative_emb = match cfg {
            Some(scale) => {
                let row = req.prompts.len();
                Some((
                    scale,
                    emb.t5.narrow(0, row, 1)?,
                    emb.pooled.narrow(0, row, 1)?,
                ))
            }
            None => None,
        };
        for (i, p) in req.prompts.iter().enumerate() {
            let more = match emb.unread_bytes[i] {
                0 => String::new(),
                b => format!(" (and {b} bytes after them were not read)"),
            };
            if emb.clip_truncated[i] > 0 {
                warnings.push(format!(
                    "prompt {} is too long for CLIP: {} tokens cut (77 max){more}",
                    i + 1,
                    emb.clip_truncated[i]
                ));
            }
            if emb.t5_truncated[i] > 0 {
                warnings.push(format!(
                    "prompt {} is too long for T5: {} tokens cut ({max_len} max){more}: {p:.40}…",
                    i + 1,
                    emb.t5_truncated[i]
                ));
            }
        }
        Ok((emb, negative_emb))
    }

    /// The full schedule for `steps` at `seq` image tokens, the sampler's options and the
    /// noise's, per the reference and dtype.
    fn sampling(
        &self,
        steps: usize,
        seq: usize,
        guidance: Option<f32>,
    ) -> Result<(Vec<f32>, SampleOptions, NoiseOptions)> {
        let (reference, dtype) = (self.opts.reference, self.opts.dtype);
        let ts = match reference {
            Reference::Diffusers => diffusers_sigmas(steps, seq, self.files.shift)?,
            Reference::Bfl => schedule(steps, seq, self.files.shift)?,
        };
        let rounding = match (reference, dtype) {
            (Reference::Diffusers, DType::F32) => TimestepRounding::DiffusersF32,
            (Reference::Diffusers, _) => TimestepRounding::Diffusers,
            (Reference::Bfl, DType::F32) => TimestepRounding::None,
            (Reference::Bfl, _) => TimestepRounding::Bfl,
        };
        let sopts = SampleOptions {
            rounding,
            guidance,
            reference,
        };
        let noise = NoiseOptions {
            // BFL's get_noise always draws bf16; diffusers draws in the pipeline's dtype
            dtype: if dtype == DType::F32 && reference == Reference::Diffusers {
                NoiseDtype::F32
            } else {
                NoiseDtype::Bf16
            },
            kernel: TorchCpuKernel::Avx2,
        };
        Ok((ts, sopts, noise))
    }
}

/// What denoising a group of images together needs: the transformer, the request's starts and
/// embeddings, the schedule; [`Group::run`] denoises some of the request's images in one batch.
struct Group<'a> {
    dit: &'a Flux,
    starts: &'a Starts,
    ts: &'a [f32],
    sopts: &'a SampleOptions,
    emb: &'a PromptEmbeds,
    /// True CFG: `(scale, T5, pooled)` of the negative prompt.
    negative: Option<&'a (f32, Tensor, Tensor)>,
    /// The image tokens' ids `(1, L, 3)` (Kontext's picture included) and the text's.
    ids_img: Tensor,
    ids_txt: Tensor,
    latents: Option<&'a Tensor>,
    num_images: usize,
    /// Checked before every step.
    cancel: Option<&'a Cancel>,
    /// True CFG's negative rows go through the transformer in the same pass as the positive.
    joint_cfg: bool,
    dtype: DType,
    device: Device,
}

impl Group<'_> {
    /// Denoises images `items` (index, seed) as one batch: each from its own start (its own
    /// seeded noise, so a batch gives what one-at-a-time runs give), its prompt's embeddings,
    /// and, with true CFG, the negative rows in the same pass when `batch` allows
    /// ([`PipelineOptions::batch`]). Returns the final packed latents `(items, L_img, 64)`.
    fn run(
        &self,
        items: &[(usize, u64)],
        steps: usize,
        images: usize,
        on_step: &mut impl FnMut(&Progress, &Tensor),
    ) -> Result<Tensor> {
        let (dev, dtype, g) = (&self.device, self.dtype, items.len());
        let begins = items
            .iter()
            .map(|&(i, seed)| match self.latents {
                Some(l) => Ok(Start::given(l.narrow(0, i, 1)?.to_device(dev)?)),
                None => self.starts.start(i, seed, self.ts),
            })
            .collect::<Result<Vec<Start>>>()?;
        let first = begins[0].first;
        let xs: Vec<&Tensor> = begins.iter().map(|b| &b.x).collect();
        let x = Tensor::cat(&xs, 0)?.to_dtype(dtype)?;
        let rows_of = |t: &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = items
                .iter()
                .map(|&(i, _)| t.narrow(0, i / self.num_images, 1))
                .collect::<candle::Result<_>>()?;
            Ok(Tensor::cat(&rows, 0)?)
        };
        let (mut txt, mut y) = (rows_of(&self.emb.t5)?, rows_of(&self.emb.pooled)?);
        // true CFG in the same pass: the negative rows after the positive ones
        // (one batch needs one text length: Redux's image tokens lengthen only the positive)
        let joint = self.joint_cfg
            && self
                .negative
                .is_some_and(|(_, nt, _)| nt.dim(1).ok() == Some(txt.dim(1).unwrap_or(0)));
        if let (true, Some((_, neg_txt, neg_y))) = (joint, self.negative) {
            txt = Tensor::cat(&[&txt, &neg_txt.repeat((g, 1, 1))?], 0)?;
            y = Tensor::cat(&[&y, &neg_y.repeat((g, 1))?], 0)?;
        }
        let rows = txt.dim(0)?;
        // Every step's timesteps and guidance, and the passes' pooled-text rows, made before
        // the loop so that the transformer computes all their modulations at once
        // (`Flux::prepare_steps`); each pass brings these very tensors.
        let neg_y_rows = match self.negative {
            Some((_, _, neg_y)) if !joint => Some(neg_y.repeat((g, 1))?),
            _ => None,
        };
        let per_step = flux_sampler::step_infos(&self.ts[first..], self.sopts)
            .iter()
            .map(|info| {
                let t = Tensor::from_vec(vec![info.model_t; rows], rows, dev)?;
                let gd = info
                    .model_guidance
                    .map(|v| Tensor::from_vec(vec![v; rows], rows, dev))
                    .transpose()?;
                Ok((t, gd))
            })
            .collect::<candle::Result<Vec<_>>>()?;
        let passes_y: Vec<&Tensor> = std::iter::once(&y).chain(neg_y_rows.as_ref()).collect();
        let entries: Vec<(&Tensor, Option<&Tensor>, &Tensor)> = per_step
            .iter()
            .flat_map(|(t, gd)| passes_y.iter().map(move |y| (t, gd.as_ref(), *y)))
            .collect();
        let prepared_rows = entries.len() * rows;
        if prepared_rows <= MAX_PREPARED_ROWS {
            self.dit.prepare_steps(&entries)?;
        }
        let ids_img = self.ids_img.repeat((rows, 1, 1))?;
        let ids_txt = self.ids_txt.repeat((rows, 1, 1))?;
        let ids_neg = match self.negative {
            Some((_, nt, _)) if !joint => Some(txt_ids(g, nt.dim(1)?, dev)?),
            _ => None,
        };
        let mut denoiser = |x: &Tensor, info: &StepInfo| -> Result<Tensor> {
            Cancel::check(self.cancel)?;
            let img = self.starts.tokens(x)?;
            let predict = |img: &Tensor, txt: &Tensor, y: &Tensor, rows: usize| -> Result<Tensor> {
                let txt_ids = match &ids_neg {
                    Some(n) if txt.dim(1)? != ids_txt.dim(1)? => n.clone(),
                    _ => ids_txt.narrow(0, 0, rows)?,
                };
                // the prepared tensors where the rows match (always, as run builds the passes)
                let (t, gd) = match per_step.get(info.index) {
                    Some((t, gd)) if t.dim(0)? == rows => (t.clone(), gd.clone()),
                    _ => (
                        Tensor::from_vec(vec![info.model_t; rows], rows, dev)?,
                        info.model_guidance
                            .map(|v| Tensor::from_vec(vec![v; rows], rows, dev))
                            .transpose()?,
                    ),
                };
                let v = self.dit.forward(&DitInput {
                    img,
                    img_ids: &ids_img.narrow(0, 0, rows)?,
                    txt,
                    txt_ids: &txt_ids,
                    timesteps: &t,
                    y,
                    guidance: gd.as_ref(),
                })?;
                // Kontext: the prediction for the generated tokens only
                Ok(v.narrow(1, 0, x.dim(1)?)?)
            };
            match self.negative {
                None => predict(&img, &txt, &y, g),
                // one pass over [positive; negative]
                Some((scale, ..)) if joint => {
                    let v = predict(&Tensor::cat(&[&img, &img], 0)?, &txt, &y, 2 * g)?;
                    Ok(true_cfg(&v.narrow(0, 0, g)?, &v.narrow(0, g, g)?, *scale)?)
                }
                // diffusers: the two passes one after the other, the distilled guidance fed
                // to both
                Some((scale, neg_txt, neg_y)) => {
                    let pos = predict(&img, &txt, &y, g)?;
                    let neg_y = match &neg_y_rows {
                        Some(r) => r.clone(),
                        None => neg_y.repeat((g, 1))?,
                    };
                    let neg = predict(&img, &neg_txt.repeat((g, 1, 1))?, &neg_y, g)?;
                    Ok(true_cfg(&pos, &neg, *scale)?)
                }
            }
        };
        // each image's own after-step blend (inpainting), row by row
        let after = |info: &StepInfo, x: Tensor| -> flux_sampler::Result<Tensor> {
            if g == 1 {
                return begins[0].after_step(info, x);
            }
            let rows = begins
                .iter()
                .enumerate()
                .map(|(k, b)| b.after_step(info, x.narrow(0, k, 1)?))
                .collect::<flux_sampler::Result<Vec<Tensor>>>()?;
            Ok(Tensor::cat(&rows, 0)?)
        };
        let lat = sample_with(
            x,
            &self.ts[first..],
            self.sopts,
            &mut denoiser,
            after,
            |info, latent| {
                for (k, &(i, _)) in items.iter().enumerate() {
                    let progress = Progress {
                        image: i,
                        images,
                        step: info.index,
                        steps: steps - first,
                        t: info.t_curr,
                    };
                    match latent.narrow(0, k, 1) {
                        Ok(row) => on_step(&progress, &row),
                        Err(_) => on_step(&progress, latent),
                    }
                }
            },
        );
        // the prepared modulations are this run's only: free them whatever happened
        self.dit.clear_prepared();
        let lat = lat?;
        check_finite(&lat, "transformer")?;
        Ok(lat)
    }
}

/// Decodes packed latents `(1, L, 64)` of an `lh × lw` latent grid to an f32 image.
fn decode_latents(
    vae: &AutoEncoder,
    lat: &Tensor,
    lh: usize,
    lw: usize,
    tiled: Option<TileOptions>,
) -> Result<Tensor> {
    let z = unpack(lat, lh, lw)?;
    Ok(match tiled {
        Some(t) => vae.decode_tiled(&z, t)?,
        None => vae.decode(&z)?,
    }
    .to_dtype(DType::F32)?)
}

/// FNV-1a (64 bit) over every component's file names, sizes and JSON texts, and the schedule's
/// shift, as hex.
fn fingerprint(files: &ModelFiles) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    let transformer = match &files.transformer {
        TransformerFiles::Diffusers(p) | TransformerFiles::File(p) => p,
        TransformerFiles::Bfl { file, .. } => file,
    };
    let vae = match &files.vae {
        VaeFiles::Diffusers(p) => p,
        VaeFiles::Bfl { file, .. } => file,
    };
    for part in [
        transformer,
        vae,
        &files.text_encoder,
        &files.text_encoder_2,
        &files.tokenizer,
        &files.tokenizer_2,
    ] {
        let mut entries: Vec<std::path::PathBuf> = match std::fs::read_dir(part) {
            Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => vec![part.clone()],
        };
        entries.sort();
        for p in entries {
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            eat(p
                .file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default());
            eat(&meta.len().to_le_bytes());
            if p.extension().is_some_and(|e| e == "json")
                && meta.len() <= flux_kernels::MAX_CONFIG_BYTES
            {
                eat(&std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    // the schedule (from scheduler_config.json, or the transformer's variant)
    eat(format!("{:?}", files.shift).as_bytes());
    format!("{h:016x}")
}

/// [`Error::NonFinite`] naming `stage` when `t` holds a NaN or an infinity.
fn check_finite(t: &Tensor, stage: &'static str) -> Result<()> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite { stage })
    }
}

/// A random seed in PyTorch's effective range (it keeps the low 32 bits).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}

/// Peak resident memory of this process in bytes (Linux: `VmHWM`), if known.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_batch_fits_the_memory() {
        let gb = 1u64 << 30;
        // 10 GB available, 1 GB a row: 8 rows fit (80 %), capped by what the request has
        assert_eq!(auto_rows(Some(10 * gb), gb, 16), 8);
        assert_eq!(auto_rows(Some(10 * gb), gb, 3), 3);
        // never below one, never above 64; unknown memory: one at a time
        assert_eq!(auto_rows(Some(gb / 2), gb, 4), 1);
        assert_eq!(auto_rows(Some(1000 * gb), 1, 500), 64);
        assert_eq!(auto_rows(None, gb, 4), 1);
        // FLUX.1 at 1024² in f32: 4096 + 512 tokens, (3·3072 + 12288)·4·4 bytes each
        let row = row_bytes(&flux_dit::Config::dev(), 4608, DType::F32);
        assert_eq!(row, 4608 * 21504 * 16);
        assert_eq!(auto_rows(Some(24 * gb), row, 2), 2);
    }
}
