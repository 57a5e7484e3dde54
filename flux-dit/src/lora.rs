//! LoRA and LyCORIS adapters on the transformer: format detection and the one key map onto
//! BFL module names.
//!
//! Every layout people publish reduces to the same step: strip the trainer's prefix
//! (`lora_unet_`, `diffusion_model.`, `transformer.`, `base_model.model.`, `lora_transformer_`,
//! `lycoris_`), then look the stem up in one table of aliases built from the model's own
//! tensor list: each BFL layer under its BFL name, its diffusers name(s) (through the same
//! [`diffusers_recipe`] the loader uses: `to_q`/`to_k`/`to_v` are row slices of `qkv`, a single
//! block's `linear1` is `[q, k, v, mlp]`, `norm_out` has its halves swapped) and XLabs'
//! processor names, each also with `_` for `.` (kohya, OneTrainer, LyCORIS). The kinds and
//! their math (LoRA, LoKr, LoHa, diffs, DoRA) are [`flux_kernels::lora`]'s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle::Tensor;
use flux_kernels::lora::{
    attach, plan_file, AdapterFile, AdapterKind, AdapterModule, KeyMap, LoraNaming, Patch,
    Placement, Target, T5_PREFIXES,
};
pub use flux_kernels::lora::{LoraMode, LoraOptions, CLIP_PREFIXES};

use crate::config::Config;
use crate::model::Flux;
use crate::weights::{bfl_tensor_shapes, diffusers_recipe, Recipe};

use crate::{Error, Result};

/// The layouts an adapter file may be in (detected from its keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` + `.alpha`.
    Kohya,
    /// ComfyUI / ai-toolkit: `diffusion_model.double_blocks.0.img_attn.qkv.lora_{down,A}…`.
    ComfyUi,
    /// diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`.
    Diffusers,
    /// OneTrainer: `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`.
    OneTrainer,
    /// XLabs: `double_blocks.0.processor.qkv_lora1.down.weight`.
    XLabs,
    /// LyCORIS / SimpleTuner: `lycoris_…` (LoKr, LoHa, LoRA).
    Lycoris,
    /// BFL's control LoRAs (FLUX.1-Canny/Depth-dev-lora): bare BFL names, biases on `lora_B`,
    /// QK-norm scales replaced, `img_in` taking 128 channels.
    BflControl,
    /// fal's Kontext trainer: `base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight`.
    FalKontext,
    /// DiffSynth: bare diffusers names (`transformer_blocks.0.attn.to_q.lora_A.weight`).
    DiffSynth,
    /// Bare BFL names (`double_blocks.0.img_attn.qkv.lora_A.weight`) without control parts.
    Bfl,
}

impl std::fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::ComfyUi => "ComfyUI",
            LoraFormat::Diffusers => "diffusers/PEFT",
            LoraFormat::OneTrainer => "OneTrainer",
            LoraFormat::XLabs => "XLabs",
            LoraFormat::Lycoris => "LyCORIS",
            LoraFormat::BflControl => "BFL control LoRA",
            LoraFormat::FalKontext => "fal Kontext",
            LoraFormat::DiffSynth => "DiffSynth",
            LoraFormat::Bfl => "BFL names",
        })
    }
}

/// Prefixes trainers put before the module path, stripped (repeatedly) before the lookup.
const PREFIXES: &[&str] = &[
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
];

/// An adapter file with its detected format.
#[derive(Debug)]
pub struct Lora {
    file: AdapterFile,
    format: LoraFormat,
}

impl Lora {
    /// Reads an adapter file (safetensors) and detects its format. A file that is empty, holds
    /// no adapter tensors, or whose parts do not make modules is an error naming the keys.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = AdapterFile::open(path.as_ref())?;
        let format = detect(&file);
        Ok(Lora { file, format })
    }

    /// The detected format.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The modules read from the file.
    pub fn file(&self) -> &AdapterFile {
        &self.file
    }

    /// The number of CLIP modules (`lora_te1_…`, `text_encoder.…`), which the text encoder
    /// takes, not the transformer.
    pub fn clip_modules(&self) -> usize {
        self.file
            .modules()
            .iter()
            .filter(|m| is_clip(&m.stem))
            .count()
    }
}

