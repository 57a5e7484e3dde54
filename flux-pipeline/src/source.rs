//! Where the model comes from: a hub repository (through the standard Hugging Face cache), a
//! local diffusers-layout folder, or individual files.

use std::path::{Path, PathBuf};

use flux_sampler::ShiftParams;

use crate::{Error, Result};

/// The hub repository of FLUX.1-schnell (Apache-2.0, not gated).
pub const SCHNELL_REPO: &str = "black-forest-labs/FLUX.1-schnell";
/// The hub repository of FLUX.1-dev (gated: accept its licence on the hub, then log in).
pub const DEV_REPO: &str = "black-forest-labs/FLUX.1-dev";

/// How the transformer is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformerFiles {
    /// A diffusers `transformer/` folder (reads its config.json).
    Diffusers(PathBuf),
    /// One file in BFL's key names, in any format (safetensors of any float or fp8 type,
    /// GGUF, prefixed or all-in-one); its config is detected from the tensors.
    File(PathBuf),
    /// A BFL single file with its config (`Config::dev()`, `Config::schnell()`, …).
    Bfl {
        /// The `.safetensors` file.
        file: PathBuf,
        /// Its configuration.
        config: flux_dit::Config,
    },
}

/// How the autoencoder is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum VaeFiles {
    /// A diffusers `vae/` folder.
    Diffusers(PathBuf),
    /// BFL's `ae.safetensors` with its config (`flux_vae::Config::flux()`).
    Bfl {
        /// The file.
        file: PathBuf,
        /// Its configuration.
        config: flux_vae::Config,
    },
}

/// Every component of a FLUX model, located on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    /// A name for messages and PNG metadata.
    pub name: String,
    /// CLIP tokenizer folder (`tokenizer.json`, or `vocab.json` + `merges.txt`).
    pub tokenizer: PathBuf,
    /// T5 tokenizer folder (`tokenizer.json`).
    pub tokenizer_2: PathBuf,
    /// CLIP text model: a transformers folder, or one file (CLIP-L; safetensors, fp8, GGUF or
    /// an all-in-one file).
    pub text_encoder: PathBuf,
    /// T5 encoder: a transformers folder, or one file (config from its shapes; safetensors,
    /// fp8, llama.cpp-layout GGUF or an all-in-one file).
    pub text_encoder_2: PathBuf,
    /// The folder whose `config.json` describes a CLIP given as one file; `None`: CLIP-L's
    /// (openai/clip-vit-large-patch14) config.
    pub text_encoder_config: Option<PathBuf>,
    /// The transformer.
    pub transformer: TransformerFiles,
    /// The autoencoder.
    pub vae: VaeFiles,
    /// The time shift of the schedule: `Some` for dev-family models (dynamic shifting), `None`
    /// for schnell. Read from `scheduler/scheduler_config.json` when there is one.
    pub shift: Option<ShiftParams>,
}

/// Resident memory a model's parts are estimated to take once loaded, bytes
/// ([`ModelFiles::memory_estimate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The text encoders (T5 and CLIP).
    pub text: u64,
    /// The transformer.
    pub transformer: u64,
    /// The autoencoder.
    pub vae: u64,
}

impl MemoryEstimate {
    /// All parts together.
    pub fn total(&self) -> u64 {
        self.text + self.transformer + self.vae
    }
}

/// A weight file's dense values (any float type, taken at the load dtype) and packed bytes
/// (GGUF blocks and fp8, which stay as stored), from its header through the loader's own
/// reader (`None`: not a file it reads).
fn stored_sizes(path: &Path) -> Option<(u64, u64)> {
    let ck = flux_kernels::Checkpoint::open(
        &[path.to_path_buf()],
        candle::DType::F32,
        &candle::Device::Cpu,
    )
    .ok()?;
    let (mut dense, mut packed) = (0u64, 0u64);
    for name in ck.names() {
        let elems = ck
            .shape(&name)?
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
        match ck.stored_type(&name)? {
            t if t.float_type().is_some() => dense = dense.checked_add(elems)?,
            t if t.fp8().is_some() => packed = packed.checked_add(elems)?,
            flux_kernels::StoredType::Gguf(q) => {
                let bytes = elems / q.block_elems() as u64 * q.block_bytes() as u64;
                packed = packed.checked_add(bytes)?
            }
            // other integer types: as stored
            flux_kernels::StoredType::Safetensors(d) => {
                packed = packed.checked_add(elems.checked_mul(d.bitsize() as u64)?.div_ceil(8))?
            }
        }
    }
    Some((dense, packed))
}

