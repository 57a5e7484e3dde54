//! The CLIP and T5 tokenizers with FLUX's exact padding and truncation, as diffusers calls
//! transformers' tokenizers (`padding="max_length"`, `truncation=True`).
//!
//! - CLIP: `<|startoftext|>` 49406 + tokens + `<|endoftext|>` 49407, at most 75 content tokens,
//!   padded to 77 with 49407.
//! - T5: tokens + `</s>` 1, at most `max_len − 1` content tokens, padded to `max_len` (512 for
//!   dev, 256 for schnell) with `<pad>` 0.
//!
//! Truncation is reported ([`Tokenized::truncated`]), never silent.
//!
//! T5 `tokenizer.json` files come in two forms: the original one (as the FLUX repos ship it) and
//! the one transformers writes after loading it. transformers rewrites the original pipeline on
//! load (normalizer: the Precompiled map alone; pre-tokenizer: whitespace split, then Metaspace
//! with "always" prepend), which changes ids for trailing whitespace, whitespace-only prompts
//! and text before `</s>`. diffusers users get transformers' behaviour, so this crate applies the
//! same rewrite to the original form: both forms give transformers' ids.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Token ids of one prompt, padded to the tokenizer's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Exactly `max_len` ids.
    pub ids: Vec<u32>,
    /// Content tokens kept (without the special tokens).
    pub kept: usize,
    /// Content tokens cut by truncation (0 when the prompt fit). When `unread_bytes > 0` this
    /// counts only the tokens of the part that was read.
    pub truncated: usize,
    /// Bytes at the end of a very long prompt that were never tokenised: their tokens could
    /// not be kept anyway (see [`ClipTokenizer::encode`]). 0 for prompts of ordinary length.
    pub unread_bytes: usize,
}

/// Tokenizer files are read up to this size (T5's tokenizer.json is 2.4 MB, CLIP's vocab 1 MB).
const MAX_TOKENIZER_FILE: u64 = 64 << 20;

fn read(path: &Path) -> Result<String> {
    flux_kernels::read_text(path, MAX_TOKENIZER_FILE).map_err(|e| Error::TokenizerFile {
        path: path.to_path_buf(),
        reason: match e {
            flux_kernels::LoadError::File { reason, .. } => reason,
            e => e.to_string(),
        },
    })
}