/// Whether a module stem names a CLIP-L layer (placed by the text encoder, not here).
pub fn is_clip(stem: &str) -> bool {
    CLIP_PREFIXES.iter().any(|p| stem.starts_with(p))
}

fn detect(file: &AdapterFile) -> LoraFormat {
    let ms = file.modules();
    let any = |f: &dyn Fn(&AdapterModule) -> bool| ms.iter().any(f);
    let starts = |p: &str| any(&|m| m.stem.starts_with(p));
    if any(&|m| m.stem.contains(".processor.")) {
        return LoraFormat::XLabs;
    }
    if starts("base_model.model.") {
        return LoraFormat::FalKontext;
    }
    if starts("lora_transformer_") {
        return LoraFormat::OneTrainer;
    }
    if starts("lycoris_")
        || any(&|m| matches!(m.kind, AdapterKind::LoKr { .. } | AdapterKind::LoHa { .. }))
    {
        return LoraFormat::Lycoris;
    }
    if starts("lora_unet_") {
        return LoraFormat::Kohya;
    }
    if starts("diffusion_model.") || starts("model.diffusion_model.") {
        return LoraFormat::ComfyUi;
    }
    if starts("transformer.") {
        return LoraFormat::Diffusers;
    }
    let norm_replaced =
        any(&|m| matches!(m.kind, AdapterKind::Replace { .. }) && m.stem.contains("_norm"));
    let bias_b = any(&|m| m.up_bias.is_some());
    if starts("double_blocks.") || starts("single_blocks.") || starts("img_in") {
        if norm_replaced || bias_b {
            return LoraFormat::BflControl;
        }
        return LoraFormat::Bfl;
    }
    let ab = any(&|m| {
        matches!(
            m.kind,
            AdapterKind::LoRA {
                naming: LoraNaming::AB,
                ..
            }
        )
    });
    if ab {
        return LoraFormat::DiffSynth;
    }
    LoraFormat::Kohya
}

/// The transformer's key map for `cfg`: each layer under its BFL name, its diffusers name(s)
/// (through [`diffusers_recipe`]: row slices of the fused `qkv`/`linear1`, `norm_out`'s
/// swapped halves) and XLabs' processor names; the QK-norm scales as replaceable.
pub fn key_map(cfg: &Config) -> KeyMap {
    let h = cfg.hidden_size;
    let mut map = KeyMap::new(PREFIXES);
    map.widenable("img_in");
    for (key, shape) in bfl_tensor_shapes(cfg) {
        if let Some(stem) = key.strip_suffix(".weight").filter(|_| shape.len() == 2) {
            let (rows, inp) = (shape[0], shape[1]);
            map.linear(stem, rows, inp);
            let place = |offset, rows, swap_halves| Placement {
                offset,
                rows,
                swap_halves,
            };
            let to = |p| Target::Linear(stem.to_string(), p);
            match diffusers_recipe(&key) {
                Some(Recipe::Rename(s)) => {
                    map.alias(s.trim_end_matches(".weight"), to(place(0, rows, false)));
                }
                Some(Recipe::SwapHalves(s)) => {
                    map.alias(s.trim_end_matches(".weight"), to(place(0, rows, true)));
                }
                Some(Recipe::Concat(parts)) => {
                    let mut offset = 0;
                    for (k, s) in parts.iter().enumerate() {
                        let n = if k < 3 { h } else { rows - 3 * h };
                        map.alias(s.trim_end_matches(".weight"), to(place(offset, n, false)));
                        offset += n;
                    }
                }
                None => {}
            }
        } else if key.ends_with("_norm.scale") {
            map.replaceable(&key, &shape);
            if let Some(Recipe::Rename(s)) = diffusers_recipe(&key) {
                map.alias(&s, Target::Replace(key.clone()));
            }
        }
    }
    let whole = |layer: String, rows| {
        Target::Linear(
            layer,
            Placement {
                offset: 0,
                rows,
                swap_halves: false,
            },
        )
    };
    for i in 0..cfg.depth {
        let b = format!("double_blocks.{i}");
        for (x, bfl, rows) in [
            ("qkv_lora1", "img_attn.qkv", 3 * h),
            ("qkv_lora2", "txt_attn.qkv", 3 * h),
            ("proj_lora1", "img_attn.proj", h),
            ("proj_lora2", "txt_attn.proj", h),
        ] {
            map.alias(
                &format!("{b}.processor.{x}"),
                whole(format!("{b}.{bfl}"), rows),
            );
        }
    }
    for j in 0..cfg.depth_single_blocks {
        let b = format!("single_blocks.{j}");
        map.alias(
            &format!("{b}.processor.qkv_lora"),
            whole(format!("{b}.linear1"), 3 * h),
        );
        map.alias(
            &format!("{b}.processor.proj_lora"),
            whole(format!("{b}.linear2"), h),
        );
    }
    map
}

