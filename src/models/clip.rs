//! CLIP text encoder: the transformer half of CLIP (Radford et al. 2021, "Learning Transferable
//! Visual Models From Natural Language Supervision") that conditions Stable Diffusion.
//!
//! One module covers every encoder the supported families use: OpenAI ViT-L/14 (SD 1.x, SDXL's
//! first encoder), OpenCLIP ViT-H/14 (SD 2.x) and OpenCLIP ViT-bigG/14 with its text projection
//! (SDXL's second encoder). Weights use the transformers key layout (`text_model.encoder.layers.N.
//! self_attn.q_proj.weight`, ...); the config mirrors transformers' `CLIPTextConfig` JSON.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::layers::{
    linear, linear_no_bias, scaled_dot_product_attention, AttentionPrecision, Linear,
};
use crate::error::{Error, Result};

/// Token id transformers treats as "no real eos id configured": pooling then takes the position
/// of the largest id in each row (the eos token has the largest id in CLIP's vocabulary).
const LEGACY_EOS_TOKEN_ID: u32 = 2;

/// The text encoder's `config.json`, with transformers' defaults for absent fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::pad_token_id")]
    pub pad_token_id: u32,
    #[serde(default = "defaults::bos_token_id")]
    pub bos_token_id: u32,
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: u32,
}

mod defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn projection_dim() -> usize {
        512
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> String {
        "quick_gelu".to_string()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn pad_token_id() -> u32 {
        1
    }
    pub fn bos_token_id() -> u32 {
        49406
    }
    pub fn eos_token_id() -> u32 {
        49407
    }
}

impl ClipTextConfig {
    /// Parses the component's `config.json` value.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(value.clone())
            .map_err(|e| Error::model(format!("text encoder config.json: {e}")))
    }
}

/// The MLP non-linearities CLIP checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP.
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP.
    Gelu,
    /// Tanh approximation of GELU.
    GeluTanh,
}

impl Activation {
    pub(super) fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            other => Err(Error::model(format!(
                "text encoder hidden_act `{other}` is not supported \
                 (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"
            ))),
        }
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

/// Layer normalisation computed in f32 whatever the storage dtype (as torch does for half
/// types), with the two-pass variance so large residual-stream values do not cancel.
#[derive(Debug, Clone)]
pub(super) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(super) fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(size, "bias")?.to_dtype(DType::F32)?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let centred = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        drop(xs);
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

/// Multi-head self-attention, with a causal mask in the text encoder.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_attention_heads;
        Ok(Self {
            q_proj: linear(h, h, vb.pp("q_proj"))?,
            k_proj: linear(h, h, vb.pp("k_proj"))?,
            v_proj: linear(h, h, vb.pp("v_proj"))?,
            out_proj: linear(h, h, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `mask`: [S, S] f32 added to the scores (the text encoder's causal mask: 0 on and below
    /// the diagonal, -inf above); None for the vision encoder, whose tokens all see each other.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        // The attention itself runs in f32, as torch's fused attention kernels accumulate: at 77
        // tokens it costs nothing, and half-precision scores and weights would lose the small
        // attention weights (bf16 doubles the error against f32 without this).
        let split_heads = |t: Tensor| t.reshape((b, s, self.num_heads, self.head_dim));
        let out = scaled_dot_product_attention(
            &split_heads(self.q_proj.forward(xs)?)?,
            &split_heads(self.k_proj.forward(xs)?)?,
            &split_heads(self.v_proj.forward(xs)?)?,
            self.scale,
            AttentionPrecision::Full,
            mask,
        )?
        .reshape((b, s, h))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Mlp {
    fn new(cfg: &ClipTextConfig, activation: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2
            .forward(&self.activation.apply(&self.fc1.forward(xs)?)?)
    }
}

/// Pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
pub(super) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    pub(super) fn new(
        cfg: &ClipTextConfig,
        activation: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(cfg, activation, vb.pp("mlp"))?,
        })
    }

    pub(super) fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + attn)?;
        let mlp = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        xs + mlp
    }
}

/// What the encoder returns for a batch of token ids.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// The embeddings, then the output of each layer (before the final layer norm), as
    /// transformers returns with `output_hidden_states=True`: `num_hidden_layers + 1` tensors of
    /// shape [B, S, hidden].
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output after the final layer norm, [B, S, hidden].
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at each row's eos token, [B, hidden].
    pub pooled: Tensor,
    /// `pooled` through the text projection, [B, projection_dim], for encoders that have one.
    pub text_embeds: Option<Tensor>,
}