/// Bytes of the weight files at `path` (a file, or the weight files directly in a folder).
fn weight_file_bytes(path: &Path) -> Vec<(PathBuf, u64)> {
    let is_weights = |p: &Path| {
        matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("safetensors" | "gguf" | "bin" | "sft")
        )
    };
    if path.is_file() {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        return vec![(path.to_path_buf(), len)];
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_weights(p))
        .map(|p| {
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, len)
        })
        .collect()
}

impl ModelFiles {
    /// An estimate of the memory each part takes loaded in `dtype` (with `quantize` as
    /// [`crate::PipelineOptions::quantize`]), from the files' headers: GGUF and fp8 weights
    /// stay packed at their size; other weights take `dtype`'s size per value, or the
    /// quantized size in the transformer and T5 with `quantize`. A file that holds several
    /// parts (an all-in-one checkpoint) is counted once, in the first part that names it (the
    /// text encoders).
    pub fn memory_estimate(
        &self,
        dtype: candle::DType,
        quantize: Option<flux_kernels::Encoding>,
    ) -> MemoryEstimate {
        let mut seen = std::collections::HashSet::new();
        let mut part = |path: &Path, quantizable: bool| -> u64 {
            let per_value = match quantize {
                Some(flux_kernels::Encoding::Gguf(t)) if quantizable => {
                    t.block_bytes() as f64 / t.block_elems() as f64
                }
                Some(flux_kernels::Encoding::Fp8(_)) if quantizable => 1.0,
                _ => dtype.size_in_bytes() as f64,
            };
            weight_file_bytes(path)
                .into_iter()
                .filter(|(p, _)| seen.insert(p.clone()))
                .map(|(p, len)| {
                    // a file the loader cannot read is taken as 16-bit values
                    let (dense, packed) = stored_sizes(&p).unwrap_or((len / 2, 0));
                    packed + (dense as f64 * per_value) as u64
                })
                .sum()
        };
        let transformer = match &self.transformer {
            TransformerFiles::Diffusers(p) | TransformerFiles::File(p) => p.clone(),
            TransformerFiles::Bfl { file, .. } => file.clone(),
        };
        let vae = match &self.vae {
            VaeFiles::Diffusers(p) => p.clone(),
            VaeFiles::Bfl { file, .. } => file.clone(),
        };
        MemoryEstimate {
            text: part(&self.text_encoder_2, true) + part(&self.text_encoder, false),
            transformer: part(&transformer, true),
            vae: part(&vae, false),
        }
    }
}

/// A model source as the user names it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A hub repository id (`black-forest-labs/FLUX.1-schnell`), fetched into the Hugging Face
    /// cache (`HF_HOME`, default `~/.cache/huggingface`); with `offline`, only the cache is read.
    Hub {
        /// `owner/name`.
        repo: String,
        /// Read the cache only; never touch the network.
        offline: bool,
        /// Another cache folder (the `hub/` folder itself); `None` = the standard one.
        cache_dir: Option<PathBuf>,
    },
    /// A local folder in the diffusers layout (model_index.json + subfolders).
    Folder(PathBuf),
    /// Individual files, already located.
    Files(Box<ModelFiles>),
}

impl ModelSource {
    /// Parses what a user typed: an existing folder, `schnell`/`dev`, or a hub id `owner/name`.
    pub fn parse(s: &str, offline: bool) -> Result<Self> {
        let p = Path::new(s);
        if p.is_dir() {
            return Ok(ModelSource::Folder(absolute(p)));
        }
        if p.is_file() {
            return Err(Error::ModelSource {
                what: format!("`{s}` is a file; --model takes a diffusers folder or a hub id"),
                hint: format!("for one transformer file use --transformer {s} (the rest comes from --model); for an all-in-one file, --checkpoint {s}"),
            });
        }
        if let Ok(meta) = p.symlink_metadata() {
            // there, but neither file nor folder: a dangling link, a loop, a device…
            let why = std::fs::metadata(p)
                .err()
                .map_or_else(|| format!("{:?}", meta.file_type()), |e| e.to_string());
            return Err(Error::Io {
                path: p.to_path_buf(),
                reason: format!("cannot be read as a model folder: {why}"),
            });
        }
        let repo = match s {
            "schnell" | "flux-schnell" => SCHNELL_REPO.to_string(),
            "dev" | "flux-dev" => DEV_REPO.to_string(),
            other => other.to_string(),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(Error::ModelSource {
                what: format!("`{s}` is neither a folder nor a hub id of the form owner/name"),
                hint: format!("use `schnell`, `dev`, a repo id like {SCHNELL_REPO}, or a local diffusers folder"),
            });
        }
        Ok(ModelSource::Hub {
            repo,
            offline,
            cache_dir: None,
        })
    }