/// Several adapters, each with its strength (`--lora FILE[:STRENGTH]`).
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    entries: Vec<(Arc<Lora>, f32)>,
}

impl LoraSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `path` and adds it with `strength`.
    pub fn add(&mut self, path: impl AsRef<Path>, strength: f32) -> Result<&mut Self> {
        let lora = Lora::open(path)?;
        Ok(self.push(Arc::new(lora), strength))
    }

    /// Adds an adapter already read.
    pub fn push(&mut self, lora: Arc<Lora>, strength: f32) -> &mut Self {
        self.entries.push((lora, strength));
        self
    }

    /// The adapters and their strengths, in order.
    pub fn entries(&self) -> &[(Arc<Lora>, f32)] {
        &self.entries
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks the set against a model of `cfg` without touching one (every module placed, every
    /// shape fitting, as [`Flux::apply_loras`] would), and returns the config the adapted model
    /// has (a control LoRA widens `in_channels`) and what would be applied.
    pub fn check(&self, cfg: &Config, opts: LoraOptions) -> Result<(Config, Vec<LoraReport>)> {
        let p = plan(cfg, self, opts)?;
        let mut c = cfg.clone();
        for patch in p.layers.get("img_in").into_iter().flatten() {
            if let Some((_, i)) = patch.module.delta_dims()? {
                c.in_channels = c.in_channels.max(i);
            }
        }
        Ok((c, p.reports))
    }
}

/// What [`Flux::apply_loras`] did, per adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReport {
    /// The file.
    pub path: std::path::PathBuf,
    /// Its detected format.
    pub format: LoraFormat,
    /// Modules placed on the model.
    pub applied: usize,
    /// Keys skipped in lenient mode (first few), and how many in all.
    pub skipped: (Vec<String>, usize),
}

/// The layers' patches of a set, and the norm replacements.
struct Plan<'a> {
    layers: HashMap<String, Vec<Patch<'a>>>,
    norms: HashMap<String, &'a Tensor>,
    reports: Vec<LoraReport>,
}

