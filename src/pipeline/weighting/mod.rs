//! Prompt weighting and prompts longer than the text encoder's 77 positions.
//!
//! Two syntaxes, each with the long-prompt handling of the tool it comes from:
//! - [`PromptWeighting::A1111`]: the AUTOMATIC1111 web UI (`(word:1.3)`, `(word)`, `[word]`,
//!   `BREAK`), 75-token chunks each encoded on its own ([`a1111`]); Runware's `sdEmbeds`.
//! - [`PromptWeighting::Compel`]: the `compel` library (`word++`, `(words)1.2`, `.blend()`,
//!   `.and()`), with `truncate_long_prompts=False` ([`compel_syntax`], [`compel`]).
//!
//! [`PromptWeighting::None`] leaves prompts to [`super::conditioning`]'s plain encoding
//! (diffusers: no syntax, truncation at 75 tokens).
//!
//! Either way the prompt and negative prompt embeddings end up with the same number of
//! 77-token chunks (the shorter one padded with the empty prompt's embedding, as both tools
//! do), so the UNet's cross-attention reads `77 * k` tokens for both halves of the CFG batch.
//! `clip_skip` applies to both prompts, as both tools apply it.

pub mod a1111;
pub mod compel;
pub mod compel_syntax;

use candle_core::{Device, Tensor, D};
use serde::Deserialize;

use super::conditioning::{EmbeddingLayer, PromptEmbeddings, TextEncoder};
use crate::{Error, Result};

/// Which prompt syntax a request's prompts are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptWeighting {
    /// No syntax: the prompt is text, truncated to 75 tokens (diffusers).
    #[default]
    None,
    /// AUTOMATIC1111's attention syntax and 75-token chunks.
    A1111,
    /// compel's syntax, long prompts in chunks.
    Compel,
}

impl PromptWeighting {
    /// Checks that a prompt parses in this syntax, so a bad one is refused before it is queued.
    pub fn check_prompt(self, prompt: &str) -> Result<()> {
        match self {
            Self::None => Ok(()),
            Self::A1111 => a1111::parse(prompt).map(drop),
            Self::Compel => compel_syntax::parse(prompt).map(drop),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::A1111 => "a1111",
            Self::Compel => "compel",
        }
    }
}

/// The text encoders of a model and which of their layers the embeddings come from.
pub struct Encoders<'a> {
    /// One encoder (SD 1.x/2.x) or two (SDXL: their states concatenated on the last axis, the
    /// pooled embedding from the second).
    pub encoders: Vec<&'a TextEncoder>,
    pub layer: EmbeddingLayer,
    pub device: &'a Device,
}

