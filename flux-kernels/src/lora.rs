//! Adapter files — LoRA, LoKr, LoHa, full diffs, DoRA — and their math.
//!
//! An [`AdapterFile`] is a safetensors file read into modules: every key is split into a module
//! stem and a known suffix (`.lora_down.weight`, `.lora_B.bias`, `.lokr_w1`, `.alpha`, …), and
//! the parts of one stem make one [`AdapterModule`]. Which model layer a stem patches is the
//! model crate's key map (flux-dit for the transformer, flux-text for CLIP); this module knows
//! only the kinds, their scales and how a patch changes a weight. [`merge_patches`] and
//! [`runtime_patches`] attach a layer's patches to a [`Linear`], merged or at run time; both
//! compute the same `W + m·s·ΔW` (`m` the user's strength, `s` the format's scale).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor, D};

use crate::{Checkpoint, Error, Linear, LoadError, Result, RuntimeDelta};

/// One of a low-rank pair's factors, or a full matrix (LoKr's `w1`/`w2`).
#[derive(Debug, Clone)]
pub enum Factor {
    /// A full matrix.
    Full(Tensor),
    /// `a @ b`, `a: (p, r)`, `b: (r, q)`.
    LowRank(Tensor, Tensor),
}

impl Factor {
    /// `(rows, cols)` of the matrix the factor stands for.
    fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Factor::Full(t) => t.dims2()?,
            Factor::LowRank(a, b) => (a.dims2()?.0, b.dims2()?.1),
        })
    }

    fn matrix(&self) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(t) => t.clone(),
            Factor::LowRank(a, b) => a.matmul(b)?,
        })
    }
}

/// How a low-rank module's two factors are named in the file (part of telling formats apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraNaming {
    /// `lora_down` / `lora_up` (kohya, ComfyUI, OneTrainer, LyCORIS).
    DownUp,
    /// `lora_A` / `lora_B` (PEFT, diffusers, BFL control, fal).
    AB,
    /// `down` / `up` (XLabs).
    Bare,
}

/// What a module changes.
#[derive(Debug, Clone)]
pub enum AdapterKind {
    /// `ΔW = up @ down`, `down: (r, in)`, `up: (out, r)`.
    LoRA {
        /// `(r, in)`.
        down: Tensor,
        /// `(out, r)`.
        up: Tensor,
        /// How the factors were named.
        naming: LoraNaming,
    },
    /// `ΔW = kron(w1, w2)`.
    LoKr {
        /// `lokr_w1`, or `lokr_w1_a @ lokr_w1_b`.
        w1: Factor,
        /// `lokr_w2`, or `lokr_w2_a @ lokr_w2_b`.
        w2: Factor,
    },
    /// `ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`.
    LoHa {
        /// `hada_w1_a`, `hada_w1_b`.
        w1: (Tensor, Tensor),
        /// `hada_w2_a`, `hada_w2_b`.
        w2: (Tensor, Tensor),
    },
    /// A full difference `.diff` (ΔW) and/or `.diff_b` (Δbias), added as stored.
    Diff {
        /// `(out, in)`.
        weight: Option<Tensor>,
        /// `(out)`.
        bias: Option<Tensor>,
    },
    /// A tensor with no adapter suffix: a replacement value (BFL control LoRAs' QK-norm
    /// scales), for the model crate to place or reject.
    Replace {
        /// The last part of the key (`scale`, `weight`, …).
        param: String,
        /// The value.
        value: Tensor,
    },
}

/// The parts of one stem.
#[derive(Debug, Clone)]
pub struct AdapterModule {
    /// The stem as it appears in the file (the key without its adapter suffix).
    pub stem: String,
    /// What it changes.
    pub kind: AdapterKind,
    /// `.alpha`, when stored.
    pub alpha: Option<f32>,
    /// stable-diffusion.cpp's `.scale` (wins over alpha), when stored.
    pub scale: Option<f32>,
    /// `.lora_B.bias` (BFL control LoRAs): added, scaled like the product.
    pub up_bias: Option<Tensor>,
    /// DoRA's `.dora_scale`: `(1, in)` (per input column) or `(out, 1)` (per output row).
    pub dora_scale: Option<Tensor>,
}

/// The scale a PEFT adapter's `lora_adapter_metadata` gives (diffusers' `LoraConfig`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeftConfig {
    /// `r`.
    pub r: Option<f64>,
    /// `lora_alpha`.
    pub lora_alpha: Option<f64>,
    /// Per-module `lora_alpha` (matched as a suffix of the module name).
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Per-module `r`.
    pub rank_pattern: BTreeMap<String, f64>,
    /// `use_rslora`: `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `use_dora` (its magnitude vectors are not read: see [`AdapterFile::open`]).
    pub use_dora: bool,
}

