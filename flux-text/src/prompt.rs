//! Prompt → (T5 states, CLIP pooled vector), as FLUX feeds the transformer.

use candle::{Device, Tensor};

use crate::clip::ClipTextModel;
use crate::t5::T5Encoder;
use crate::tokenizer::{ClipTokenizer, T5Tokenizer, Tokenized};
use crate::{Error, Result};

/// What [`PromptEncoder::encode`] returns.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// T5 last hidden state `(B, L_txt, d_model)`: the transformer's `txt`.
    pub t5: Tensor,
    /// CLIP pooled output `(B, D)`: the transformer's `y`.
    pub pooled: Tensor,
    /// CLIP content tokens cut per prompt (warn when non-zero; 75 tokens fit).
    pub clip_truncated: Vec<usize>,
    /// T5 content tokens cut per prompt.
    pub t5_truncated: Vec<usize>,
    /// Bytes of each prompt never tokenised (very long prompts: their tokens could not be
    /// kept; the counts above then cover only the part read). 0 normally.
    pub unread_bytes: Vec<usize>,
}

/// Both tokenizers and both encoders. The encoders can be released after use
/// ([`PromptEncoder::unload`]) so that the transformer gets their memory; the tokenizers stay.
#[derive(Debug)]
pub struct PromptEncoder {
    clip_tok: ClipTokenizer,
    t5_tok: T5Tokenizer,
    clip: Option<ClipTextModel>,
    t5: Option<T5Encoder>,
    device: Device,
}

fn ids_tensor(rows: &[Tokenized], device: &Device) -> Result<Tensor> {
    let l = rows.first().map(|r| r.ids.len()).unwrap_or(0);
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.ids.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), l), device)?)
}

impl PromptEncoder {
    /// Bundles tokenizers and encoders; inputs are placed on `device`.
    pub fn new(
        clip_tok: ClipTokenizer,
        t5_tok: T5Tokenizer,
        clip: ClipTextModel,
        t5: T5Encoder,
        device: &Device,
    ) -> Self {
        PromptEncoder {
            clip_tok,
            t5_tok,
            clip: Some(clip),
            t5: Some(t5),
            device: device.clone(),
        }
    }

    /// Token ids of CLIP (77 per prompt) and T5 (`max_len` per prompt), with truncation counts.
    pub fn tokenize(
        &self,
        prompts: &[&str],
        prompts_2: Option<&[&str]>,
    ) -> Result<(Vec<Tokenized>, Vec<Tokenized>)> {
        let t5_prompts = prompts_2.unwrap_or(prompts);
        if t5_prompts.len() != prompts.len() {
            return Err(Error::InvalidIds(format!(
                "{} prompts for CLIP but {} for T5",
                prompts.len(),
                t5_prompts.len()
            )));
        }
        if prompts.is_empty() {
            return Err(Error::InvalidIds("no prompt given".into()));
        }
        let clip = prompts
            .iter()
            .map(|p| self.clip_tok.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let t5 = t5_prompts
            .iter()
            .map(|p| self.t5_tok.encode(p))
            .collect::<Result<Vec<_>>>()?;
        Ok((clip, t5))
    }

    /// Encodes a batch of prompts; `prompts_2`, when given, goes to T5 instead (diffusers'
    /// `prompt_2`).
    pub fn encode(&self, prompts: &[&str], prompts_2: Option<&[&str]>) -> Result<PromptEmbeds> {
        let (clip_ids, t5_ids) = self.tokenize(prompts, prompts_2)?;
        let clip = self.clip.as_ref().ok_or(Error::Unloaded("CLIP"))?;
        let t5 = self.t5.as_ref().ok_or(Error::Unloaded("T5"))?;
        let pooled = clip.forward(&ids_tensor(&clip_ids, &self.device)?)?.pooled;
        let states = t5.forward(&ids_tensor(&t5_ids, &self.device)?)?;
        Ok(PromptEmbeds {
            t5: states,
            pooled,
            clip_truncated: clip_ids.iter().map(|t| t.truncated).collect(),
            t5_truncated: t5_ids.iter().map(|t| t.truncated).collect(),
            unread_bytes: clip_ids
                .iter()
                .zip(&t5_ids)
                .map(|(c, t)| c.unread_bytes.max(t.unread_bytes))
                .collect(),
        })
    }

    /// Releases both encoders' weights (the tokenizers stay); later `encode` calls fail with
    /// [`Error::Unloaded`].
    pub fn unload(&mut self) {
        self.clip = None;
        self.t5 = None;
    }

    /// The CLIP model, while loaded (to change its LoRAs).
    pub fn clip_mut(&mut self) -> Option<&mut ClipTextModel> {
        self.clip.as_mut()
    }

    /// Whether the encoders are loaded.
    pub fn is_loaded(&self) -> bool {
        self.clip.is_some() && self.t5.is_some()
    }
}