fn parse(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::TokenizerFile {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

fn build(path: &Path, json: &Value) -> Result<Tokenizer> {
    Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| Error::TokenizerFile {
        path: path.to_path_buf(),
        reason: format!("not a tokenizer: {e}"),
    })
}

fn content_ids(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    // Special-token text in the prompt ("<|endoftext|>", "</s>") still maps to its id, as in
    // transformers; only the template's own specials are added below.
    let enc = tok
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// Prompts up to this many bytes are tokenised whole (exact truncation counts).
const MIN_READ: usize = 64 << 10;
/// Bytes of a longer prompt read per token that can be kept, at first.
const BYTES_PER_TOKEN: usize = 16;

/// Content tokens of `text`, and the bytes left unread. A prompt longer than [`MIN_READ`] is
/// tokenised only up to a prefix that already gives more than `room` tokens (doubled until it
/// does), so a 100 MB prompt costs what 64 KiB do. Both tokenizers split words at whitespace
/// before anything else, so a prefix cut at whitespace gives exactly the whole text's first
/// tokens; only a single "word" longer than the prefix is cut inside.
fn bounded_content_ids(tok: &Tokenizer, text: &str, room: usize) -> Result<(Vec<u32>, usize)> {
    let mut limit = (room + 1).saturating_mul(BYTES_PER_TOKEN).max(MIN_READ);
    loop {
        if text.len() <= limit {
            return Ok((content_ids(tok, text)?, 0));
        }
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let cut = text[..end]
            .rfind(char::is_whitespace)
            .filter(|&c| c > 0)
            .unwrap_or(end);
        let ids = content_ids(tok, &text[..cut])?;
        if ids.len() > room {
            return Ok((ids, text.len() - cut));
        }
        limit = limit.saturating_mul(2);
    }
}

fn encode_bounded(
    tok: &Tokenizer,
    text: &str,
    max_len: usize,
    bos: Option<u32>,
    eos: u32,
    pad: u32,
) -> Result<Tokenized> {
    let room = max_len - 1 - bos.is_some() as usize;
    let (ids, unread) = bounded_content_ids(tok, text, room)?;
    let mut t = assemble(ids, max_len, bos, eos, pad);
    t.unread_bytes = unread;
    Ok(t)
}

fn assemble(content: Vec<u32>, max_len: usize, bos: Option<u32>, eos: u32, pad: u32) -> Tokenized {
    let room = max_len - 1 - bos.is_some() as usize;
    let kept = content.len().min(room);
    let mut ids = Vec::with_capacity(max_len);
    ids.extend(bos);
    ids.extend_from_slice(&content[..kept]);
    ids.push(eos);
    ids.resize(max_len, pad);
    Tokenized {
        ids,
        kept,
        truncated: content.len() - kept,
        unread_bytes: 0,
    }
}

/// CLIP's byte-level BPE tokenizer (ViT-L/14).
#[derive(Clone)]
pub struct ClipTokenizer {
    tok: Tokenizer,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// CLIP's start, end (and pad) ids.
pub const CLIP_BOS: u32 = 49406;
/// CLIP's end-of-text id, also its padding.
pub const CLIP_EOS: u32 = 49407;
/// CLIP's context length (its position embeddings).
pub const CLIP_MAX_LEN: usize = 77;

impl ClipTokenizer {
    /// From a `tokenizer.json` (as transformers saves `CLIPTokenizer`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = parse(path, &read(path)?)?;
        Ok(ClipTokenizer {
            tok: build(path, &json)?,
            max_len: CLIP_MAX_LEN,
        })
    }

    /// From `vocab.json` and `merges.txt` (the FLUX repos' `tokenizer/` folder), with CLIP's
    /// pipeline: NFC, whitespace runs to one space, lower-case; CLIP's split pattern; byte-level
    /// BPE with `</w>` word ends.
    pub fn from_vocab_merges(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        let (vp, mp) = (vocab.as_ref(), merges.as_ref());
        let vocab = parse(vp, &read(vp)?)?;
        if !vocab.is_object() {
            return Err(Error::TokenizerFile {
                path: vp.to_path_buf(),
                reason: "expected a JSON object of token → id".into(),
            });
        }
        let merges: Vec<String> = read(mp)?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        if merges.iter().any(|m| m.split(' ').count() != 2) {
            return Err(Error::TokenizerFile {
                path: mp.to_path_buf(),
                reason: "every merge line must hold two space-separated symbols".into(),
            });
        }
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        };
        let json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(CLIP_BOS, "<|startoftext|>"), special(CLIP_EOS, "<|endoftext|>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex":
                    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
                 "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        Ok(ClipTokenizer {
            tok: build(vp, &json)?,
            max_len: CLIP_MAX_LEN,
        })
    }

    /// From a `tokenizer/` folder: its `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(json);
        }
        let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if v.is_file() && m.is_file() {
            return Self::from_vocab_merges(v, m);
        }
        Err(Error::TokenizerFile {
            path: dir.to_path_buf(),
            reason: "neither tokenizer.json nor vocab.json + merges.txt is here".into(),
        })
    }

    /// The tokenizer as `tokenizer.json` text (e.g. to save a `vocab.json` + `merges.txt`
    /// tokenizer in the single-file form).
    pub fn to_json(&self) -> Result<String> {
        self.tok
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Another padded length (2..=77; FLUX uses 77).
    pub fn with_max_len(mut self, max_len: usize) -> Result<Self> {
        if !(2..=CLIP_MAX_LEN).contains(&max_len) {
            return Err(Error::InvalidMaxLength {
                what: "CLIP",
                got: max_len,
                min: 2,
                max: CLIP_MAX_LEN,
            });
        }
        self.max_len = max_len;
        Ok(self)
    }

    /// The padded length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `[BOS] + tokens + [EOS]`, truncated to fit and padded with EOS. A prompt far longer
    /// than the tokens that can be kept is tokenised only as far as needed
    /// ([`Tokenized::unread_bytes`]); the ids are the same as for the whole text.
    pub fn encode(&self, prompt: &str) -> Result<Tokenized> {
        encode_bounded(
            &self.tok,
            prompt,
            self.max_len,
            Some(CLIP_BOS),
            CLIP_EOS,
            CLIP_EOS,
        )
    }
}