impl Encoders<'_> {
    fn pooled(&self) -> bool {
        self.encoders.len() > 1
    }

    /// One encoder's embedding of a padded chunk of ids `[1, S, D]`, and its pooled output
    /// (projected where the encoder has a projection). `key_mask` hides positions from attention
    /// (transformers' `attention_mask`).
    pub(crate) fn encode_ids(
        &self,
        encoder: &TextEncoder,
        ids: &[u32],
        key_mask: Option<&[bool]>,
    ) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::from_slice(ids, (1, ids.len()), self.device)?;
        let out = encoder.model.forward_masked(&ids, key_mask)?;
        let hidden = self.layer.select(&encoder.model, &out)?;
        Ok((hidden, out.text_embeds.unwrap_or(out.pooled)))
    }

    /// The ids of the empty prompt: start, end, pad.
    pub(crate) fn empty_ids(encoder: &TextEncoder) -> Vec<u32> {
        let t = &encoder.tokenizer;
        let mut ids = vec![t.bos_id(), t.eos_id()];
        ids.resize(t.max_len(), t.pad_id());
        ids
    }

    /// The empty prompt's embeddings (one chunk), which both syntaxes pad with.
    pub fn empty(&self) -> Result<PromptEmbeddings> {
        let mut states = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for encoder in &self.encoders {
            let (hidden, p) = self.encode_ids(encoder, &Self::empty_ids(encoder), None)?;
            states.push(hidden);
            pooled = Some(p);
        }
        Ok(PromptEmbeddings {
            hidden: Tensor::cat(&states, D::Minus1)?,
            pooled: pooled.filter(|_| self.pooled()),
        })
    }

    /// One prompt's embeddings in `syntax` (not `None`).
    pub fn encode(&self, syntax: PromptWeighting, prompt: &str) -> Result<PromptEmbeddings> {
        match syntax {
            PromptWeighting::A1111 => self.encode_a1111(prompt),
            PromptWeighting::Compel => compel::encode(self, prompt),
            PromptWeighting::None => Err(Error::invalid(
                "plain prompts are encoded by conditioning::encode_single/encode_dual",
            )),
        }
    }

    /// A1111: each encoder's chunks, emphasised and concatenated; SDXL's pooled embedding is
    /// the second encoder's on the first chunk.
    fn encode_a1111(&self, prompt: &str) -> Result<PromptEmbeddings> {
        let pieces = a1111::parse(prompt)?;
        let mut per_encoder = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for encoder in &self.encoders {
            let chunks = a1111::chunks(&encoder.tokenizer, &pieces)?;
            let mut states = Vec::with_capacity(chunks.len());
            for (i, chunk) in chunks.iter().enumerate() {
                let (z, p) = self.encode_ids(encoder, &chunk.ids, None)?;
                states.push(a1111::emphasize(&z, &chunk.multipliers)?);
                if i == 0 {
                    pooled = Some(p);
                }
            }
            per_encoder.push(Tensor::cat(&states, 1)?);
        }
        Ok(PromptEmbeddings {
            hidden: self.concat_encoders(per_encoder)?,
            pooled: pooled.filter(|_| self.pooled()),
        })
    }

    /// The encoders' states side by side on the last axis; a shorter one (its tokenizer split
    /// the prompt differently) is padded with its empty-prompt embedding, as compel's SDXL
    /// wrapper does.
    pub(crate) fn concat_encoders(&self, states: Vec<Tensor>) -> Result<Tensor> {
        let longest = states
            .iter()
            .map(|s| s.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let longest = longest.into_iter().max().unwrap_or(0);
        let mut padded = Vec::with_capacity(states.len());
        for (state, encoder) in states.into_iter().zip(&self.encoders) {
            if state.dim(1)? < longest {
                let (empty, _) = self.encode_ids(encoder, &Self::empty_ids(encoder), None)?;
                padded.push(pad_with(&state, &empty, longest)?);
            } else {
                padded.push(state);
            }
        }
        Ok(Tensor::cat(&padded, D::Minus1)?)
    }
}

/// `state` `[1, L, D]` followed by copies of `empty` `[1, 77, D]` up to `len` positions.
pub(crate) fn pad_with(state: &Tensor, empty: &Tensor, len: usize) -> Result<Tensor> {
    let have = state.dim(1)?;
    let chunk = empty.dim(1)?;
    if have >= len {
        return Ok(state.clone());
    }
    if !(len - have).is_multiple_of(chunk) {
        return Err(Error::invalid(format!(
            "cannot pad {have} prompt positions to {len} with chunks of {chunk}"
        )));
    }
    let mut parts = vec![state.clone()];
    parts.extend(std::iter::repeat_n(empty.clone(), (len - have) / chunk));
    Ok(Tensor::cat(&parts, 1)?)
}

/// Brings prompt and negative prompt embeddings to the same length with empty-prompt chunks.
pub fn pad_pair(
    cond: PromptEmbeddings,
    uncond: PromptEmbeddings,
    empty: &PromptEmbeddings,
) -> Result<(PromptEmbeddings, PromptEmbeddings)> {
    let len = cond.hidden.dim(1)?.max(uncond.hidden.dim(1)?);
    let pad = |e: PromptEmbeddings| -> Result<PromptEmbeddings> {
        Ok(PromptEmbeddings {
            hidden: pad_with(&e.hidden, &empty.hidden, len)?,
            pooled: e.pooled,
        })
    };
    Ok((pad(cond)?, pad(uncond)?))
}
