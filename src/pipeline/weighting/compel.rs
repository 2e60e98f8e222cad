//! compel's embedding algorithm (compel 2.x `EmbeddingsProvider`, with
//! `truncate_long_prompts=False`, `DownweightMode.MASK` and `SplitLongTextMode.SENTENCES`),
//! run on each text encoder on its own, as compel's SDXL wrapper runs one `Compel` per encoder.
//!
//! - Tokens weighted above or below 1 are moved away from (towards) the empty prompt's
//!   embedding: `empty + (z - empty) * w`; tokens of weight 1 keep `z` exactly.
//! - A fragment below 1 is also faded out: the prompt is encoded again with the fragment hidden
//!   from attention, and the two encodings are averaged with weights 1 and
//!   `tan((1 - w) * pi / 2)` (normalised).
//! - Long prompts are cut into 75-token chunks, at the last `.` of a chunk, else the last
//!   `.`/`,`/`;`/`:`, else the last word end; each chunk is encoded on its own.
//! - `.blend()` averages its prompts' embeddings; `.and()` concatenates them on the sequence
//!   axis, each pulled towards the empty prompt by its weight.

use std::f64::consts::FRAC_PI_2;

use candle_core::{DType, Tensor};

use super::compel_syntax::{self, Fragment, Part};
use super::{pad_with, Encoders};
use crate::pipeline::conditioning::{PromptEmbeddings, TextEncoder};
use crate::{Error, Result};

/// compel's floor on a fragment weight before `tan` (0 would give an infinite lerp weight).
const MIN_FRAGMENT_WEIGHT: f64 = 1e-5;

/// One prompt's embeddings; SDXL's pooled embedding is compel's `get_pooled_embeddings` of the
/// raw prompt text (syntax included), truncated to 77 tokens, from the second encoder.
pub fn encode(encoders: &Encoders, prompt: &str) -> Result<PromptEmbeddings> {
    let conjunction = compel_syntax::parse(prompt)?;
    let mut states = Vec::with_capacity(encoders.encoders.len());
    for encoder in &encoders.encoders {
        states.push(OneEncoder::new(encoders, encoder)?.conjunction(&conjunction)?);
    }
    let pooled = if encoders.encoders.len() > 1 {
        let last = encoders.encoders[encoders.encoders.len() - 1];
        let ids = last.tokenizer.encode_ids(prompt)?;
        Some(encoders.encode_ids(last, &ids, None)?.1)
    } else {
        None
    };
    Ok(PromptEmbeddings {
        hidden: encoders.concat_encoders(states)?,
        pooled,
    })
}

struct OneEncoder<'a> {
    encoders: &'a Encoders<'a>,
    encoder: &'a TextEncoder,
    /// The empty prompt's embedding `[1, 77, D]`.
    empty: Tensor,
    chunk: usize,
}

impl<'a> OneEncoder<'a> {
    fn new(encoders: &'a Encoders<'a>, encoder: &'a TextEncoder) -> Result<Self> {
        let (empty, _) = encoders.encode_ids(encoder, &Encoders::empty_ids(encoder), None)?;
        Ok(Self {
            encoders,
            encoder,
            empty,
            chunk: encoder.tokenizer.max_len(),
        })
    }

