//! ControlNet guidance in the denoising loop, as diffusers' `StableDiffusionControlNetPipeline`
//! (and its SDXL and multi-ControlNet forms) runs it: the control image resized to the output
//! size in 0..1, embedded once; at each step every active ControlNet's residuals, summed, are
//! added to the UNet's skips and middle block.
//!
//! An inpaint ControlNet (control_v11p_sd15_inpaint) reads a condition no RGB image can hold:
//! the seed image in 0..1 with the repainted pixels at -1 (diffusers' `make_inpaint_condition`),
//! built here from the unit's image and the request's mask. When the loop generates a zoomed
//! crop of the picture (`maskMargin`), every control image is cropped the same way.

use candle_core::Tensor;
use image::imageops;

use super::images;
use super::inpaint::Canvas;
use crate::models::controlnet::{ControlNetModel, ControlResiduals};
use crate::models::unet::AddedConditions;
use crate::{Error, Result};

/// Most ControlNets one request may stack.
pub const MAX_CONTROLNETS: usize = 8;

/// How a ControlNet weighs against the prompt (Runware `controlMode`, ModelsLab `guess_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlMode {
    /// Every residual at the unit's scale, on both halves of the guidance batch (diffusers'
    /// default).
    #[default]
    Balanced,
    /// The prompt matters more: the residuals' scales rise from 0.1 x scale on the finest skip
    /// to the full scale on the middle block (diffusers' guess-mode ramp), on both halves, so the
    /// fine structure of the control image binds less.
    Prompt,
    /// The ControlNet matters more: diffusers' guess mode. The ControlNet sees only the
    /// conditional half (with the prompt's embeddings) under the same ramp, and the unconditional
    /// half gets no residual, so guidance amplifies the control.
    ControlNet,
}

/// One ControlNet applied to a request.
#[derive(Debug, Clone)]
pub struct ControlNetUnit {
    /// Registry id (or alias) of the ControlNet.
    pub model: String,
    /// The control image (already preprocessed, e.g. an edge map); resized to the output size.
    pub image: image::RgbImage,
    /// Multiplies every residual (diffusers' `controlnet_conditioning_scale`), >= 0.
    pub scale: f64,
    /// The fraction of the denoising steps where the ControlNet starts acting, 0 <= start < end.
    pub start: f64,
    /// The fraction where it stops, start < end <= 1.
    pub end: f64,
    pub mode: ControlMode,
    /// What the ControlNet reads from `image`.
    pub condition: ControlCondition,
}

/// The condition a ControlNet is fed, made from its unit's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlCondition {
    /// The image in 0..1 (every control type but inpaint).
    #[default]
    Image,
    /// An inpaint ControlNet's condition: the image in 0..1 with the pixels the request's mask
    /// repaints (>= 128, the mask's binarization) at -1. Needs a mask or outpainting.
    Inpaint,
}

impl ControlNetUnit {
    /// A unit over the whole schedule at scale 1, balanced.
    pub fn new(model: impl Into<String>, image: image::RgbImage) -> Self {
        Self {
            model: model.into(),
            image,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            mode: ControlMode::Balanced,
            condition: ControlCondition::Image,
        }
    }

    /// Whether the unit acts at step `i` of `total` (diffusers' `controlnet_keep`).
    pub fn active_at(&self, i: usize, total: usize) -> bool {
        let (i, total) = (i as f64, total as f64);
        !(i / total < self.start || (i + 1.0) / total > self.end)
    }
}

