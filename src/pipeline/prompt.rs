//! Prompt tokenization for the CLIP text encoders.
//!
//! Produces the ids transformers' `CLIPTokenizer` gives with `padding="max_length",
//! truncation=True` at the model's maximum length (77): `<|startoftext|>`, the prompt's tokens
//! (at most 75), `<|endoftext|>`, then the tokenizer's pad token. SD 1.x pads with
//! `<|endoftext|>`; SD 2.x and SDXL's second tokenizer pad with `!` (id 0).
//!
//! A tokenizer can also carry placeholder tokens for textual inversion embeddings
//! ([`ClipTokenizer::with_placeholders`]): each one's text, wherever the prompt contains it,
//! becomes one id per embedding vector, past the end of the vocabulary, as diffusers'
//! `load_textual_inversion` adds tokens (`tok`, `tok_1`, ...) and its `maybe_convert_prompt`
//! expands them.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizedString, Normalizer, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// CLIP's word split: its special tokens, English contractions, letter runs, single digits and
/// runs of other non-space characters.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A text that stands for `count` ids from `first_id` on (an embedding's vectors, looked up by
/// the text encoder past its vocabulary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceholderToken {
    pub text: String,
    pub first_id: u32,
    pub count: usize,
}

/// A CLIP BPE tokenizer with fixed-length padding and truncation. Cloning is cheap: the
/// vocabulary is shared.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Arc<Tokenizer>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_len: usize,
    /// Placeholder tokens, their text normalised like prompts are (lower case).
    placeholders: Arc<[PlaceholderToken]>,
}

/// A stretch of a normalised prompt: ordinary text, or the placeholder of that index.
enum Segment<'a> {
    Text(&'a str),
    Placeholder(usize),
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_len", &self.max_len)
            .field("placeholders", &self.placeholders)
            .finish_non_exhaustive()
    }
}

fn tokenizer_error(what: impl std::fmt::Display) -> Error {
    Error::Tokenizer(what.to_string())
}