    fn conjunction(&self, conjunction: &compel_syntax::Conjunction) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(conjunction.parts.len());
        for (part, &weight) in conjunction.parts.iter().zip(&conjunction.weights) {
            let mut c = match part {
                Part::Prompt(fragments) => self.prompt(fragments)?,
                Part::Blend {
                    prompts,
                    weights,
                    normalize,
                } => self.blend(prompts, weights, *normalize)?,
            };
            if weight != 1.0 {
                let empty = pad_with(&self.empty, &self.empty, c.dim(1)?)?;
                c = (&empty + ((c - &empty)? * weight)?)?;
            }
            parts.push(c);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn blend(&self, prompts: &[Vec<Fragment>], weights: &[f64], normalize: bool) -> Result<Tensor> {
        let states = prompts
            .iter()
            .map(|p| self.prompt(p))
            .collect::<Result<Vec<_>>>()?;
        let len = states
            .iter()
            .map(|s| s.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(self.chunk);
        let states = states
            .iter()
            .map(|s| pad_with(s, &self.empty, len))
            .collect::<Result<Vec<_>>>()?;
        weighted_sum(&states, weights, normalize)
    }

    /// `get_embeddings_for_weighted_prompt_fragments` for one flattened prompt.
    fn prompt(&self, fragments: &[Fragment]) -> Result<Tensor> {
        let tokenizer = &self.encoder.tokenizer;
        let empty_prompt = [(String::new(), 1.0)];
        let fragments = if fragments.is_empty() {
            &empty_prompt[..]
        } else {
            fragments
        };
        let fragment_tokens = fragments
            .iter()
            .map(|(text, _)| tokenizer.tokens(text))
            .collect::<Result<Vec<_>>>()?;
        let mut ids = Vec::new();
        let mut weights = Vec::new();
        for (tokens, (_, w)) in fragment_tokens.iter().zip(fragments) {
            ids.extend_from_slice(tokens);
            weights.extend(std::iter::repeat_n(*w, tokens.len()));
        }
        let (ids, weights) = self.chunk_and_pad(&ids, &weights);
        let mask = vec![true; ids.len()];
        let mut embeddings = vec![self.weighted(&ids, &weights, &mask)?];
        let mut lerp = vec![1.0];
        let ranges = self.fragment_ranges(&ids, &fragment_tokens)?;
        for ((_, weight), range) in fragments.iter().zip(ranges) {
            if *weight >= 1.0 {
                continue;
            }
            let Some((start, end)) = range else {
                // compel fails on a down-weighted fragment with no tokens; it changes nothing.
                continue;
            };
            let mut without = mask.clone();
            without[start..=end].iter_mut().for_each(|m| *m = false);
            // Chunk start and end markers stay visible.
            for c in (0..without.len()).step_by(self.chunk) {
                without[c] = true;
                without[c + self.chunk - 1] = true;
            }
            embeddings.push(self.weighted(&ids, &weights, &without)?);
            lerp.push(((1.0 - weight.max(MIN_FRAGMENT_WEIGHT)) * FRAC_PI_2).tan());
        }
        weighted_sum(&embeddings, &lerp, true)
    }

    /// compel's `_chunk_and_pad_token_ids`: chunks of start + up to 75 tokens + end, padded.
    fn chunk_and_pad(&self, ids: &[u32], weights: &[f64]) -> (Vec<u32>, Vec<f64>) {
        let t = &self.encoder.tokenizer;
        let room = self.chunk - 2;
        let mut out_ids = Vec::new();
        let mut out_weights = Vec::new();
        let mut rest = 0;
        loop {
            let split = self.split_point(&ids[rest..], room);
            let end = (rest + split).min(ids.len());
            out_ids.push(t.bos_id());
            out_weights.push(1.0);
            out_ids.extend_from_slice(&ids[rest..end]);
            out_weights.extend_from_slice(&weights[rest..end]);
            out_ids.push(t.eos_id());
            out_weights.push(1.0);
            let padded = out_ids.len().div_ceil(self.chunk) * self.chunk;
            out_ids.resize(padded, t.pad_id());
            out_weights.resize(padded, 1.0);
            rest = end;
            if rest >= ids.len() {
                return (out_ids, out_weights);
            }
        }
    }

    /// Where the next chunk ends (`SENTENCES` mode, falling back to phrases, then words).
    fn split_point(&self, ids: &[u32], room: usize) -> usize {
        if ids.len() <= room {
            return room;
        }
        let t = &self.encoder.tokenizer;
        let texts: Vec<String> = ids[..room]
            .iter()
            .map(|&id| t.id_to_token(id).unwrap_or_default())
            .collect();
        let find = |pred: &dyn Fn(&str) -> bool| texts.iter().rposition(|s| pred(s));
        find(&|s| s == ".</w>")
            .or_else(|| find(&|s| matches!(s, ".</w>" | ",</w>" | ";</w>" | ":</w>")))
            .or_else(|| find(&|s| s.ends_with("</w>")))
            .map_or(room, |i| i + 1)
    }

    /// compel's `_get_token_ranges_for_fragments`: where each fragment's tokens sit among the
    /// chunked ids (chunk markers and padding skipped).
    fn fragment_ranges(
        &self,
        ids: &[u32],
        fragment_tokens: &[Vec<u32>],
    ) -> Result<Vec<Option<(usize, usize)>>> {
        let t = &self.encoder.tokenizer;
        let markers = [t.eos_id(), t.pad_id(), t.bos_id()];
        let lost = || Error::invalid("prompt weighting: a fragment's tokens were not found");
        let mut start = 0;
        let mut ranges = Vec::with_capacity(fragment_tokens.len());
        for tokens in fragment_tokens {
            let Some(&first) = tokens.first() else {
                ranges.push(None);
                continue;
            };
            loop {
                if start + 1 >= ids.len() {
                    return Err(lost());
                }
                if ids[start] == first {
                    break;
                }
                start += 1;
            }
            let mut end = start;
            let mut matched = 0;
            loop {
                if end + 1 >= ids.len() {
                    return Err(lost());
                }
                if ids[end] == tokens[matched] {
                    matched += 1;
                    if matched == tokens.len() {
                        break;
                    }
                    end += 1;
                } else if markers.contains(&ids[end]) {
                    end += 1;
                } else {
                    return Err(lost());
                }
            }
            ranges.push(Some((start, end)));
            start = end + 1;
        }
        Ok(ranges)
    }

    /// `build_weighted_embedding_tensor`: each chunk encoded (with `mask` as its attention
    /// mask), weighted tokens moved relative to the empty prompt.
    fn weighted(&self, ids: &[u32], weights: &[f64], mask: &[bool]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() / self.chunk);
        for c in (0..ids.len()).step_by(self.chunk) {
            let range = c..c + self.chunk;
            let chunk_mask = &mask[range.clone()];
            let key_mask = (!chunk_mask.iter().all(|&m| m)).then_some(chunk_mask);
            let (z, _) = self
                .encoders
                .encode_ids(self.encoder, &ids[range.clone()], key_mask)?;
            let w = &weights[range];
            if w.iter().all(|&w| w == 1.0) {
                out.push(z);
                continue;
            }
            let device = z.device();
            let w32: Vec<f32> = w.iter().map(|&w| w as f32).collect();
            let w_t = Tensor::from_slice(&w32, (1, self.chunk, 1), device)?.to_dtype(z.dtype())?;
            let weighted = self
                .empty
                .broadcast_add(&(&z - &self.empty)?.broadcast_mul(&w_t)?)?;
            // Tokens of weight 1 keep their own values exactly.
            let identity: Vec<u8> = w.iter().map(|&w| u8::from(w == 1.0)).collect();
            let identity = Tensor::from_slice(&identity, (1, self.chunk, 1), device)?
                .broadcast_as(z.shape())?;
            out.push(identity.where_cond(&z, &weighted)?);
        }
        Ok(Tensor::cat(&out, 1)?)
    }
}

/// `apply_embedding_weights`: `sum_i states_i * w_i` (weights normalised to sum 1 when asked),
/// with the weights in the states' dtype as compel makes them.
fn weighted_sum(states: &[Tensor], weights: &[f64], normalize: bool) -> Result<Tensor> {
    let dtype = states[0].dtype();
    let device = states[0].device();
    let w32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let mut w = Tensor::from_slice(&w32, w32.len(), device)?.to_dtype(DType::F32)?;
    if normalize {
        w = w.broadcast_div(&w.sum_all()?)?;
    }
    let w: Vec<f32> = w.to_vec1()?;
    let mut acc: Option<Tensor> = None;
    for (state, wi) in states.iter().zip(w) {
        let term = (state * f64::from(wi))?.to_dtype(dtype)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    acc.ok_or_else(|| Error::invalid("prompt weighting: nothing to blend"))
}