impl PeftConfig {
    fn parse(text: &str) -> Result<Self> {
        let bad = |why: String| Error::InvalidArgument(format!("lora_adapter_metadata: {why}"));
        let mut v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        // a pipeline's `save_lora_weights` prefixes each field with its component
        if let Some(obj) = v.as_object() {
            if obj.keys().any(|k| k.starts_with("transformer.")) {
                v = serde_json::Value::Object(
                    obj.iter()
                        .filter_map(|(k, x)| {
                            Some((k.strip_prefix("transformer.")?.into(), x.clone()))
                        })
                        .collect(),
                );
            }
        }
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let map = |k: &str| -> BTreeMap<String, f64> {
            v.get(k)
                .and_then(serde_json::Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let flag = |k: &str| v.get(k).and_then(serde_json::Value::as_bool) == Some(true);
        Ok(PeftConfig {
            r: num("r"),
            lora_alpha: num("lora_alpha"),
            alpha_pattern: map("alpha_pattern"),
            rank_pattern: map("rank_pattern"),
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
        })
    }

    /// `alpha / r` (or `/ √r`) for module `name` of rank `rank`, when the config gives alpha.
    fn scale(&self, name: &str, rank: usize) -> Option<f32> {
        let pat = |m: &BTreeMap<String, f64>| {
            m.iter()
                .filter(|(k, _)| name == k.as_str() || name.ends_with(&format!(".{k}")))
                .max_by_key(|(k, _)| k.len())
                .map(|(_, v)| *v)
        };
        let alpha = pat(&self.alpha_pattern).or(self.lora_alpha)?;
        let r = pat(&self.rank_pattern).unwrap_or(rank as f64);
        let r = if self.use_rslora { r.sqrt() } else { r };
        Some((alpha / r) as f32)
    }
}

/// The suffixes an adapter key may end with, longest first where one ends another.
const SUFFIXES: &[&str] = &[
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight.alpha",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_A.bias",
    ".lora_mid.weight",
    ".lora_magnitude_vector",
    ".down.weight",
    ".up.weight",
    ".dora_scale",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w1",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_w2",
    ".lokr_t2",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".diff_b",
    ".diff",
    ".alpha",
    ".scale",
];

/// The most values one file may hold (a full-rank LoRA of every FLUX layer is about 12 G).
const MAX_VALUES: usize = 16 << 30;

/// An adapter file read into modules.
#[derive(Debug)]
pub struct AdapterFile {
    path: PathBuf,
    modules: Vec<AdapterModule>,
    peft: Option<PeftConfig>,
    software: Option<String>,
}

impl AdapterFile {
    /// Reads a safetensors adapter file (every tensor converted to f32 on the CPU). A file with
    /// no tensors, one with tensors but no adapter among them, parts that do not make a module
    /// (an up without its down) and kinds this workspace does not apply (LoCon's Tucker
    /// `lora_mid`, LyCORIS' Tucker `t1`/`t2`, PEFT DoRA's `lora_magnitude_vector`) are
    /// [`LoadError::File`] errors naming the keys.
    pub fn open(path: &Path) -> Result<Self> {
        let ck = Checkpoint::open(&[path.to_path_buf()], DType::F32, &Device::Cpu)?;
        let bad = |reason: String| -> Error {
            LoadError::File {
                path: path.to_path_buf(),
                reason,
            }
            .into()
        };
        let names = ck.names();
        if names.is_empty() {
            return Err(bad("the file holds no tensors".into()));
        }
        let total: usize = names
            .iter()
            .filter_map(|n| ck.shape(n))
            .map(|s| s.iter().product::<usize>())
            .fold(0, usize::saturating_add);
        if total > MAX_VALUES {
            return Err(bad(format!(
                "{total} values is more than an adapter file may hold ({MAX_VALUES})"
            )));
        }
        // stem -> suffix -> tensor
        let mut parts: BTreeMap<String, BTreeMap<&'static str, Tensor>> = BTreeMap::new();
        let mut lone: Vec<String> = vec![];
        for name in &names {
            match SUFFIXES.iter().find(|s| name.ends_with(*s)) {
                Some(s) => {
                    let stem = name[..name.len() - s.len()].to_string();
                    parts
                        .entry(stem)
                        .or_default()
                        .insert(s, ck.get(name, None)?);
                }
                None => lone.push(name.clone()),
            }
        }
        let mut modules = vec![];
        for (stem, mut p) in parts {
            // a `.scale` alone is a replacement value (a norm's scale), not sd.cpp's LoRA scale
            if p.len() == 1 && p.contains_key(".scale") {
                let value = p.remove(".scale").expect("checked");
                modules.push(AdapterModule {
                    stem,
                    kind: AdapterKind::Replace {
                        param: "scale".into(),
                        value,
                    },
                    alpha: None,
                    scale: None,
                    up_bias: None,
                    dora_scale: None,
                });
                continue;
            }
            modules.push(module_of(&stem, p).map_err(bad)?);
        }
        for name in lone {
            let (stem, param) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
            modules.push(AdapterModule {
                stem: stem.to_string(),
                kind: AdapterKind::Replace {
                    param: param.to_string(),
                    value: ck.get(&name, None)?,
                },
                alpha: None,
                scale: None,
                up_bias: None,
                dora_scale: None,
            });
        }
        if !modules
            .iter()
            .any(|m| !matches!(m.kind, AdapterKind::Replace { .. }))
        {
            return Err(bad(format!(
                "no LoRA, LoKr, LoHa or diff tensors in this file (it holds {}); is it a \
                 model rather than an adapter?",
                crate::preview(&names)
            )));
        }
        let peft = ck
            .text_metadata("lora_adapter_metadata")
            .map(PeftConfig::parse)
            .transpose()?;
        let software = ck
            .text_metadata("software")
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            .and_then(|v| v.get("name")?.as_str().map(str::to_string))
            .or_else(|| ck.text_metadata("ss_network_module").map(str::to_string));
        Ok(AdapterFile {
            path: path.to_path_buf(),
            modules,
            peft,
            software,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its modules, sorted by stem.
    pub fn modules(&self) -> &[AdapterModule] {
        &self.modules
    }

    /// PEFT's `lora_adapter_metadata`, when the file has it.
    pub fn peft(&self) -> Option<&PeftConfig> {
        self.peft.as_ref()
    }

    /// The writer's name from the metadata (`software.name`, kohya's `ss_network_module`).
    pub fn software(&self) -> Option<&str> {
        self.software.as_deref()
    }

    /// The format's scale `s` of `module` (`ΔW = m·s·…`): stable-diffusion.cpp's `.scale` when
    /// stored; else `alpha / rank` for a low-rank module with an alpha (alpha 0 counts as the
    /// rank, as sd-scripts, which writes such files, trains them); else the PEFT metadata's
    /// `lora_alpha / r` (`/ √r` with rsLoRA); else 1. LoKr: `alpha / dim` when a factor is
    /// low-rank, 1 when both are full; LoHa: `alpha / rank`; diffs: 1.
    pub fn scale_of(&self, module: &AdapterModule) -> Result<f32> {
        if let Some(s) = module.scale {
            return Ok(s);
        }
        let per_rank = |rank: usize| -> f32 {
            match module.alpha {
                Some(a) if a != 0.0 => a / rank as f32,
                _ => 1.0,
            }
        };
        Ok(match &module.kind {
            AdapterKind::LoRA { down, .. } => {
                let rank = down.dim(0)?;
                match (module.alpha, &self.peft) {
                    (Some(_), _) => per_rank(rank),
                    (None, Some(p)) => {
                        let name = module
                            .stem
                            .strip_prefix("transformer.")
                            .unwrap_or(&module.stem);
                        p.scale(name, rank).unwrap_or(1.0)
                    }
                    (None, None) => 1.0,
                }
            }
            AdapterKind::LoKr { w1, w2 } => match (w1, w2) {
                (_, Factor::LowRank(a, _)) => per_rank(a.dim(1)?),
                (Factor::LowRank(a, _), Factor::Full(_)) => per_rank(a.dim(1)?),
                _ => 1.0,
            },
            AdapterKind::LoHa { w1, .. } => per_rank(w1.0.dim(1)?),
            AdapterKind::Diff { .. } | AdapterKind::Replace { .. } => 1.0,
        })
    }
}

/// The module of one stem's parts, or why they do not make one.
fn module_of(
    stem: &str,
    mut p: BTreeMap<&'static str, Tensor>,
) -> std::result::Result<AdapterModule, String> {
    let keys = p
        .keys()
        .map(|s| format!("{stem}{s}"))
        .collect::<Vec<_>>()
        .join(", ");
    for (s, what) in [
        (
            ".lora_mid.weight",
            "LoCon's Tucker `lora_mid` (convolutions)",
        ),
        (".lokr_t2", "LyCORIS' Tucker `lokr_t2` (convolutions)"),
        (".hada_t1", "LyCORIS' Tucker `hada_t1` (convolutions)"),
        (".hada_t2", "LyCORIS' Tucker `hada_t2` (convolutions)"),
        (
            ".lora_magnitude_vector",
            "PEFT DoRA's `lora_magnitude_vector` (kohya/LyCORIS `dora_scale` is supported)",
        ),
        (".lora_A.bias", "a bias on `lora_A`"),
    ] {
        if p.contains_key(s) {
            return Err(format!("{stem}: {what} is not supported"));
        }
    }
    let scalar = |t: Option<Tensor>| -> std::result::Result<Option<f32>, String> {
        t.map(|t| {
            let v = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())?;
            match v.as_slice() {
                [x] if x.is_finite() => Ok(*x),
                _ => Err(format!("{stem}: alpha/scale must be one finite number")),
            }
        })
        .transpose()
    };
    let alpha = scalar(
        p.remove(".alpha")
            .or_else(|| p.remove(".lora_A.weight.alpha")),
    )?;
    let scale = scalar(p.remove(".scale"))?;
    let up_bias = p.remove(".lora_B.bias");
    let dora_scale = p.remove(".dora_scale");
    let mat = |t: Tensor, what: &str| -> std::result::Result<Tensor, String> {
        match t.rank() {
            2 => Ok(t),
            _ => Err(format!(
                "{stem}{what}: expected a matrix, got shape {:?}",
                t.dims()
            )),
        }
    };
    let pair = |a: Option<Tensor>, b: Option<Tensor>, naming| match (a, b) {
        (Some(d), Some(u)) => Some(Ok((d, u, naming))),
        (None, None) => None,
        _ => Some(Err(format!(
            "{stem}: a low-rank pair needs both factors (found only one of {keys})"
        ))),
    };
    let lora = pair(
        p.remove(".lora_down.weight"),
        p.remove(".lora_up.weight"),
        LoraNaming::DownUp,
    )
    .or_else(|| {
        pair(
            p.remove(".lora_A.weight"),
            p.remove(".lora_B.weight"),
            LoraNaming::AB,
        )
    })
    .or_else(|| {
        pair(
            p.remove(".down.weight"),
            p.remove(".up.weight"),
            LoraNaming::Bare,
        )
    });
    let kind = if let Some(r) = lora {
        let (down, up, naming) = r?;
        let (down, up) = (mat(down, " down")?, mat(up, " up")?);
        let (r, _) = down.dims2().map_err(|e| e.to_string())?;
        let (_, ru) = up.dims2().map_err(|e| e.to_string())?;
        if r != ru || r == 0 {
            return Err(format!(
                "{stem}: down factor {:?} and up factor {:?} do not share a rank",
                down.dims(),
                up.dims()
            ));
        }
        AdapterKind::LoRA { down, up, naming }
    } else if p.keys().any(|k| k.starts_with(".lokr")) {
        let factor = |full: Option<Tensor>,
                      a: Option<Tensor>,
                      b: Option<Tensor>,
                      n: &str|
         -> std::result::Result<Factor, String> {
            match (full, a, b) {
                (Some(f), None, None) => Ok(Factor::Full(mat(f, n)?)),
                (None, Some(a), Some(b)) => {
                    let (a, b) = (mat(a, n)?, mat(b, n)?);
                    if a.dims()[1] != b.dims()[0] {
                        return Err(format!("{stem}: {n}_a and {n}_b do not share a rank"));
                    }
                    Ok(Factor::LowRank(a, b))
                }
                _ => Err(format!("{stem}: LoKr needs {n} or both {n}_a and {n}_b")),
            }
        };
        let w1 = factor(
            p.remove(".lokr_w1"),
            p.remove(".lokr_w1_a"),
            p.remove(".lokr_w1_b"),
            ".lokr_w1",
        )?;
        let w2 = factor(
            p.remove(".lokr_w2"),
            p.remove(".lokr_w2_a"),
            p.remove(".lokr_w2_b"),
            ".lokr_w2",
        )?;
        AdapterKind::LoKr { w1, w2 }
    } else if p.keys().any(|k| k.starts_with(".hada")) {
        let (Some(a1), Some(b1), Some(a2), Some(b2)) = (
            p.remove(".hada_w1_a"),
            p.remove(".hada_w1_b"),
            p.remove(".hada_w2_a"),
            p.remove(".hada_w2_b"),
        ) else {
            return Err(format!(
                "{stem}: LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b (found {keys})"
            ));
        };
        let w1 = (mat(a1, ".hada_w1_a")?, mat(b1, ".hada_w1_b")?);
        let w2 = (mat(a2, ".hada_w2_a")?, mat(b2, ".hada_w2_b")?);
        let shape =
            |(a, b): &(Tensor, Tensor)| (a.dims()[0], a.dims()[1], b.dims()[0], b.dims()[1]);
        let (s1, s2) = (shape(&w1), shape(&w2));
        if s1.1 != s1.2 || s2.1 != s2.2 || (s1.0, s1.3) != (s2.0, s2.3) {
            return Err(format!(
                "{stem}: LoHa factors do not make two matrices of one shape"
            ));
        }
        AdapterKind::LoHa { w1, w2 }
    } else if p.contains_key(".diff") || p.contains_key(".diff_b") {
        AdapterKind::Diff {
            weight: p.remove(".diff").map(|t| mat(t, ".diff")).transpose()?,
            bias: p.remove(".diff_b"),
        }
    } else {
        return Err(format!("{stem}: {keys} do not make an adapter module"));
    };
    if let Some(k) = p.keys().next() {
        return Err(format!(
            "{stem}: `{stem}{k}` does not belong with the other parts"
        ));
    }
    Ok(AdapterModule {
        stem: stem.to_string(),
        kind,
        alpha,
        scale,
        up_bias,
        dora_scale,
    })
}

impl AdapterModule {
    /// `(out, in)` of the weight change, from the stored shapes (nothing computed).
    pub fn delta_dims(&self) -> Result<Option<(usize, usize)>> {
        Ok(match &self.kind {
            AdapterKind::LoRA { down, up, .. } => Some((up.dim(0)?, down.dim(1)?)),
            AdapterKind::LoKr { w1, w2 } => {
                let ((a, b), (c, d)) = (w1.dims()?, w2.dims()?);
                let mul = |x: usize, y: usize| {
                    x.checked_mul(y).ok_or_else(|| {
                        Error::InvalidArgument(format!("{}: LoKr shape overflows", self.stem))
                    })
                };
                Some((mul(a, c)?, mul(b, d)?))
            }
            AdapterKind::LoHa { w1, .. } => Some((w1.0.dim(0)?, w1.1.dim(1)?)),
            AdapterKind::Diff { weight, .. } => weight.as_ref().map(|w| w.dims2()).transpose()?,
            AdapterKind::Replace { .. } => None,
        })
    }

    /// `(out)` of the bias change, when the module has one.
    pub fn bias_len(&self) -> Option<usize> {
        let b = match &self.kind {
            AdapterKind::Diff { bias, .. } => bias.as_ref(),
            _ => self.up_bias.as_ref(),
        };
        b.map(|b| b.elem_count())
    }

    /// The low-rank factors `(down, up)` when the module is a plain LoRA without DoRA.
    pub fn low_rank(&self) -> Option<(&Tensor, &Tensor)> {
        match (&self.kind, &self.dora_scale) {
            (AdapterKind::LoRA { down, up, .. }, None) => Some((down, up)),
            _ => None,
        }
    }

    /// The unscaled weight change `(out, in)` in f32 (call [`Self::delta_dims`] first to bound
    /// it).
    pub fn delta(&self) -> Result<Option<Tensor>> {
        Ok(match &self.kind {
            AdapterKind::LoRA { down, up, .. } => Some(up.matmul(down)?),
            AdapterKind::LoKr { w1, w2 } => Some(kron(&w1.matrix()?, &w2.matrix()?)?),
            AdapterKind::LoHa { w1, w2 } => Some((w1.0.matmul(&w1.1)? * w2.0.matmul(&w2.1)?)?),
            AdapterKind::Diff { weight, .. } => weight.clone(),
            AdapterKind::Replace { .. } => None,
        })
    }

    /// The unscaled bias change `(out)`.
    fn bias_delta(&self) -> Option<Tensor> {
        match &self.kind {
            AdapterKind::Diff { bias, .. } => bias.clone(),
            _ => self.up_bias.clone(),
        }
    }
}

/// `kron(a, b)`: `(p·r, q·s)` for `a: (p, q)`, `b: (r, s)`.
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    let (r, s) = b.dims2()?;
    let k = a
        .reshape((p, 1, q, 1))?
        .broadcast_mul(&b.reshape((1, r, 1, s))?)?;
    Ok(k.reshape((p * r, q * s))?)
}

/// Where a module's output rows land in a layer's weight: rows `[offset, offset + rows)` of the
/// weight, in the order the adapter sees it (`swap_halves`: diffusers' `norm_out` orders the
/// final adaLN (scale, shift), BFL (shift, scale)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// First row.
    pub offset: usize,
    /// How many rows.
    pub rows: usize,
    /// The adapter's weight is the layer's with its two row halves swapped.
    pub swap_halves: bool,
}

/// One module patching one layer.
#[derive(Debug, Clone, Copy)]
pub struct Patch<'a> {
    /// The module.
    pub module: &'a AdapterModule,
    /// Its rows in the layer.
    pub place: Placement,
    /// The format's scale `s`.
    pub scale: f32,
    /// The user's strength `m`.
    pub strength: f32,
}

/// `t` with its two halves along dim 0 swapped.
fn swap_halves(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(0)?;
    let h = n / 2;
    Ok(Tensor::cat(
        &[t.narrow(0, h, n - h)?, t.narrow(0, 0, h)?],
        0,
    )?)
}

/// `t` with rows `[offset, offset + sub.rows)` replaced by `sub` (any rank; along dim 0).
fn put_rows(t: &Tensor, offset: usize, sub: &Tensor) -> Result<Tensor> {
    let (n, k) = (t.dim(0)?, sub.dim(0)?);
    let mut parts = vec![];
    if offset > 0 {
        parts.push(t.narrow(0, 0, offset)?);
    }
    parts.push(sub.clone());
    if offset + k < n {
        parts.push(t.narrow(0, offset + k, n - offset - k)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// `w` `(rows, in)` zero-padded to `inp` columns.
fn pad_cols(w: &Tensor, inp: usize) -> Result<Tensor> {
    let (r, c) = w.dims2()?;
    if c >= inp {
        return Ok(w.clone());
    }
    let z = Tensor::zeros((r, inp - c), w.dtype(), w.device())?;
    Ok(Tensor::cat(&[w, &z], 1)?)
}

impl Patch<'_> {
    fn check(&self, out: usize) -> Result<()> {
        let p = self.place;
        let m = self.module;
        let bad = |expected: Vec<usize>, got: Vec<usize>| -> Error {
            LoadError::TensorShape {
                name: m.stem.clone(),
                expected,
                got,
            }
            .into()
        };
        if p.offset + p.rows > out {
            return Err(bad(vec![out], vec![p.offset + p.rows]));
        }
        if let Some((o, _)) = m.delta_dims()? {
            if o != p.rows {
                return Err(bad(vec![p.rows, usize::MAX], vec![o, usize::MAX]));
            }
        }
        if let Some(n) = m.bias_len() {
            if n != p.rows {
                return Err(bad(vec![p.rows], vec![n]));
            }
        }
        Ok(())
    }

    /// The patched `(w, b)` (f32; `w: (out, in)`), in the adapter's row order and slice.
    fn apply(&self, w: Tensor, b: Option<Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let (out, _) = w.dims2()?;
        self.check(out)?;
        let Placement {
            offset,
            rows,
            swap_halves: swap,
        } = self.place;
        let m = self.strength as f64;
        let ms = m * self.scale as f64;
        let (mut w, mut b) = if swap {
            (swap_halves(&w)?, b.map(|b| swap_halves(&b)).transpose()?)
        } else {
            (w, b)
        };
        if let Some(d) = self.module.delta()? {
            let din = d.dim(1)?;
            if din > w.dim(1)? {
                w = pad_cols(&w, din)?;
            }
            let d = pad_cols(&d, w.dim(1)?)?;
            let sub = w.narrow(0, offset, rows)?;
            let new = match &self.module.dora_scale {
                None => (&sub + (d * ms)?)?,
                Some(ds) => {
                    let wc = (&sub + (d * self.scale as f64)?)?;
                    let eps = f32::EPSILON as f64;
                    let wc = if ds.dims() == [rows, 1] {
                        // per output row, of the weight before the change (as ComfyUI codes it)
                        let n = (sub.sqr()?.sum_keepdim(1)?.sqrt()? + eps)?;
                        wc.broadcast_mul(&ds.broadcast_div(&n)?)?
                    } else if ds.dims() == [1, wc.dim(1)?] || ds.dims() == [wc.dim(1)?] {
                        let n = (wc.sqr()?.sum_keepdim(0)?.sqrt()? + eps)?;
                        wc.broadcast_mul(&ds.reshape((1, ()))?.broadcast_div(&n)?)?
                    } else {
                        return Err(LoadError::TensorShape {
                            name: format!("{}.dora_scale", self.module.stem),
                            expected: vec![1, wc.dim(1)?],
                            got: ds.dims().to_vec(),
                        }
                        .into());
                    };
                    (&sub + ((wc - &sub)? * m)?)?
                }
            };
            w = put_rows(&w, offset, &new)?;
        }
        if let Some(db) = self.module.bias_delta() {
            let db = db.flatten_all()?;
            let base = match b {
                Some(b) => b,
                None => Tensor::zeros(out, DType::F32, w.device())?,
            };
            let sub = (base.narrow(0, offset, rows)? + (db * ms)?)?;
            b = Some(put_rows(&base, offset, &sub)?);
        }
        if swap {
            w = swap_halves(&w)?;
            b = b.map(|b| swap_halves(&b)).transpose()?;
        }
        Ok((w, b))
    }
}

/// The change `patches` make to `linear` (whose weight is as loaded, input padded to `wide`):
/// plain LoRAs as stacked low-rank factors `U·D` (each up factor scaled by strength × scale
/// and placed at its rows, zeros elsewhere), the rest (LoKr, LoHa, diffs, DoRA) as one dense
/// difference computed against the decoded weight (all of them when a DoRA module is among
/// them, since it rescales what comes before it), and the bias change.
fn delta_of(linear: &Linear, patches: &[Patch], wide: usize) -> Result<RuntimeDelta> {
    let (_, out) = linear.dims();
    let (mut downs, mut ups) = (vec![], vec![]);
    let mut rest = vec![];
    let mut bias: Option<Tensor> = None;
    let mut add_bias = |v: Tensor| -> Result<()> {
        bias = Some(match bias.take() {
            Some(b) => (b + v)?,
            None => v,
        });
        Ok(())
    };
    let ordered = patches.iter().any(|p| p.module.dora_scale.is_some());
    for p in patches {
        let Some((down, up)) = p.module.low_rank().filter(|_| !ordered) else {
            rest.push(*p);
            continue;
        };
        let r = down.dim(0)?;
        let ms = p.strength as f64 * p.scale as f64;
        let zeros = Tensor::zeros((out, r), DType::F32, &Device::Cpu)?;
        let mut full = put_rows(&zeros, p.place.offset, &(up * ms)?)?;
        if p.place.swap_halves {
            full = swap_halves(&full)?;
        }
        downs.push(pad_cols(down, wide)?);
        ups.push(full);
        if let Some(db) = p.module.bias_delta() {
            let zeros = Tensor::zeros(out, DType::F32, &Device::Cpu)?;
            let mut v = put_rows(&zeros, p.place.offset, &(db.flatten_all()? * ms)?)?;
            if p.place.swap_halves {
                v = swap_halves(&v)?;
            }
            add_bias(v)?;
        }
    }
    let mut dense = None;
    if !rest.is_empty() {
        let w0 = linear
            .weight()?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let w0 = pad_cols(&w0, wide)?;
        let zero_b = Tensor::zeros(out, DType::F32, &Device::Cpu)?;
        let (mut w, mut b) = (w0.clone(), Some(zero_b));
        for p in &rest {
            (w, b) = p.apply(w, b)?;
        }
        dense = Some((w - w0)?);
        add_bias(b.expect("started as zeros"))?;
    }
    Ok(RuntimeDelta {
        down: (!downs.is_empty())
            .then(|| Tensor::cat(&downs, 0))
            .transpose()?,
        up: (!ups.is_empty())
            .then(|| Tensor::cat(&ups, D::Minus1))
            .transpose()?,
        dense,
        bias,
    })
}

/// Checks `patches` against `linear` (as loaded) and returns the input width they need (a
/// module wider than the layer: a control LoRA's `img_in`).
fn width_for(linear: &Linear, patches: &[Patch]) -> Result<usize> {
    let (inp, out) = linear.dims();
    let mut wide = inp;
    for p in patches {
        p.check(out)?;
        if let Some((_, i)) = p.module.delta_dims()? {
            wide = wide.max(i);
        }
    }
    Ok(wide)
}

/// Merges `patches` (in order, in f32, one rounding to the storage dtype) into a dense `linear`,
/// from its weight as loaded (see [`Linear::merge_delta`]; `keep_original` keeps that weight
/// for [`Linear::restore`]); an empty list restores it.
pub fn merge_patches(linear: &mut Linear, patches: &[Patch], keep_original: bool) -> Result<()> {
    linear.restore();
    if patches.is_empty() {
        return Ok(());
    }
    if !linear.is_dense() {
        return Err(Error::InvalidArgument(format!(
            "cannot merge an adapter into a {} weight; apply it at run time",
            linear.encoding()
        )));
    }
    let wide = width_for(linear, patches)?;
    let delta = delta_of(linear, patches, wide)?;
    linear.merge_delta(&delta, keep_original)
}

/// Attaches `patches` to `linear` at run time: the same change as [`merge_patches`], kept as
/// factors beside the weight (`y = W·x + b + U·(D·x) + Δ·x + c`); the weight is untouched but
/// for a control LoRA's wider `img_in`, whose dense weight is first padded with zero columns.
/// Activations run in `dtype` on `device`.
pub fn runtime_patches(
    linear: &mut Linear,
    patches: &[Patch],
    dtype: DType,
    device: &Device,
) -> Result<()> {
    linear.restore();
    if patches.is_empty() {
        return Ok(());
    }
    let wide = width_for(linear, patches)?;
    linear.pad_inputs(wide, true)?;
    let delta = delta_of(linear, patches, wide)?;
    linear.set_runtime(Some(delta), dtype, device)
}

/// Where a module lands in a model.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A linear layer (the model's name for it) and the rows the module covers.
    Linear(String, Placement),
    /// A tensor replaced as a whole (a BFL control LoRA's QK-norm scales), by the model's key.
    Replace(String),
}

/// A model's layers as adapter files name them: every alias of every layer, looked up after
/// the trainers' prefixes are stripped and with `_` for `.` (kohya writes
/// `double_blocks_0_img_attn_qkv` for `double_blocks.0.img_attn.qkv`).
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    aliases: HashMap<String, Target>,
    /// layer → `(out, in)`.
    linears: HashMap<String, (usize, usize)>,
    /// replaceable tensor → shape.
    replaceable: HashMap<String, Vec<usize>>,
    prefixes: Vec<&'static str>,
    /// The layer a module may be wider than (its input grows: `img_in`).
    widenable: Option<String>,
}

fn normalise(name: &str) -> String {
    name.replace('.', "_")
}

impl KeyMap {
    /// An empty map stripping `prefixes` (repeatedly, in any order) from module stems.
    pub fn new(prefixes: &[&'static str]) -> Self {
        KeyMap {
            prefixes: prefixes.to_vec(),
            ..Default::default()
        }
    }

    /// Declares linear layer `name` of `(out, in)` (under its own name too).
    pub fn linear(&mut self, name: &str, out: usize, inp: usize) -> &mut Self {
        self.linears.insert(name.to_string(), (out, inp));
        let whole = Placement {
            offset: 0,
            rows: out,
            swap_halves: false,
        };
        self.alias(name, Target::Linear(name.to_string(), whole))
    }

    /// Declares a tensor that a module may replace (under its own key too).
    pub fn replaceable(&mut self, key: &str, shape: &[usize]) -> &mut Self {
        self.replaceable.insert(key.to_string(), shape.to_vec());
        self.alias(key, Target::Replace(key.to_string()))
    }

    /// Another name for a target.
    pub fn alias(&mut self, name: &str, target: Target) -> &mut Self {
        self.aliases.insert(normalise(name), target);
        self
    }

    /// Allows modules wider than `layer`'s input (its weight is zero-padded).
    pub fn widenable(&mut self, layer: &str) -> &mut Self {
        self.widenable = Some(layer.to_string());
        self
    }

    /// `stem` without the trainers' prefixes.
    pub fn strip<'s>(&self, stem: &'s str) -> &'s str {
        let mut s = stem;
        while let Some(p) = self.prefixes.iter().find(|p| s.starts_with(*p)) {
            s = &s[p.len()..];
        }
        s
    }