fn plan<'a>(cfg: &Config, set: &'a LoraSet, opts: LoraOptions) -> Result<Plan<'a>> {
    let map = key_map(cfg);
    let mut p = Plan {
        layers: HashMap::new(),
        norms: HashMap::new(),
        reports: vec![],
    };
    for (lora, strength) in &set.entries {
        let fp = plan_file(&lora.file, *strength, &map, |stem| !is_clip(stem))?;
        let mut unmatched = fp.unmatched;
        if !unmatched.is_empty() && !opts.lenient {
            let t5 = unmatched
                .iter()
                .filter(|s| T5_PREFIXES.iter().any(|p| s.starts_with(p)))
                .count();
            let note = if t5 > 0 {
                format!(" ({t5} of them T5 modules, which are not applied yet)")
            } else {
                String::new()
            };
            return Err(Error::InvalidConfig(format!(
                "{} ({} format): {} of {} modules match no layer of this transformer{note}: {} \
                 (use lenient mode to skip them)",
                lora.path().display(),
                lora.format,
                unmatched.len(),
                lora.file.modules().len(),
                flux_kernels::preview(&unmatched)
            )));
        }
        let applied = fp.patches.len() + fp.replacements.len();
        for (layer, patch) in fp.patches {
            p.layers.entry(layer).or_default().push(patch);
        }
        p.norms.extend(fp.replacements);
        let n = unmatched.len();
        unmatched.truncate(8);
        p.reports.push(LoraReport {
            path: lora.path().to_path_buf(),
            format: lora.format,
            applied,
            skipped: (unmatched, n),
        });
    }
    Ok(p)
}

impl Flux {
    /// Attaches `set` (replacing whatever was attached before), merged or at run time per
    /// `opts.mode`. Strict unless `opts.lenient`: a module that matches no layer, or one whose
    /// shape does not fit its layer, is an error naming it. Merging computes in f32 from the
    /// weights as loaded and rounds once; [`Flux::remove_loras`] restores them bit for bit.
    /// A control LoRA's wider `img_in` widens the model's input (its config's `in_channels`).
    pub fn apply_loras(&mut self, set: &LoraSet, opts: LoraOptions) -> Result<Vec<LoraReport>> {
        self.remove_loras()?;
        let base_cfg = self.config().clone();
        let plan = plan(&base_cfg, set, opts)?;
        let norms = self
            .norm_scales_mut()
            .into_iter()
            .map(|(k, t)| (k, t.clone()))
            .collect();
        self.lora_base = Some(Arc::new((base_cfg, norms)));
        let (dtype, device) = (self.dtype(), self.device().clone());
        let mut irreversible = false;
        let result = (|| -> Result<()> {
            irreversible = attach(self.linears_mut(), &plan.layers, &opts, dtype, &device)?;
            for (key, t) in self.norm_scales_mut() {
                if let Some(v) = plan.norms.get(&key) {
                    *t = v.to_dtype(t.dtype())?.to_device(t.device())?;
                }
            }
            Ok(())
        })();
        self.lora_merged_for_good = irreversible;
        if let Err(e) = result {
            // merged-for-good layers cannot be put back; the error says what failed
            let _ = self.remove_loras();
            return Err(e);
        }
        let width = self
            .linears_mut()
            .into_iter()
            .find(|(n, _)| n == "img_in")
            .map(|(_, l)| l.dims().0);
        if let Some(w) = width {
            self.config_mut().in_channels = w;
        }
        Ok(plan.reports)
    }

    /// Removes every adapter: the weights, norms and config as loaded, bit for bit. An error
    /// when adapters were merged with [`LoraOptions::reversible`] off (reload the model).
    pub fn remove_loras(&mut self) -> Result<()> {
        if self.lora_merged_for_good {
            return Err(Error::InvalidConfig(
                "the LoRAs were merged for good (LoraOptions::reversible = false); reload the \
                 transformer to change them"
                    .into(),
            ));
        }
        for (_, lin) in self.linears_mut() {
            lin.restore();
        }
        let Some(base) = self.lora_base.take() else {
            return Ok(());
        };
        let (cfg, norms) = &*base;
        let norms: HashMap<&str, &Tensor> = norms.iter().map(|(k, t)| (k.as_str(), t)).collect();
        for (key, t) in self.norm_scales_mut() {
            if let Some(v) = norms.get(key.as_str()) {
                *t = (*v).clone();
            }
        }
        *self.config_mut() = cfg.clone();
        Ok(())
    }
}