    /// Locates every file (downloading from the hub when needed and allowed).
    pub fn resolve(&self) -> Result<ModelFiles> {
        self.resolve_with(&Components::default())
    }

    /// Locates the model with some components replaced by files (`--transformer`, `--t5`,
    /// `--clip`, `--vae`): replaced components are neither read from the source nor
    /// downloaded; the source still gives the tokenizers (and the schedule, unless the
    /// transformer is replaced: then the schedule follows the file's variant).
    pub fn resolve_with(&self, c: &Components) -> Result<ModelFiles> {
        let (offline, cache_dir) = match self {
            ModelSource::Hub {
                offline, cache_dir, ..
            } => (*offline, cache_dir.clone()),
            _ => (false, None),
        };
        let locate = |r: &Option<FileRef>| -> Result<Option<PathBuf>> {
            r.as_ref()
                .map(|r| r.locate(offline, cache_dir.as_deref()))
                .transpose()
        };
        let (tr, t5, clip, vae) = (
            locate(&c.transformer)?,
            locate(&c.t5)?,
            locate(&c.clip)?,
            locate(&c.vae)?,
        );
        let skip = Skip {
            transformer: tr.is_some(),
            text_encoder: clip.is_some(),
            text_encoder_2: t5.is_some(),
            vae: vae.is_some(),
        };
        let mut files = self.resolve_skipping(&skip)?;
        if let Some(p) = tr {
            let w = flux_dit::Weights::open_file(&p, candle::DType::F32, &candle::Device::Cpu)?;
            // the file's shapes tell its config; where they cannot (a head size that is not
            // FLUX's), the source's transformer config.json, if it has one, says
            let (cfg, given) = match (w.detect_config(), &files.transformer) {
                (Ok(cfg), _) => (cfg, None),
                (Err(e), TransformerFiles::Diffusers(dir)) => match read_transformer_config(dir) {
                    Ok(cfg) => (cfg.clone(), Some(cfg)),
                    Err(_) => return Err(e.into()),
                },
                (Err(e), _) => return Err(e.into()),
            };
            files.shift = cfg.guidance_embed.then(ShiftParams::default);
            files.transformer = match given {
                None => TransformerFiles::File(p),
                Some(config) => TransformerFiles::Bfl { file: p, config },
            };
        }
        if let Some(p) = t5 {
            files.text_encoder_2 = p;
        }
        if let Some(p) = clip {
            // the source's text_encoder/config.json, when it has one, describes the file
            files.text_encoder_config =
                Some(files.text_encoder.clone()).filter(|d| d.join("config.json").is_file());
            files.text_encoder = p;
        }
        if let Some(p) = vae {
            // FLUX's autoencoder config when the file has its shapes, else the source's
            // vae/config.json when it has one
            let flux = flux_vae::Config::flux();
            let probe = flux_vae::Weights::open(
                std::slice::from_ref(&p),
                flux_vae::Layout::Bfl,
                &flux,
                candle::DType::F32,
                &candle::Device::Cpu,
            )?;
            let config = match &files.vae {
                _ if probe.fits(&flux) => flux,
                VaeFiles::Diffusers(dir) if dir.join("config.json").is_file() => {
                    let path = dir.join("config.json");
                    flux_vae::Config::from_diffusers_json(&read_config(&path)?)?
                }
                _ => flux_vae::Config::flux(),
            };
            files.vae = VaeFiles::Bfl { file: p, config };
        }
        Ok(files)
    }