    /// The target of module `m`, if any.
    pub fn target(&self, m: &AdapterModule) -> Option<&Target> {
        let key = normalise(self.strip(&m.stem));
        match &m.kind {
            AdapterKind::Replace { param, .. } => self
                .aliases
                .get(&format!("{key}_{param}"))
                .filter(|t| matches!(t, Target::Replace(_))),
            _ => self
                .aliases
                .get(&key)
                .filter(|t| matches!(t, Target::Linear(..))),
        }
    }

    /// Whether the map has no layers.
    pub fn is_empty(&self) -> bool {
        self.linears.is_empty()
    }
}

/// What one file does to a model: patches per layer, replacements, and the stems (of modules
/// the model claims) that match nothing.
#[derive(Debug, Default)]
pub struct FilePlan<'a> {
    /// `(layer, patch)`, in the file's order.
    pub patches: Vec<(String, Patch<'a>)>,
    /// `(key, value)`.
    pub replacements: Vec<(String, &'a Tensor)>,
    /// Stems that match no layer.
    pub unmatched: Vec<String>,
}

/// Places every module of `file` that `claims` (by stem) on `map`'s model with `strength`,
/// checking each against its layer's shape (a module wider than the layer only on the
/// widenable one). Modules not claimed are left to other models (the text encoders').
pub fn plan_file<'a>(
    file: &'a AdapterFile,
    strength: f32,
    map: &KeyMap,
    claims: impl Fn(&str) -> bool,
) -> Result<FilePlan<'a>> {
    if !strength.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "{}: strength {strength} is not a finite number",
            file.path().display()
        )));
    }
    let mut plan = FilePlan::default();
    for m in file.modules().iter().filter(|m| claims(&m.stem)) {
        match (map.target(m), &m.kind) {
            (Some(Target::Linear(layer, place)), _) => {
                let (out, inp) = map.linears[layer];
                let patch = Patch {
                    module: m,
                    place: *place,
                    scale: file.scale_of(m)?,
                    strength,
                };
                patch.check(out)?;
                if let Some((o, i)) = m.delta_dims()? {
                    // only the widenable layer may differ: wider (a control LoRA's img_in,
                    // at most 8× its input) or narrower (a regular LoRA on a widened model)
                    let widenable = map.widenable.as_deref() == Some(layer.as_str());
                    if i != inp && !(widenable && i <= 8 * inp) {
                        return Err(LoadError::TensorShape {
                            name: format!("{} (on {layer})", m.stem),
                            expected: vec![place.rows, inp],
                            got: vec![o, i],
                        }
                        .into());
                    }
                }
                plan.patches.push((layer.clone(), patch));
            }
            (Some(Target::Replace(key)), AdapterKind::Replace { value, .. }) => {
                let want = &map.replaceable[key];
                if value.dims() != want.as_slice() {
                    return Err(LoadError::TensorShape {
                        name: m.stem.clone(),
                        expected: want.clone(),
                        got: value.dims().to_vec(),
                    }
                    .into());
                }
                plan.replacements.push((key.clone(), value));
            }
            _ => plan.unmatched.push(m.stem.clone()),
        }
    }
    Ok(plan)
}

