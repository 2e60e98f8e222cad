//! Latent consistency model sampling (Luo et al. 2023, "Latent Consistency Models: Synthesizing
//! High-Resolution Images with Few-Step Inference"), diffusers' `LCMScheduler`: each step maps the
//! sample to a consistency-function estimate of x0, then re-noises it to the next timestep with
//! fresh per-image noise (except after the last step).

use candle_core::Tensor;

use super::config::{BetaSchedule, ClassDefaults, TimestepSpacing};
use super::sigmas::{np_linspace, TrainSchedule};
use super::{
    alpha_add_noise, alpha_prediction_coefficients, at, step_noise, weighted_sum, BatchNoise,
    PredictionType, Scheduler, SchedulerConfig,
};
use crate::{Error, Result};

const LCM_DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::ScaledLinear,
    timestep_spacing: TimestepSpacing::Leading,
};

/// The boundary-condition data scale of the consistency parameterisation.
const SIGMA_DATA: f64 = 0.5;

pub struct Lcm {
    train: TrainSchedule,
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    prediction: PredictionType,
    clip_range: Option<f64>,
    timestep_scaling: f64,
}

impl Lcm {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported("LCMScheduler", &["thresholding"])?;
        let train = config.train_schedule(&LCM_DEFAULTS, false)?;
        let n = config.num_train();
        let original_steps = config.original_inference_steps.unwrap_or(50);
        if original_steps == 0 || original_steps > n {
            return Err(Error::Scheduler(format!(
                "LCMScheduler: original_inference_steps must be in 1..={n}. Given: {original_steps}"
            )));
        }
        if steps > original_steps {
            return Err(Error::Scheduler(format!(
                "LCM steps must be <= {original_steps} (the distillation schedule's length). Given: {steps}"
            )));
        }
        // The distillation schedule: every k-th training timestep, newest first; inference picks
        // evenly spaced entries of it.
        let k = (n / original_steps) as i64;
        let origin: Vec<i64> = (1..=original_steps as i64)
            .rev()
            .map(|i| i * k - 1)
            .collect();
        let int_timesteps: Vec<i64> = np_linspace(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|x| origin[x.floor() as usize])
            .collect();
        let clip_range = config
            .clip_sample
            .unwrap_or(false)
            .then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Self {
            train,
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            prediction: config.prediction(),
            clip_range,
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0),
        })
    }

    /// `(c_skip, c_out)` of the consistency boundary condition at timestep `t`.
    fn boundary_scalings(&self, t: i64) -> (f64, f64) {
        let scaled = t as f64 * self.timestep_scaling;
        let denom = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        (SIGMA_DATA * SIGMA_DATA / denom, scaled / denom.sqrt())
    }
}

impl Scheduler for Lcm {
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
        let is_last = step_index + 1 == self.int_timesteps.len();
        let prev_t = if is_last {
            t
        } else {
            self.int_timesteps[step_index + 1]
        };
        let alpha = self.train.alpha_cumprod(t)?;
        let alpha_prev = self.train.alpha_cumprod(prev_t)?;
        let (c_skip, c_out) = self.boundary_scalings(t);
        let [(xa, xb), _] = alpha_prediction_coefficients(self.prediction, alpha);
        let dtype = sample.dtype();
        let denoised = match self.clip_range {
            None => weighted_sum(
                &[(c_out * xa + c_skip, sample), (c_out * xb, model_output)],
                dtype,
            )?,
            Some(range) => {
                let x0 = weighted_sum(&[(xa, sample), (xb, model_output)], dtype)?
                    .clamp(-range, range)?;
                weighted_sum(&[(c_out, &x0), (c_skip, sample)], dtype)?
            }
        };
        if is_last {
            return Ok(denoised);
        }
        let fresh = step_noise(noise, model_output)?;
        weighted_sum(
            &[
                (alpha_prev.sqrt(), &denoised),
                ((1.0 - alpha_prev).sqrt(), &fresh),
            ],
            dtype,
        )
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = at(&self.int_timesteps, step_index, "timesteps")?;
        alpha_add_noise(&self.train, original, noise, t)
    }
}