/// CLIP text transformer (transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when
/// the weights hold `text_projection.weight`).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    /// Rows of `token_embedding`: ids from here on are looked up in `added_embeddings`.
    vocab_size: usize,
    /// Extra input vectors `[m, hidden]` (textual inversion) for ids `vocab_size..vocab_size + m`.
    added_embeddings: Option<Tensor>,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: u32,
    max_positions: usize,
}

impl ClipTextModel {
    /// `vb` is rooted at the component (keys `text_model.embeddings.token_embedding.weight`, ...);
    /// its dtype is the compute dtype.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::model(format!(
                "text encoder hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let activation = Activation::parse(&cfg.hidden_act)?;
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "position_embedding.weight",
        )?;
        let layers_vb = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, activation, layers_vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            tm.pp("final_layer_norm"),
        )?;
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            Some(linear_no_bias(
                cfg.hidden_size,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            vocab_size: cfg.vocab_size,
            added_embeddings: None,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            eos_token_id: cfg.eos_token_id,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Whether this encoder has a text projection (SDXL's second encoder).
    /// The final layer norm alone, for prompt embeddings taken from an earlier layer
    /// (`clip_skip`), which diffusers passes through it.
    pub fn final_layer_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.final_layer_norm.forward(hidden)?)
    }

    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Width of the token embeddings (what an embedding's vectors must match).
    pub fn hidden_size(&self) -> usize {
        self.token_embedding.hidden_size()
    }

    /// Rows of the token embedding table: the first id free for added vectors.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// This model with `vectors` `[m, hidden]` as the embeddings of ids `vocab_size()..vocab_size()
    /// + m` (replacing any added before), as if the token table had been extended the way
    /// diffusers' `load_textual_inversion` extends it. The weights are shared, not copied, and the
    /// table itself is left alone: ids past it are looked up in `vectors` instead.
    pub fn with_added_embeddings(&self, vectors: Tensor) -> Result<Self> {
        let (_, width) = vectors.dims2()?;
        if width != self.hidden_size() {
            return Err(Error::invalid(format!(
                "added token embeddings are {width} wide; this text encoder takes {}",
                self.hidden_size()
            )));
        }
        let vectors = vectors
            .to_device(self.position_embedding.device())?
            .to_dtype(self.position_embedding.dtype())?;
        Ok(Self {
            added_embeddings: Some(vectors),
            ..self.clone()
        })
    }

    /// Token embeddings of `ids` [B, S]: rows of the table, or of the added vectors for ids past
    /// it.
    fn embed_tokens(&self, ids: &Tensor, id_rows: &[Vec<u32>]) -> Result<Tensor> {
        let vocab = self.vocab_size as u32;
        let added_rows = self.added_embeddings.as_ref().map_or(0, |t| t.dims()[0]);
        if let Some(&bad) = id_rows
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.vocab_size + added_rows)
        {
            return Err(Error::invalid(format!(
                "token id {bad} is past the text encoder's {} tokens{}",
                self.vocab_size,
                if added_rows > 0 {
                    format!(" and {added_rows} added embedding vectors")
                } else {
                    String::new()
                }
            )));
        }
        let Some(added) = self
            .added_embeddings
            .as_ref()
            .filter(|_| id_rows.iter().flatten().any(|&id| id >= vocab))
        else {
            return Ok(self.token_embedding.forward(ids)?);
        };
        let (batch, seq_len) = ids.dims2()?;
        let device = ids.device();
        let flat: Vec<u32> = id_rows.iter().flatten().copied().collect();
        let table_ids: Vec<u32> = flat
            .iter()
            .map(|&id| if id >= vocab { 0 } else { id })
            .collect();
        let added_ids: Vec<u32> = flat.iter().map(|&id| id.saturating_sub(vocab)).collect();
        let is_added: Vec<u8> = flat.iter().map(|&id| u8::from(id >= vocab)).collect();
        let table = self.token_embedding.forward(&Tensor::from_vec(
            table_ids,
            (batch, seq_len),
            device,
        )?)?;
        let hidden = table.dim(2)?;
        let extra = added
            .index_select(&Tensor::from_vec(added_ids, batch * seq_len, device)?, 0)?
            .reshape((batch, seq_len, hidden))?;
        let mask = Tensor::from_vec(is_added, (batch, seq_len, 1), device)?
            .broadcast_as((batch, seq_len, hidden))?;
        Ok(mask.where_cond(&extra, &table)?)
    }

    /// Encodes `input_ids` [B, S] (u32, S <= max_position_embeddings).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        self.forward_masked(input_ids, None)
    }

    /// [`Self::forward`] with transformers' `attention_mask` for every row: positions whose
    /// `key_mask` entry is false are hidden from every token's attention (compel fades a
    /// down-weighted fragment out this way). `key_mask` has one entry per position.
    pub fn forward_masked(
        &self,
        input_ids: &Tensor,
        key_mask: Option<&[bool]>,
    ) -> Result<ClipOutput> {
        let (batch, seq_len) = input_ids.dims2()?;
        if seq_len == 0 || seq_len > self.max_positions {
            return Err(Error::invalid(format!(
                "text encoder input has {seq_len} tokens; it must have 1..={}",
                self.max_positions
            )));
        }
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let id_rows = input_ids.to_vec2::<u32>()?;
        let positions = self.position_embedding.narrow(0, 0, seq_len)?;
        let mut xs = self
            .embed_tokens(&input_ids, &id_rows)?
            .broadcast_add(&positions)?;
        let causal_mask = match key_mask {
            None => causal_mask(seq_len, xs.device())?,
            Some(keys) if keys.len() == seq_len => masked_causal_mask(keys, xs.device())?,
            Some(keys) => {
                return Err(Error::invalid(format!(
                    "text encoder attention mask has {} entries for {seq_len} tokens",
                    keys.len()
                )))
            }
        };

        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let next = layer.forward(&xs, Some(&causal_mask))?;
            hidden_states.push(xs);
            xs = next;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        hidden_states.push(xs);

        // With the legacy eos id the pooled position is the row's largest id, which an added
        // embedding's id outranks: transformers does the same (its SDXL pooled output then comes
        // from the embedding's last vector).
        let rows = eos_positions(&id_rows, self.eos_token_id)
            .into_iter()
            .enumerate()
            .map(|(b, pos)| (b * seq_len + pos) as u32)
            .collect::<Vec<_>>();
        let rows = Tensor::from_vec(rows, batch, input_ids.device())?;
        let pooled = last_hidden_state
            .reshape((batch * seq_len, ()))?
            .index_select(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            Some(projection) => Some(projection.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput {
            hidden_states,
            last_hidden_state,
            pooled,
            text_embeds,
        })
    }
}