/// Prefixes of CLIP-L modules in adapter files (kohya, ComfyUI, diffusers): the text encoder's
/// key map places them, the transformer's leaves them.
pub const CLIP_PREFIXES: &[&str] = &[
    "lora_te1_",
    "lora_te_",
    "text_encoder.",
    "text_encoders.clip_l.transformer.",
];

/// Prefixes of T5 modules in adapter files (sd-scripts' `lora_te2_`/`lora_te3_`, ComfyUI's
/// `text_encoders.t5xxl.`), which no model here applies yet.
pub const T5_PREFIXES: &[&str] = &[
    "lora_te2_",
    "lora_te3_",
    "text_encoder_2.",
    "text_encoders.t5xxl.",
];

/// How adapters are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Merged into dense weights, at run time on packed (GGUF, fp8) ones. The default.
    #[default]
    Auto,
    /// Merged everywhere (an error on packed weights).
    Merge,
    /// At run time everywhere (cheap switching; the weights are never touched).
    Runtime,
}

/// Options of applying adapters to a model (`flux_dit::Flux::apply_loras`,
/// `flux_text::ClipTextModel::apply_loras`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraOptions {
    /// Modules that map to no layer of the model are counted and skipped instead of failing.
    pub lenient: bool,
    /// Merged or at run time.
    pub mode: LoraMode,
    /// Keep each merged layer's weight as loaded, so that removing the adapters (or applying
    /// others) can restore it bit for bit (the merged layers' weights are held
    /// twice meanwhile). `false` merges for good, in no extra memory: for a model that is
    /// dropped after use (the CLI). Run-time adapters never touch the weights. Default `true`.
    pub reversible: bool,
}

impl Default for LoraOptions {
    fn default() -> Self {
        LoraOptions {
            lenient: false,
            mode: LoraMode::Auto,
            reversible: true,
        }
    }
}

/// Attaches each layer's patches (by the layer's name) per `opts.mode`: merged into dense
/// weights, at run time on packed ones (`Auto`); activations in `dtype` on `device`. Returns
/// whether anything was merged for good (`opts.reversible` off).
pub fn attach(
    layers: Vec<(String, &mut Linear)>,
    patches: &HashMap<String, Vec<Patch>>,
    opts: &LoraOptions,
    dtype: DType,
    device: &Device,
) -> Result<bool> {
    let mut for_good = false;
    for (name, lin) in layers {
        let Some(p) = patches.get(&name) else {
            continue;
        };
        let runtime = match opts.mode {
            LoraMode::Auto => !lin.is_dense(),
            LoraMode::Merge => false,
            LoraMode::Runtime => true,
        };
        if runtime {
            runtime_patches(lin, p, dtype, device)?;
        } else {
            merge_patches(lin, p, opts.reversible)?;
            for_good |= !opts.reversible;
        }
    }
    Ok(for_good)
}