    fn resolve_skipping(&self, skip: &Skip) -> Result<ModelFiles> {
        match self {
            ModelSource::Files(f) => Ok((**f).clone()),
            ModelSource::Folder(dir) => {
                let fetch = |rel: &str| -> Result<Option<PathBuf>> {
                    let p = dir.join(rel);
                    Ok(p.is_file().then_some(p))
                };
                resolve_layout(&dir.display().to_string(), &fetch, skip, &|rel| {
                    format!("{} is missing from the folder", dir.join(rel).display())
                })
            }
            ModelSource::Hub {
                repo,
                offline,
                cache_dir,
            } => {
                let cache = match cache_dir {
                    Some(d) => hf_hub::Cache::new(d.clone()),
                    None => hf_hub::Cache::from_env(),
                };
                if *offline {
                    let c = cache.model(repo.clone());
                    let fetch = |rel: &str| -> Result<Option<PathBuf>> { Ok(c.get(rel)) };
                    resolve_layout(repo, &fetch, skip, &|rel| {
                        format!(
                            "{repo}/{rel} is not in the Hugging Face cache ({}); run once without --offline \
                             (or `huggingface-cli download {repo} {rel}`)",
                            cache.path().display()
                        )
                    })
                } else {
                    let api = hub_api(cache.clone())?;
                    let r = api.model(repo.clone());
                    let fetch = |rel: &str| -> Result<Option<PathBuf>> {
                        match r.get(rel) {
                            Ok(p) => Ok(Some(p)),
                            Err(e) if e.to_string().contains("404") => Ok(None),
                            Err(e) => Err(Error::ModelSource {
                                what: format!("downloading {repo}/{rel}: {e}"),
                                hint: if repo == DEV_REPO {
                                    "FLUX.1-dev is gated: accept its licence on the hub, then set HF_TOKEN or run `huggingface-cli login`".into()
                                } else {
                                    "check the repo id, the network, and HF_TOKEN for gated repos"
                                        .into()
                                },
                            }),
                        }
                    };
                    resolve_layout(repo, &fetch, skip, &|rel| format!("{repo} has no {rel}"))
                }
            }
        }
    }
}

type Fetch<'a> = dyn Fn(&str) -> Result<Option<PathBuf>> + 'a;

/// The hub client over `cache`, with `HF_TOKEN` and `HF_ENDPOINT` (a mirror, or a test hub)
/// when set. An interrupted download is resumed from where it stopped, up to 3 times.
fn hub_api(cache: hf_hub::Cache) -> Result<hf_hub::api::sync::Api> {
    let mut b = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .with_retries(3);
    if let Ok(t) = std::env::var("HF_TOKEN") {
        b = b.with_token(Some(t));
    }
    if let Ok(e) = std::env::var("HF_ENDPOINT") {
        b = b.with_endpoint(e.trim_end_matches('/').to_string());
    }
    b.build().map_err(|e| Error::ModelSource {
        what: format!("cannot use the hub: {e}"),
        hint: "check the network, or use --offline with a filled cache".into(),
    })
}

/// Components whose weights come from elsewhere (not read from the source).
#[derive(Debug, Default)]
struct Skip {
    transformer: bool,
    text_encoder: bool,
    text_encoder_2: bool,
    vae: bool,
}

/// Files that replace a model's components, each in any supported format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Components {
    /// The transformer (`--transformer`).
    pub transformer: Option<FileRef>,
    /// The T5 encoder (`--t5`).
    pub t5: Option<FileRef>,
    /// The CLIP text model (`--clip`).
    pub clip: Option<FileRef>,
    /// The autoencoder (`--vae`).
    pub vae: Option<FileRef>,
}

impl Components {
    /// Every component from one all-in-one file (ComfyUI's `model.diffusion_model.`,
    /// `text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.`, `vae.` parts);
    /// each loader reads its own part.
    pub fn all_in_one(f: FileRef) -> Self {
        Components {
            transformer: Some(f.clone()),
            t5: Some(f.clone()),
            clip: Some(f.clone()),
            vae: Some(f),
        }
    }
}

/// One weights file: a local path, or one file inside a hub repository (`owner/name:path`,
/// e.g. `city96/FLUX.1-dev-gguf:flux1-dev-Q4_K_S.gguf`), of which only that file is fetched.
#[derive(Debug, Clone, PartialEq)]
pub enum FileRef {
    /// A file on disk.
    Local(PathBuf),
    /// A file in a hub repository.
    Hub {
        /// `owner/name`.
        repo: String,
        /// The file's path inside the repository.
        file: String,
    },
}

impl std::fmt::Display for FileRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileRef::Local(p) => write!(f, "{}", p.display()),
            FileRef::Hub { repo, file } => write!(f, "{repo}:{file}"),
        }
    }
}

