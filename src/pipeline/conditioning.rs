//! What the UNet is conditioned on: prompt embeddings from the text encoders and, for SDXL,
//! the pooled text embedding and the size/crop "time ids".

use candle_core::{DType, Device, Tensor, D};

use crate::models::clip::{ClipOutput, ClipTextModel};
use crate::models::unet::AddedConditions;
use crate::pipeline::prompt::ClipTokenizer;
use crate::Result;

/// One text encoder with its tokenizer.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
}

/// Embeddings of one prompt (batch 1), before repetition over images and CFG.
pub struct PromptEmbeddings {
    /// `[1, 77 * k, D]` (SDXL: the two encoders' states concatenated on the last axis); k is 1
    /// except for weighted prompts longer than one chunk.
    pub hidden: Tensor,
    /// SDXL only: the projected pooled output of the second encoder, `[1, P]`.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeddings {
    /// Zero embeddings shaped like `self` (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            hidden: self.hidden.zeros_like()?,
            pooled: self.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
        })
    }
}

/// Which hidden state of a text encoder becomes the prompt embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingLayer {
    /// SD1/SD2: the last layer after the final layer norm, or with `clip_skip` = k the output
    /// of the k-th layer from the end, also through the final layer norm (diffusers).
    Normalized { clip_skip: usize },
    /// SDXL: the penultimate layer without the final layer norm; `clip_skip` = k moves k
    /// layers further back.
    Penultimate { clip_skip: usize },
}

impl EmbeddingLayer {
    /// The layer a model family uses with `clip_skip`.
    pub fn for_encoders(dual: bool, clip_skip: Option<usize>) -> Self {
        let clip_skip = clip_skip.unwrap_or(0);
        if dual {
            Self::Penultimate { clip_skip }
        } else {
            Self::Normalized { clip_skip }
        }
    }

    /// Picks this layer from an encoder's output.
    pub fn select(&self, model: &ClipTextModel, out: &ClipOutput) -> Result<Tensor> {
        match *self {
            Self::Normalized { clip_skip: 0 } => Ok(out.last_hidden_state.clone()),
            Self::Normalized { clip_skip } => {
                model.final_layer_norm(pick_from_end(&out.hidden_states, clip_skip + 1)?)
            }
            Self::Penultimate { clip_skip } => {
                Ok(pick_from_end(&out.hidden_states, clip_skip + 2)?.clone())
            }
        }
    }
}

/// SD1/SD2: one encoder, the layer [`EmbeddingLayer::Normalized`] names.
pub fn encode_single(
    encoder: &TextEncoder,
    prompt: &str,
    clip_skip: Option<usize>,
    device: &Device,
) -> Result<PromptEmbeddings> {
    let ids = encoder
        .tokenizer
        .encode_prompts(&[prompt])?
        .to_device(device)?;
    let out = encoder.model.forward(&ids)?;
    let hidden = EmbeddingLayer::for_encoders(false, clip_skip).select(&encoder.model, &out)?;
    Ok(PromptEmbeddings {
        hidden,
        pooled: None,
    })
}

/// SDXL: both encoders' [`EmbeddingLayer::Penultimate`] states, concatenated, and the second
/// encoder's projected pooled output.
pub fn encode_dual(
    first: &TextEncoder,
    second: &TextEncoder,
    prompt: &str,
    clip_skip: Option<usize>,
    device: &Device,
) -> Result<PromptEmbeddings> {
    let layer = EmbeddingLayer::for_encoders(true, clip_skip);
    let mut states = Vec::with_capacity(2);
    let mut pooled = None;
    for encoder in [first, second] {
        let ids = encoder
            .tokenizer
            .encode_prompts(&[prompt])?
            .to_device(device)?;
        let out = encoder.model.forward(&ids)?;
        states.push(layer.select(&encoder.model, &out)?);
        pooled = Some(out.text_embeds.unwrap_or(out.pooled));
    }
    Ok(PromptEmbeddings {
        hidden: Tensor::cat(&states, D::Minus1)?,
        pooled,
    })
}