/// The request-level checks of the ControlNet units (the engine's limits; dialects check theirs
/// first).
pub fn check(units: &[ControlNetUnit]) -> Result<()> {
    if units.len() > MAX_CONTROLNETS {
        return Err(Error::invalid(format!(
            "at most {MAX_CONTROLNETS} ControlNets may be combined. Given: {}",
            units.len()
        )));
    }
    for unit in units {
        let id = &unit.model;
        if !unit.scale.is_finite() || unit.scale < 0.0 {
            return Err(Error::invalid(format!(
                "the scale of ControlNet `{id}` must be a finite number >= 0. Given: {}",
                unit.scale
            )));
        }
        if !(unit.start >= 0.0 && unit.start < unit.end && unit.end <= 1.0) {
            return Err(Error::invalid(format!(
                "ControlNet `{id}`: start and end must satisfy 0 <= start < end <= 1. Given: \
                 start {}, end {}",
                unit.start, unit.end
            )));
        }
        if unit.image.width() == 0 || unit.image.height() == 0 {
            return Err(Error::invalid(format!(
                "ControlNet `{id}`: the control image is empty"
            )));
        }
    }
    Ok(())
}

/// A unit ready for the loop: its model and its embedded control image.
pub(crate) struct PreparedControl<'a> {
    unit: &'a ControlNetUnit,
    net: &'a ControlNetModel,
    /// `[1, C0, h, w]`: the same for every row of the batch.
    embedding: Tensor,
}

/// Embeds each unit's condition at the output size (`width` x `height`). `canvas`: the request's
/// inpainting canvas, whose mask makes inpaint conditions and whose zoomed crop (if any) the
/// control images follow.
pub(crate) fn prepare<'a>(
    units: &'a [ControlNetUnit],
    nets: &'a [&'a ControlNetModel],
    width: usize,
    height: usize,
    needs_added_conditions: bool,
    canvas: Option<&Canvas>,
) -> Result<Vec<PreparedControl<'a>>> {
    if units.len() != nets.len() {
        return Err(Error::model(format!(
            "{} ControlNet units but {} loaded ControlNets, this is a bug",
            units.len(),
            nets.len()
        )));
    }
    units
        .iter()
        .zip(nets)
        .map(|(unit, &net)| {
            if net.needs_added_conditions() != needs_added_conditions {
                return Err(Error::invalid(format!(
                    "ControlNet `{}` is for {} models, this model is {}",
                    unit.model,
                    family_word(net.needs_added_conditions()),
                    family_word(needs_added_conditions)
                )));
            }
            let pixels = condition(unit, width, height, canvas, net.device())?;
            Ok(PreparedControl {
                unit,
                net,
                embedding: net.embed_condition(&pixels)?,
            })
        })
        .collect()
}

/// The `[1, 3, height, width]` condition of `unit`: its image resized to the output size (and
/// cropped to the canvas's zoomed region, resized back, as the seed image is), in 0..1, with the
/// canvas mask's repainted pixels at -1 for an inpaint condition.
fn condition(
    unit: &ControlNetUnit,
    width: usize,
    height: usize,
    canvas: Option<&Canvas>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let pixels = match canvas.and_then(Canvas::zoomed_region) {
        None => images::image_to_unit_tensor(&unit.image, width, height, device)?,
        Some(region) => {
            let (w, h) = (width as u32, height as u32);
            let whole = if unit.image.dimensions() == (w, h) {
                unit.image.clone()
            } else {
                imageops::resize(&unit.image, w, h, imageops::FilterType::Lanczos3)
            };
            let crop = imageops::crop_imm(&whole, region.x, region.y, region.width, region.height)
                .to_image();
            images::image_to_unit_tensor(&crop, width, height, device)?
        }
    };
    match unit.condition {
        ControlCondition::Image => Ok(pixels),
        ControlCondition::Inpaint => {
            let canvas = canvas.ok_or_else(|| missing_mask(&unit.model))?;
            // With m = 1 where repainted, 0 where kept: p * (1 - m) - m is p or -1, exactly.
            let mask = canvas.mask_tensor(device)?;
            let keep = mask.affine(-1.0, 1.0)?;
            Ok(pixels.broadcast_mul(&keep)?.broadcast_sub(&mask)?)
        }
    }
}

