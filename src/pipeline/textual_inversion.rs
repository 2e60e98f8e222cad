//! Textual inversion embeddings in one request's prompts.
//!
//! The text encoders of a request are the model's own with placeholder tokens added: each
//! embedding's token tokenizes to one id per vector, past the vocabulary (ids in the order of the
//! request's list, as diffusers numbers the tokens `load_textual_inversion` adds), and the text
//! model looks those ids up in the request's vectors instead of its token table. Nothing of the
//! model is copied or changed, so requests with different embeddings share one loaded model.
//!
//! How a request's embedding list applies:
//!
//! * the token is used wherever a prompt writes it, the prompt and the negative prompt alike (the
//!   A1111 and civitai convention), in any letter case;
//! * a token written in neither prompt is appended to the prompt, or to the negative prompt for an
//!   embedding registered as a negative one (`negative = true`, e.g. "bad hands" embeddings), so
//!   that naming an embedding in a request is enough to use it;
//! * the weight multiplies the vectors: 1 gives exactly what diffusers' `load_textual_inversion`
//!   gives, 0.5 half-length vectors, a negative weight points them the other way; 0 leaves the
//!   embedding out (its token is then read as ordinary words and nothing is appended).

use std::sync::Arc;

use candle_core::Tensor;

use super::conditioning::TextEncoder;
use super::prompt::PlaceholderToken;
use crate::weights::embeddings::TextualInversion;
use crate::{Error, Result};

/// One embedding as a request uses it.
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    /// The registry id, for messages.
    pub id: String,
    /// The text that calls it up in prompts.
    pub token: String,
    pub embedding: Arc<TextualInversion>,
    /// Multiplies the vectors; 0 leaves the embedding out.
    pub weight: f64,
    /// Appended to the negative prompt (rather than the prompt) when no prompt writes its token.
    pub negative: bool,
}

/// A request's text encoders with its embeddings' placeholder tokens, and where each token goes
/// when the prompts do not write it.
pub struct RequestEncoders {
    pub first: TextEncoder,
    pub second: Option<TextEncoder>,
    /// (token, appended to the negative prompt) of each embedding in use.
    tokens: Vec<(String, bool)>,
}

impl RequestEncoders {
    /// The encoders for `embeddings` (those of weight 0 left out); `None` when none is left.
    /// Checks each embedding's vectors against the encoders' widths and that no two share a
    /// token.
    pub fn new(
        first: &TextEncoder,
        second: Option<&TextEncoder>,
        embeddings: &[PromptEmbedding],
    ) -> Result<Option<Self>> {
        let used: Vec<&PromptEmbedding> = embeddings.iter().filter(|e| e.weight != 0.0).collect();
        if used.is_empty() {
            return Ok(None);
        }
        let widths: Vec<usize> = std::iter::once(first)
            .chain(second)
            .map(|e| e.model.hidden_size())
            .collect();
        for (i, e) in used.iter().enumerate() {
            if !e.weight.is_finite() {
                return Err(Error::invalid(format!(
                    "the weight of embedding `{}` must be a finite number. Given: {}",
                    e.id, e.weight
                )));
            }
            e.embedding.check_widths(&e.id, &widths)?;
            let token = e.token.trim().to_lowercase();
            if let Some(other) = used[..i]
                .iter()
                .find(|o| o.token.trim().to_lowercase() == token)
            {
                return Err(Error::invalid(format!(
                    "embeddings `{}` and `{}` both use the token `{}`: a request can use one \
                     of them",
                    other.id, e.id, e.token
                )));
            }
        }
        let first_out = extend(first, &used, |e| e.embedding.vectors.clone())?;
        let second_out = match second {
            Some(second) => Some(extend(second, &used, |e| {
                e.embedding
                    .vectors_2
                    .clone()
                    .expect("widths checked: SDXL embeddings have clip_g vectors; this is a bug")
            })?),
            None => None,
        };
        Ok(Some(Self {
            first: first_out,
            second: second_out,
            tokens: used.iter().map(|e| (e.token.clone(), e.negative)).collect(),
        }))
    }

    /// The prompts with the token of each embedding that neither writes appended to the prompt
    /// (or the negative prompt), separated by a space.
    pub fn place_tokens(
        &self,
        prompt: &str,
        negative: Option<&str>,
    ) -> Result<(String, Option<String>)> {
        let tokenizer = &self.first.tokenizer;
        let mut present = tokenizer.placeholders_in(prompt)?;
        if let Some(n) = negative {
            present.extend(tokenizer.placeholders_in(n)?);
        }
        let (mut prompt, mut negative) = (prompt.to_string(), negative.map(str::to_string));
        for (i, (token, to_negative)) in self.tokens.iter().enumerate() {
            if present.contains(&i) {
                continue;
            }
            let target = if *to_negative {
                negative.get_or_insert_with(String::new)
            } else {
                &mut prompt
            };
            if !target.trim().is_empty() {
                target.push(' ');
            }
            target.push_str(token);
        }
        Ok((prompt, negative))
    }
}

/// `encoder` with the placeholder tokens and weighted vectors of `used` (vectors chosen by
/// `vectors_of`), ids numbered from the encoder's vocabulary size in list order.
fn extend(
    encoder: &TextEncoder,
    used: &[&PromptEmbedding],
    vectors_of: impl Fn(&PromptEmbedding) -> Tensor,
) -> Result<TextEncoder> {
    let mut next = encoder.model.vocab_size() as u32;
    let mut placeholders = Vec::with_capacity(used.len());
    let mut rows = Vec::with_capacity(used.len());
    for e in used {
        let vectors = (vectors_of(e) * e.weight)?;
        placeholders.push(PlaceholderToken {
            text: e.token.clone(),
            first_id: next,
            count: vectors.dim(0)?,
        });
        next += vectors.dim(0)? as u32;
        rows.push(vectors);
    }
    Ok(TextEncoder {
        tokenizer: encoder.tokenizer.with_placeholders(&placeholders)?,
        model: encoder
            .model
            .with_added_embeddings(Tensor::cat(&rows, 0)?)?,
    })
}