impl ClipTokenizer {
    /// Loads a `tokenizer.json`. `pad_token` and `model_max_length` come from the tokenizer's
    /// `tokenizer_config.json` (`"<|endoftext|>"` or `"!"`, and 77).
    pub fn new(tokenizer_json: &Path, pad_token: &str, model_max_length: usize) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(tokenizer_json).map_err(|e| {
            tokenizer_error(format!("cannot load {}: {e}", tokenizer_json.display()))
        })?;
        Self::from_tokenizer(tokenizer, pad_token, model_max_length)
    }

    /// Builds the tokenizer from the `vocab.json` and `merges.txt` that diffusers repositories
    /// ship, with the same normalisation and splitting transformers' `CLIPTokenizer` sets up.
    pub fn from_vocab_merges(
        vocab_json: &Path,
        merges_txt: &Path,
        pad_token: &str,
        model_max_length: usize,
    ) -> Result<Self> {
        let path_str = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| tokenizer_error(format!("path {} is not UTF-8", p.display())))
        };
        let bpe = BPE::from_file(&path_str(vocab_json)?, &path_str(merges_txt)?)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(END_OF_TEXT.to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| {
                tokenizer_error(format!(
                    "cannot load {} and {}: {e}",
                    vocab_json.display(),
                    merges_txt.display()
                ))
            })?;
        let mut tokenizer = Tokenizer::new(bpe);
        let collapse_whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_string()),
            " ",
        )
        .map_err(tokenizer_error)?;
        tokenizer.with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
            NFC.into(),
            collapse_whitespace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tokenizer_error)?;
        tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::sequence::Sequence::new(
            vec![split.into(), ByteLevel::new(false, true, true).into()],
        )));
        tokenizer.add_special_tokens(&[
            AddedToken::from(START_OF_TEXT, true),
            AddedToken::from(END_OF_TEXT, true),
        ]);
        Self::from_tokenizer(tokenizer, pad_token, model_max_length)
    }

    fn from_tokenizer(
        mut tokenizer: Tokenizer,
        pad_token: &str,
        model_max_length: usize,
    ) -> Result<Self> {
        let id = |tokenizer: &Tokenizer, token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| tokenizer_error(format!("vocabulary has no `{token}` token")))
        };
        // Looked up before it is registered below: a pad token outside the vocabulary would get
        // an id past the text encoder's embedding table.
        let pad_id = id(&tokenizer, pad_token)?;
        // transformers registers the pad token as a special token, so with pad `!` a literal
        // `!` in a prompt becomes the pad id rather than BPE's `!</w>`; do the same.
        tokenizer.add_special_tokens(&[AddedToken::from(pad_token, true)]);
        // Padding and truncation are applied here, whatever the file configures.
        tokenizer
            .with_truncation(None)
            .map_err(tokenizer_error)?
            .with_padding(None);
        let bos_id = id(&tokenizer, START_OF_TEXT)?;
        let eos_id = id(&tokenizer, END_OF_TEXT)?;
        if model_max_length < 2 {
            return Err(tokenizer_error(format!(
                "model_max_length {model_max_length} leaves no room for the start and end tokens"
            )));
        }
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            bos_id,
            eos_id,
            pad_id,
            max_len: model_max_length,
            placeholders: Arc::from(Vec::new()),
        })
    }

    /// This tokenizer with `placeholders` instead of its own: where a prompt contains one's text
    /// (matched after the prompt's normalisation, so in any letter case, and inside words too, as
    /// the `tokenizers` library matches added tokens; the longest text wins where several start at
    /// one place), its ids take the place of BPE tokens. Sharing the vocabulary, this costs what
    /// copying `placeholders` costs.
    pub fn with_placeholders(&self, placeholders: &[PlaceholderToken]) -> Result<Self> {
        let mut normalised = Vec::with_capacity(placeholders.len());
        for p in placeholders {
            let text = self.normalise(&p.text)?;
            if text.trim().is_empty() || p.count == 0 {
                return Err(tokenizer_error(format!(
                    "placeholder token `{}` must have visible text and at least one id",
                    p.text
                )));
            }
            normalised.push(PlaceholderToken {
                text,
                first_id: p.first_id,
                count: p.count,
            });
        }
        Ok(Self {
            placeholders: Arc::from(normalised),
            ..self.clone()
        })
    }

    /// Which of the placeholders (by index in the list given to [`Self::with_placeholders`]) the
    /// prompt contains.
    pub fn placeholders_in(&self, prompt: &str) -> Result<Vec<usize>> {
        if self.placeholders.is_empty() {
            return Ok(Vec::new());
        }
        let text = self.normalise(prompt)?;
        let mut found: Vec<usize> = self
            .segments(&text)
            .into_iter()
            .filter_map(|s| match s {
                Segment::Placeholder(i) => Some(i),
                Segment::Text(_) => None,
            })
            .collect();
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// The prompt as the tokenizer's normaliser leaves it (NFC, whitespace runs collapsed, lower
    /// case for CLIP).
    fn normalise(&self, text: &str) -> Result<String> {
        let Some(normalizer) = self.tokenizer.get_normalizer() else {
            return Ok(text.to_string());
        };
        let mut n = NormalizedString::from(text);
        normalizer.normalize(&mut n).map_err(tokenizer_error)?;
        Ok(n.get().to_string())
    }

    /// Splits normalised text at the placeholders it contains: leftmost first, longest first.
    fn segments<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        let mut out = Vec::new();
        let (mut start, mut at) = (0, 0);
        while at < text.len() {
            let rest = &text[at..];
            let hit = self
                .placeholders
                .iter()
                .enumerate()
                .filter(|(_, p)| rest.starts_with(p.text.as_str()))
                .max_by_key(|(i, p)| (p.text.len(), std::cmp::Reverse(*i)));
            match hit {
                Some((i, p)) => {
                    if start < at {
                        out.push(Segment::Text(&text[start..at]));
                    }
                    out.push(Segment::Placeholder(i));
                    at += p.text.len();
                    start = at;
                }
                None => {
                    at += rest.chars().next().map_or(1, char::len_utf8);
                }
            }
        }
        if start < text.len() {
            out.push(Segment::Text(&text[start..]));
        }
        out
    }

    /// The padded sequence length (77 for every Stable Diffusion tokenizer).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of a vocabulary entry (`",</w>"`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The vocabulary entry of an id (`"cat</w>"`); `None` for ids outside the vocabulary
    /// (embedding placeholders included).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The text's tokens, without start/end tokens and without truncation (prompt weighting
    /// tokenizes each weighted piece on its own and chunks long prompts itself).
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        self.prompt_tokens(text)
    }

    /// The prompt's tokens, without the start/end tokens and before truncation; placeholder
    /// texts become their ids.
    fn prompt_tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        if self.placeholders.is_empty() {
            return self.bpe_tokens(prompt);
        }
        let text = self.normalise(prompt)?;
        let mut ids = Vec::new();
        for segment in self.segments(&text) {
            match segment {
                Segment::Text(piece) => ids.extend(self.bpe_tokens(piece)?),
                Segment::Placeholder(i) => {
                    let p = &self.placeholders[i];
                    ids.extend((0..p.count as u32).map(|k| p.first_id + k));
                }
            }
        }
        Ok(ids)
    }

    fn bpe_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(tokenizer_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// How many tokens the prompt has (without the start/end tokens); more than
    /// `max_len() - 2` means the prompt will be truncated.
    pub fn token_count(&self, prompt: &str) -> Result<usize> {
        Ok(self.prompt_tokens(prompt)?.len())
    }

    /// One prompt's padded ids: start, up to `max_len - 2` tokens, end, pad.
    pub fn encode_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let tokens = self.prompt_tokens(prompt)?;
        let kept = tokens.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..kept]);
        ids.push(self.eos_id);
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// Token ids [B, max_len] (u32, on the CPU) for a batch of prompts.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.max_len);
        for prompt in prompts {
            ids.extend(self.encode_ids(prompt)?);
        }
        Ok(Tensor::from_vec(
            ids,
            (prompts.len(), self.max_len),
            &Device::Cpu,
        )?)
    }
}