/// `p` as an absolute path (symlinks resolved when possible).
fn absolute(p: &Path) -> PathBuf {
    p.canonicalize()
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

impl FileRef {
    /// An existing local file (made absolute, so that a record of it finds the same file from
    /// another folder), else `owner/name:path/in/repo`.
    pub fn parse(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.is_file() {
            return Ok(FileRef::Local(absolute(p)));
        }
        if p.is_dir() {
            return Err(Error::ModelSource {
                what: format!("`{s}` is a folder; a component is one file"),
                hint: "name the .safetensors or .gguf file itself".into(),
            });
        }
        match s.split_once(':') {
            Some((repo, file))
                if repo.split('/').count() == 2
                    && !repo.starts_with('/')
                    && !repo.split('/').any(str::is_empty)
                    && !file.is_empty()
                    && !file.split('/').any(|c| c == ".." || c.is_empty()) =>
            {
                Ok(FileRef::Hub {
                    repo: repo.to_string(),
                    file: file.to_string(),
                })
            }
            _ => Err(Error::ModelSource {
                what: format!("`{s}` is neither an existing file nor a hub file `owner/name:path`"),
                hint: "give a local .safetensors/.gguf path, or e.g. city96/FLUX.1-dev-gguf:flux1-dev-Q4_K_S.gguf".into(),
            }),
        }
    }

    /// The file on disk: local as is, hub files fetched into the Hugging Face cache (only
    /// the cache with `offline`).
    pub fn locate(&self, offline: bool, cache_dir: Option<&Path>) -> Result<PathBuf> {
        let (repo, file) = match self {
            FileRef::Local(p) => return Ok(p.clone()),
            FileRef::Hub { repo, file } => (repo, file),
        };
        let cache = match cache_dir {
            Some(d) => hf_hub::Cache::new(d.to_path_buf()),
            None => hf_hub::Cache::from_env(),
        };
        if offline {
            return cache
                .model(repo.clone())
                .get(file)
                .ok_or_else(|| Error::ModelSource {
                    what: format!(
                        "{repo}/{file} is not in the Hugging Face cache ({})",
                        cache.path().display()
                    ),
                    hint: "run once without --offline".into(),
                });
        }
        hub_api(cache)?
            .model(repo.clone())
            .get(file)
            .map_err(|e| Error::ModelSource {
                what: format!("downloading {repo}/{file}: {e}"),
                hint: "check the repo id and file name, the network, and HF_TOKEN for gated repos"
                    .into(),
            })
    }
}

/// A small JSON file (a config), read with [`flux_kernels::MAX_CONFIG_BYTES`] as the cap.
pub(crate) fn read_config(path: &Path) -> Result<String> {
    flux_kernels::read_text(path, flux_kernels::MAX_CONFIG_BYTES).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        reason: match e {
            flux_kernels::LoadError::File { reason, .. } => reason,
            e => e.to_string(),
        },
    })
}

/// Checks a `model_index.json`: readable, JSON, and a FLUX pipeline's (`_class_name`
/// `FluxPipeline` or another `Flux…` pipeline, when it says).
fn check_model_index(path: &Path) -> Result<()> {
    let bad = |reason: String| Error::ModelSource {
        what: format!("{}: {reason}", path.display()),
        hint: "a diffusers model folder's model_index.json names its pipeline and parts".into(),
    };
    let text = read_config(path)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    match obj.get("_class_name").and_then(|c| c.as_str()) {
        Some(c) if !c.starts_with("Flux") => {
            Err(bad(format!("this is a {c}, not a FLUX pipeline")))
        }
        _ => Ok(()),
    }
}