fn pick_from_end(states: &[Tensor], from_end: usize) -> Result<&Tensor> {
    if from_end == 0 || from_end > states.len() {
        return Err(crate::Error::invalid(format!(
            "`clip_skip` must be < {} for this model's text encoder. Given: {}",
            states.len().saturating_sub(1),
            from_end.saturating_sub(1)
        )));
    }
    Ok(&states[states.len() - from_end])
}

/// The UNet inputs for a batch of `n` images: `[uncond; cond]` stacked when guidance is on,
/// as diffusers orders them.
pub struct BatchConditioning {
    pub hidden: Tensor,
    pub added: Option<AddedConditions>,
}

pub fn batch_conditioning(
    cond: &PromptEmbeddings,
    uncond: Option<&PromptEmbeddings>,
    n: usize,
    size: (usize, usize),
    dtype: DType,
) -> Result<BatchConditioning> {
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let mut dims = vec![n];
        dims.extend_from_slice(&t.dims()[1..]);
        Ok(t.broadcast_as(dims)?.contiguous()?)
    };
    let stack = |c: &Tensor, u: Option<&Tensor>| -> Result<Tensor> {
        let c = repeat(c)?;
        Ok(match u {
            Some(u) => Tensor::cat(&[repeat(u)?, c], 0)?,
            None => c,
        }
        .to_dtype(dtype)?)
    };
    let hidden = stack(&cond.hidden, uncond.map(|u| &u.hidden))?;
    let added = match &cond.pooled {
        Some(pooled) => {
            let uncond_pooled = uncond.and_then(|u| u.pooled.as_ref());
            let text_embeds = stack(pooled, uncond_pooled)?;
            let (height, width) = (size.0 as f32, size.1 as f32);
            // original size, crop top-left, target size: the image is neither cropped nor resized.
            let ids = Tensor::new(&[[height, width, 0.0, 0.0, height, width]], pooled.device())?;
            let rows = text_embeds.dim(0)?;
            let time_ids = ids.broadcast_as((rows, 6))?.contiguous()?.to_dtype(dtype)?;
            Some(AddedConditions {
                text_embeds,
                time_ids,
            })
        }
        None => None,
    };
    Ok(BatchConditioning { hidden, added })
}

/// SDXL refiner: its one encoder (OpenCLIP bigG) as SDXL's second, the penultimate layer
/// without the final layer norm and the projected pooled output (diffusers' refiner
/// `encode_prompt` with `text_encoder` absent).
pub fn encode_refiner(
    encoder: &TextEncoder,
    prompt: &str,
    device: &Device,
) -> Result<PromptEmbeddings> {
    let ids = encoder
        .tokenizer
        .encode_prompts(&[prompt])?
        .to_device(device)?;
    let out = encoder.model.forward(&ids)?;
    let hidden = pick_from_end(&out.hidden_states, 2)?.clone();
    let pooled = out.text_embeds.ok_or_else(|| {
        crate::Error::model(
            "an SDXL refiner's text encoder must have a text projection \
             (CLIPTextModelWithProjection)",
        )
    })?;
    Ok(PromptEmbeddings {
        hidden,
        pooled: Some(pooled),
    })
}

/// Aesthetic score of the prompt's rows and of the negative rows (diffusers' defaults).
pub const AESTHETIC_SCORE: f32 = 6.0;
pub const NEGATIVE_AESTHETIC_SCORE: f32 = 2.5;

/// The SDXL refiner's time ids, `[rows, 5]`: original size, crop top-left, aesthetic score
/// (`requires_aesthetics_score`); the negative rows (first `n` when `guided`) score
/// [`NEGATIVE_AESTHETIC_SCORE`], the prompt's rows [`AESTHETIC_SCORE`].
pub fn aesthetic_time_ids(
    n: usize,
    guided: bool,
    size: (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let (height, width) = (size.0 as f32, size.1 as f32);
    let row = |score: f32| [height, width, 0.0, 0.0, score];
    let mut rows = Vec::with_capacity(2 * n);
    if guided {
        rows.extend(std::iter::repeat_n(row(NEGATIVE_AESTHETIC_SCORE), n));
    }
    rows.extend(std::iter::repeat_n(row(AESTHETIC_SCORE), n));
    let flat: Vec<f32> = rows.concat();
    Ok(Tensor::from_vec(flat, (rows.len(), 5), device)?.to_dtype(dtype)?)
}