fn missing_mask(model: &str) -> Error {
    Error::invalid(format!(
        "ControlNet `{model}` reads an inpaint condition (the seed image with its repainted \
         pixels at -1): the request needs a seed image and a mask"
    ))
}

/// The request-level rule of inpaint conditions: they need a mask (or outpainting) to mark
/// the repainted pixels.
pub fn check_conditions(units: &[ControlNetUnit], has_mask: bool) -> Result<()> {
    match units
        .iter()
        .find(|u| u.condition == ControlCondition::Inpaint)
    {
        Some(unit) if !has_mask => Err(missing_mask(&unit.model)),
        _ => Ok(()),
    }
}

fn family_word(sdxl: bool) -> &'static str {
    if sdxl {
        "SDXL"
    } else {
        "SD 1.x/2.x"
    }
}

/// The conditional half of a guidance batch's added conditions.
fn cond_half(added: &AddedConditions, n: usize) -> Result<AddedConditions> {
    Ok(AddedConditions {
        text_embeds: added.text_embeds.narrow(0, n, n)?,
        time_ids: added.time_ids.narrow(0, n, n)?,
    })
}

/// The summed residuals of the units active at loop step `i` of `total`; None when none is.
///
/// `model_input`: the UNet's (scaled) latent input, `[2n]` rows when `guided` (uncond first),
/// without an inpainting UNet's extra channels. `hidden` / `added`: the batch's conditioning.
#[allow(clippy::too_many_arguments)]
pub(crate) fn residuals(
    controls: &[PreparedControl],
    i: usize,
    total: usize,
    model_input: &Tensor,
    timestep: f64,
    hidden: &Tensor,
    added: Option<&AddedConditions>,
    guided: bool,
    n: usize,
) -> Result<Option<ControlResiduals>> {
    let mut sum: Option<ControlResiduals> = None;
    for control in controls {
        let unit = control.unit;
        if !unit.active_at(i, total) {
            continue;
        }
        let ramp = unit.mode != ControlMode::Balanced;
        let r = if unit.mode == ControlMode::ControlNet && guided {
            let cond_added = added.map(|a| cond_half(a, n)).transpose()?;
            control
                .net
                .forward(
                    &model_input.narrow(0, n, n)?,
                    timestep,
                    &hidden.narrow(0, n, n)?,
                    cond_added.as_ref(),
                    &control.embedding,
                    unit.scale,
                    ramp,
                )?
                .with_zero_uncond()?
        } else {
            control.net.forward(
                model_input,
                timestep,
                hidden,
                added,
                &control.embedding,
                unit.scale,
                ramp,
            )?
        };
        sum = Some(match sum {
            Some(s) => s.add(&r)?,
            None => r,
        });
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_follows_diffusers() {
        // diffusers: keep = 1 - (i / len < start or (i + 1) / len > end).
        let mut unit = ControlNetUnit::new("x", image::RgbImage::new(8, 8));
        unit.start = 0.3;
        unit.end = 0.7;
        let active: Vec<bool> = (0..10).map(|i| unit.active_at(i, 10)).collect();
        assert_eq!(
            active,
            [false, false, false, true, true, true, true, false, false, false]
        );
        unit.start = 0.0;
        unit.end = 1.0;
        assert!((0..3).all(|i| unit.active_at(i, 3)));
    }

    #[test]
    fn check_refuses_bad_ranges() {
        let mut unit = ControlNetUnit::new("x", image::RgbImage::new(8, 8));
        assert!(check(std::slice::from_ref(&unit)).is_ok());
        unit.start = 0.5;
        unit.end = 0.5;
        let e = check(std::slice::from_ref(&unit)).unwrap_err().to_string();
        assert!(e.contains("start < end"), "{e}");
        unit.start = 0.0;
        unit.scale = f64::NAN;
        assert!(check(std::slice::from_ref(&unit)).is_err());
    }
}