/// Reads a diffusers-layout model through `fetch` (folder, cache or hub), fetching only what
/// the pipeline needs.
fn resolve_layout(
    name: &str,
    fetch: &Fetch,
    skip: &Skip,
    missing: &dyn Fn(&str) -> String,
) -> Result<ModelFiles> {
    let need = |rel: &str| -> Result<PathBuf> {
        fetch(rel)?.ok_or_else(|| Error::ModelSource {
            what: missing(rel),
            hint: "a FLUX diffusers folder has model_index.json, scheduler/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, transformer/ and vae/".into(),
        })
    };
    check_model_index(&need("model_index.json")?)?;
    // weights: the index (then its shards) or the single file
    let weights = |dir: &str, stem: &str| -> Result<PathBuf> {
        let index = format!("{dir}/{stem}.safetensors.index.json");
        if let Some(p) = fetch(&index)? {
            let shards = flux_kernels::shard_names(&p).map_err(|e| Error::ModelSource {
                what: e.to_string(),
                hint: "the index file is corrupt; download it again".into(),
            })?;
            for s in shards {
                need(&format!("{dir}/{s}"))?;
            }
            Ok(p.parent().map(Path::to_path_buf).unwrap_or_default())
        } else {
            let p = need(&format!("{dir}/{stem}.safetensors"))?;
            Ok(p.parent().map(Path::to_path_buf).unwrap_or_default())
        }
    };
    let config_dir = |dir: &str| -> Result<PathBuf> {
        let p = need(&format!("{dir}/config.json"))?;
        Ok(p.parent().map(Path::to_path_buf).unwrap_or_default())
    };
    // tokenizers
    let tokenizer = match fetch("tokenizer/tokenizer.json")? {
        Some(p) => p,
        None => {
            need("tokenizer/merges.txt")?;
            need("tokenizer/vocab.json")?
        }
    };
    let tokenizer_2 = need("tokenizer_2/tokenizer.json")?;
    let parent = |p: PathBuf| p.parent().map(Path::to_path_buf).unwrap_or_default();
    // a component given as a file elsewhere is not fetched (its path here is a placeholder
    // that `resolve_with` replaces)
    let component = |dir: &str, stem: &str, skipped: bool| -> Result<PathBuf> {
        if skipped {
            // the config alone, where there is one (a transformer file whose shapes cannot
            // tell its config falls back on it)
            let cfg = fetch(&format!("{dir}/config.json")).ok().flatten();
            return Ok(cfg
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_default());
        }
        let d = config_dir(dir)?;
        weights(dir, stem)?;
        Ok(d)
    };
    let text_encoder = component("text_encoder", "model", skip.text_encoder)?;
    let text_encoder_2 = component("text_encoder_2", "model", skip.text_encoder_2)?;
    let transformer = component("transformer", "diffusion_pytorch_model", skip.transformer)?;
    let vae = component("vae", "diffusion_pytorch_model", skip.vae)?;
    let shift = match fetch("scheduler/scheduler_config.json")? {
        Some(p) => scheduler_shift(&p)?,
        None if skip.transformer => None, // set from the transformer file
        None => {
            let cfg = read_transformer_config(&transformer)?;
            cfg.guidance_embed.then(ShiftParams::default)
        }
    };
    Ok(ModelFiles {
        name: name.to_string(),
        tokenizer: parent(tokenizer),
        tokenizer_2: parent(tokenizer_2),
        text_encoder,
        text_encoder_2,
        text_encoder_config: None,
        transformer: TransformerFiles::Diffusers(transformer),
        vae: VaeFiles::Diffusers(vae),
        shift,
    })
}

/// The time shift a `scheduler_config.json` asks for.
pub fn scheduler_shift(path: &Path) -> Result<Option<ShiftParams>> {
    let text = read_config(path)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::ModelSource {
        what: format!("{}: {e}", path.display()),
        hint: "the scheduler config is corrupt".into(),
    })?;
    if !v["use_dynamic_shifting"].as_bool().unwrap_or(false) {
        let shift = v["shift"].as_f64().unwrap_or(1.0);
        if shift != 1.0 {
            return Err(Error::ModelSource {
                what: format!(
                    "{}: a static shift of {shift} is not a FLUX schedule",
                    path.display()
                ),
                hint: "FLUX uses dynamic shifting (dev) or none (schnell)".into(),
            });
        }
        return Ok(None);
    }
    let d = ShiftParams::default();
    Ok(Some(ShiftParams {
        base_shift: v["base_shift"].as_f64().unwrap_or(d.base_shift),
        max_shift: v["max_shift"].as_f64().unwrap_or(d.max_shift),
        base_seq_len: v["base_image_seq_len"].as_f64().unwrap_or(d.base_seq_len),
        max_seq_len: v["max_image_seq_len"].as_f64().unwrap_or(d.max_seq_len),
    }))
}

pub(crate) fn read_transformer_config(dir: &Path) -> Result<flux_dit::Config> {
    let path = dir.join("config.json");
    Ok(flux_dit::Config::from_diffusers_json(&read_config(&path)?)?)
}