/// [S, S] additive mask letting each token attend to itself and earlier tokens only.
fn causal_mask(seq_len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
}

/// [`causal_mask`] that also hides the positions whose `keys` entry is false.
fn masked_causal_mask(keys: &[bool], device: &Device) -> candle_core::Result<Tensor> {
    let n = keys.len();
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..n).map(move |j| {
                if j > i || !keys[j] {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, n), device)
}

/// The position pooled for each row, following transformers: with the legacy eos id the first
/// position holding the row's largest id; otherwise the first position holding `eos_token_id`
/// (position 0 when the row has none).
fn eos_positions(ids: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    ids.iter()
        .map(|row| {
            if eos_token_id == LEGACY_EOS_TOKEN_ID {
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&id| id == max).unwrap_or(0)
            } else {
                row.iter().position(|&id| id == eos_token_id).unwrap_or(0)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_position_legacy_takes_first_maximum() {
        let ids = vec![
            vec![49406, 320, 49407, 49407, 49407],
            vec![49406, 49407, 0, 0, 0],
        ];
        assert_eq!(eos_positions(&ids, 2), vec![2, 1]);
    }

    #[test]
    fn eos_position_configured_id() {
        let ids = vec![vec![49406, 320, 49407, 0], vec![5, 6, 7, 8]];
        assert_eq!(eos_positions(&ids, 49407), vec![2, 0]);
        // A configured id different from the largest one is honoured.
        assert_eq!(eos_positions(&[vec![1, 9, 7, 9]], 7), vec![2]);
    }

    #[test]
    fn causal_mask_blocks_future_tokens() {
        let m = causal_mask(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][0], 0.0);
        assert!(m[0][1].is_infinite() && m[0][1] < 0.0);
        assert_eq!(m[2][1], 0.0);
        assert!(m[1][2].is_infinite());
    }

    #[test]
    fn unknown_activation_is_a_model_error() {
        assert!(matches!(Activation::parse("relu"), Err(Error::Model(_))));
    }
}
