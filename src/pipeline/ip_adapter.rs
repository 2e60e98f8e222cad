//! IP-Adapter image prompts in the denoising loop, as diffusers' pipelines run them with
//! `ip_adapter_image` and `set_ip_adapter_scale`: each reference image is encoded once per
//! request, its tokens (and the unconditional tokens for the guidance batch) turned into every
//! cross-attention layer's keys and values, which all steps reuse.

use crate::models::ip_adapter::IpAdapterModel;
use crate::models::unet::{ImageAttention, UNet2DConditionModel};
use crate::{Error, Result};

/// Most IP-Adapters one request may stack.
pub const MAX_IP_ADAPTERS: usize = 4;

/// One IP-Adapter applied to a request.
#[derive(Debug, Clone)]
pub struct IpAdapterUnit {
    /// Registry id (or alias) of the IP-Adapter.
    pub model: String,
    /// The reference image (any size: the image encoder's preprocessing resizes and crops it).
    pub image: image::RgbImage,
    /// How much of the attention over the image joins the text attention, 0..=1
    /// (diffusers' `set_ip_adapter_scale`).
    pub weight: f64,
}

impl IpAdapterUnit {
    /// A unit at weight 1.
    pub fn new(model: impl Into<String>, image: image::RgbImage) -> Self {
        Self {
            model: model.into(),
            image,
            weight: 1.0,
        }
    }
}

/// The request-level checks of the units.
pub fn check(units: &[IpAdapterUnit]) -> Result<()> {
    if units.len() > MAX_IP_ADAPTERS {
        return Err(Error::invalid(format!(
            "at most {MAX_IP_ADAPTERS} IP-Adapters per request. Given: {}",
            units.len()
        )));
    }
    for unit in units {
        if unit.model.trim().is_empty() {
            return Err(Error::invalid("an IP-Adapter needs a model id"));
        }
        if !(unit.weight.is_finite() && (0.0..=1.0).contains(&unit.weight)) {
            return Err(Error::invalid(format!(
                "the weight of IP-Adapter `{}` must be between 0 and 1. Given: {}",
                unit.model, unit.weight
            )));
        }
        let (w, h) = unit.image.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::invalid(format!(
                "the image of IP-Adapter `{}` is empty",
                unit.model
            )));
        }
    }
    Ok(())
}

/// The image-prompt keys and values of every cross-attention layer of `unet` (empty without
/// units), each layer holding one entry per unit. `models` are the loaded adapters of `units`,
/// in the same order.
pub fn prepare(
    units: &[IpAdapterUnit],
    models: &[&IpAdapterModel],
    unet: &UNet2DConditionModel,
    guided: bool,
    num_images: usize,
) -> Result<Vec<Vec<ImageAttention>>> {
    if units.len() != models.len() {
        return Err(Error::model(format!(
            "the request names {} IP-Adapters, {} are loaded",
            units.len(),
            models.len()
        )));
    }
    let mut layers: Vec<Vec<ImageAttention>> = Vec::new();
    for (unit, model) in units.iter().zip(models) {
        let per_layer = model
            .attention(unet, &unit.image, unit.weight, guided, num_images)
            .map_err(|e| match e {
                Error::InvalidRequest(m) => {
                    Error::invalid(format!("IP-Adapter `{}`: {m}", unit.model))
                }
                other => other,
            })?;
        if layers.is_empty() {
            layers = per_layer.into_iter().map(|a| vec![a]).collect();
        } else {
            for (layer, a) in layers.iter_mut().zip(per_layer) {
                layer.push(a);
            }
        }
    }
    Ok(layers)
}