/// T5 v1.1's SentencePiece-unigram tokenizer.
#[derive(Clone)]
pub struct T5Tokenizer {
    tok: Tokenizer,
    max_len: usize,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// T5's end-of-sequence id.
pub const T5_EOS: u32 = 1;
/// T5's padding id.
pub const T5_PAD: u32 = 0;

/// Rewrites an original-form T5 pipeline the way transformers does on load (see the module doc).
/// Returns whether anything changed.
fn transformers_t5_pipeline(json: &mut Value) -> bool {
    let mut changed = false;
    if json["normalizer"]["type"] == "Sequence" {
        let precompiled = json["normalizer"]["normalizers"]
            .as_array()
            .and_then(|v| v.iter().find(|n| n["type"] == "Precompiled").cloned());
        if let Some(p) = precompiled {
            json["normalizer"] = p;
            changed = true;
        }
    }
    if json["pre_tokenizer"]["type"] == "Metaspace" {
        let replacement = json["pre_tokenizer"]["replacement"].clone();
        json["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": replacement, "prepend_scheme": "always", "split": true}]});
        changed = true;
    }
    changed
}

impl T5Tokenizer {
    /// From a `tokenizer.json` of either form (see the module doc), padded to `max_len`.
    pub fn from_file(path: impl AsRef<Path>, max_len: usize) -> Result<Self> {
        let path = path.as_ref();
        let mut json = parse(path, &read(path)?)?;
        if json["model"]["type"] != "Unigram" {
            return Err(Error::TokenizerFile {
                path: path.to_path_buf(),
                reason: format!(
                    "expected a Unigram (SentencePiece) model, found {}",
                    json["model"]["type"]
                ),
            });
        }
        transformers_t5_pipeline(&mut json);
        Self::with_tokenizer(build(path, &json)?, max_len)
    }

    /// From a `tokenizer_2/` folder holding `tokenizer.json`. A folder with only `spiece.model`
    /// is not supported (the `tokenizers` crate cannot read SentencePiece protobufs): convert it
    /// once with transformers (`T5TokenizerFast.from_pretrained(dir).save_pretrained(dir)`).
    pub fn from_dir(dir: impl AsRef<Path>, max_len: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(json, max_len);
        }
        let reason = if dir.join("spiece.model").is_file() {
            "only spiece.model is here; a tokenizer.json is needed (save one with transformers' T5TokenizerFast)"
        } else {
            "no tokenizer.json here"
        };
        Err(Error::TokenizerFile {
            path: dir.to_path_buf(),
            reason: reason.into(),
        })
    }

    fn with_tokenizer(tok: Tokenizer, max_len: usize) -> Result<Self> {
        if max_len < 1 {
            return Err(Error::InvalidMaxLength {
                what: "T5",
                got: max_len,
                min: 1,
                max: usize::MAX,
            });
        }
        Ok(T5Tokenizer { tok, max_len })
    }

    /// The padded length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `tokens + [</s>]`, truncated to fit and padded with `<pad>`; very long prompts are read
    /// only as far as needed, as in [`ClipTokenizer::encode`].
    pub fn encode(&self, prompt: &str) -> Result<Tokenized> {
        encode_bounded(&self.tok, prompt, self.max_len, None, T5_EOS, T5_PAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_truncates_and_reports() {
        let t = assemble(vec![1, 2], 4, None, 9, 0);
        assert_eq!(t.unread_bytes, 0);
        let t = assemble((10..20).collect(), 6, Some(100), 101, 0);
        assert_eq!(t.ids, vec![100, 10, 11, 12, 13, 101]);
        assert_eq!((t.kept, t.truncated), (4, 6));
        let t = assemble(vec![5], 4, None, 1, 0);
        assert_eq!(t.ids, vec![5, 1, 0, 0]);
        assert_eq!(t.truncated, 0);
    }
}
