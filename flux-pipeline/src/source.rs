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
    /// CLIP text model folder.
    pub text_encoder: PathBuf,
    /// T5 encoder folder.
    pub text_encoder_2: PathBuf,
    /// The transformer.
    pub transformer: TransformerFiles,
    /// The autoencoder.
    pub vae: VaeFiles,
    /// The time shift of the schedule: `Some` for dev-family models (dynamic shifting), `None`
    /// for schnell. Read from `scheduler/scheduler_config.json` when there is one.
    pub shift: Option<ShiftParams>,
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
            return Ok(ModelSource::Folder(p.to_path_buf()));
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
        match self {
            ModelSource::Files(f) => Ok((**f).clone()),
            ModelSource::Folder(dir) => {
                let fetch = |rel: &str| -> Result<Option<PathBuf>> {
                    let p = dir.join(rel);
                    Ok(p.is_file().then_some(p))
                };
                resolve_layout(&dir.display().to_string(), &fetch, &|rel| {
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
                    resolve_layout(repo, &fetch, &|rel| {
                        format!(
                            "{repo}/{rel} is not in the Hugging Face cache ({}); run once without --offline \
                             (or `huggingface-cli download {repo} {rel}`)",
                            cache.path().display()
                        )
                    })
                } else {
                    let mut b = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                        .with_progress(true);
                    if let Ok(t) = std::env::var("HF_TOKEN") {
                        b = b.with_token(Some(t));
                    }
                    let api = b.build().map_err(|e| Error::ModelSource {
                        what: format!("cannot use the hub: {e}"),
                        hint: "check the network, or use --offline with a filled cache".into(),
                    })?;
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
                    resolve_layout(repo, &fetch, &|rel| format!("{repo} has no {rel}"))
                }
            }
        }
    }
}

type Fetch<'a> = dyn Fn(&str) -> Result<Option<PathBuf>> + 'a;

/// Reads a diffusers-layout model through `fetch` (folder, cache or hub), fetching only what
/// the pipeline needs.
fn resolve_layout(
    name: &str,
    fetch: &Fetch,
    missing: &dyn Fn(&str) -> String,
) -> Result<ModelFiles> {
    let need = |rel: &str| -> Result<PathBuf> {
        fetch(rel)?.ok_or_else(|| Error::ModelSource {
            what: missing(rel),
            hint: "a FLUX diffusers folder has model_index.json, scheduler/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, transformer/ and vae/".into(),
        })
    };
    need("model_index.json")?;
    // weights: the index (then its shards) or the single file
    let weights = |dir: &str, stem: &str| -> Result<PathBuf> {
        let index = format!("{dir}/{stem}.safetensors.index.json");
        if let Some(p) = fetch(&index)? {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::ModelSource {
                    what: format!("{}: {e}", p.display()),
                    hint: "the index file is corrupt; download it again".into(),
                })?;
            let mut shards: Vec<String> = json["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
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
    let text_encoder = config_dir("text_encoder")?;
    weights("text_encoder", "model")?;
    let text_encoder_2 = config_dir("text_encoder_2")?;
    weights("text_encoder_2", "model")?;
    let transformer = config_dir("transformer")?;
    weights("transformer", "diffusion_pytorch_model")?;
    let vae = config_dir("vae")?;
    weights("vae", "diffusion_pytorch_model")?;
    let shift = match fetch("scheduler/scheduler_config.json")? {
        Some(p) => scheduler_shift(&p)?,
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
        transformer: TransformerFiles::Diffusers(transformer),
        vae: VaeFiles::Diffusers(vae),
        shift,
    })
}

/// The time shift a `scheduler_config.json` asks for.
pub fn scheduler_shift(path: &Path) -> Result<Option<ShiftParams>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
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
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(flux_dit::Config::from_diffusers_json(&text)?)
}
