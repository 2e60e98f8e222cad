//! DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2021), diffusers'
//! `DDIMScheduler`. Deterministic for eta = 0; eta > 0 adds per-image noise like DDPM.

use candle_core::Tensor;

use super::config::{ClassDefaults, TimestepSpacing, DDPM_DEFAULTS};
use super::sigmas::{np_arange, np_linspace, np_round, TrainSchedule};
use super::{
    alpha_add_noise, alpha_prediction_coefficients, at, step_noise, weighted_sum, BatchNoise,
    PredictionType, Scheduler, SchedulerConfig,
};
use crate::{Error, Result};

const DDIM_DEFAULTS: ClassDefaults = ClassDefaults {
    timestep_spacing: TimestepSpacing::Leading,
    ..DDPM_DEFAULTS
};

/// Integer timesteps of DDIM per spacing rule.
pub(crate) fn ddim_timesteps(
    config: &SchedulerConfig,
    spacing: TimestepSpacing,
    steps: usize,
) -> Vec<i64> {
    let n = config.num_train();
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps, true)
            .into_iter()
            .rev()
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (n / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| i * ratio + config.offset())
                .collect()
        }
        // numpy's float arange yields one extra point (~0, hence timestep -1) for some step
        // counts (61, 103, ...); diffusers would then read the schedule from its far end, so that
        // point is dropped.
        TimestepSpacing::Trailing => np_arange(n as f64, 0.0, -(n as f64 / steps as f64))
            .into_iter()
            .map(|t| np_round(t) as i64 - 1)
            .filter(|&t| t >= 0)
            .collect(),
    }
}

pub struct Ddim {
    train: TrainSchedule,
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    /// diffusers steps back by a fixed stride `num_train / steps`, whatever the spacing.
    stride: i64,
    final_alpha_cumprod: f64,
    prediction: PredictionType,
    clip_range: Option<f64>,
    eta: f64,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize, eta: f64) -> Result<Self> {
        config.reject_unsupported("DDIMScheduler", &["thresholding"])?;
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::Scheduler(format!(
                "DDIM eta must be a finite number >= 0. Given: {eta}"
            )));
        }
        let train = config.train_schedule(&DDIM_DEFAULTS, false)?;
        let int_timesteps = ddim_timesteps(config, config.spacing(&DDIM_DEFAULTS), steps);
        for &t in &int_timesteps {
            train.alpha_cumprod(t)?;
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        let clip_range = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Self {
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            stride: (config.num_train() / steps) as i64,
            train,
            final_alpha_cumprod,
            prediction: config.prediction(),
            clip_range,
            eta,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let t = at(&self.int_timesteps, step_index, "timesteps")?;
        let prev_t = t - self.stride;
        let alpha = self.train.alpha_cumprod(t)?;
        let alpha_prev = if prev_t >= 0 {
            self.train.alpha_cumprod(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let [(xa, xb), (ea, eb)] = alpha_prediction_coefficients(self.prediction, alpha);
        // DDIM eq. 16: sigma_t = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)).
        let variance = (1.0 - alpha_prev) / (1.0 - alpha) * (1.0 - alpha / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let keep = alpha_prev.sqrt();
        let dtype = sample.dtype();
        let mut prev = match self.clip_range {
            None => weighted_sum(
                &[
                    (keep * xa + direction * ea, sample),
                    (keep * xb + direction * eb, model_output),
                ],
                dtype,
            )?,
            Some(range) => {
                // Clipping x0 is not linear, so x0 is materialised; the noise direction still
                // uses the unclipped prediction, as diffusers does by default.
                let x0 = weighted_sum(&[(xa, sample), (xb, model_output)], dtype)?
                    .clamp(-range, range)?;
                weighted_sum(
                    &[
                        (keep, &x0),
                        (direction * ea, sample),
                        (direction * eb, model_output),
                    ],
                    dtype,
                )?
            }
        };
        if self.eta > 0.0 {
            let fresh = step_noise(noise, model_output)?;
            prev = weighted_sum(&[(1.0, &prev), (std_dev, &fresh)], dtype)?;
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = at(&self.int_timesteps, step_index, "timesteps")?;
        alpha_add_noise(&self.train, original, noise, t)
    }
}
