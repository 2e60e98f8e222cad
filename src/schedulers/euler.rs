//! Euler samplers over noise levels sigma (Karras et al. 2022, "Elucidating the Design Space of
//! Diffusion-Based Generative Models", Algorithm 2 without churn), as in k-diffusion:
//!
//! - Euler, diffusers' `EulerDiscreteScheduler`, optionally on Karras sigmas.
//! - Euler ancestral ("Euler a"; k-diffusion `sample_euler_ancestral`), diffusers'
//!   `EulerAncestralDiscreteScheduler`: an Euler step down to `sigma_down`, then fresh noise of
//!   level `sigma_up` added back, so that the marginal at the next level is right. The fresh noise
//!   comes from each image's own generator, continuing its stream, exactly as diffusers draws it
//!   with a list of CPU generators, so a seed reproduces the same image.

use candle_core::Tensor;

use super::config::{ClassDefaults, FinalSigmas, PredictionType, TimestepSpacing, DDPM_DEFAULTS};
use super::sigmas::{self, np_arange, np_linspace, np_round};
use super::{at, step_noise, weighted_sum, BatchNoise, Scheduler, SchedulerConfig};
use crate::{Error, Result};

/// The [`Scheduler`](super::Scheduler) methods every sampler over a [`SigmaSchedule`] answers
/// straight from it (its `schedule` field): timesteps, sigmas and the initial noise scale.
macro_rules! sigma_schedule_accessors {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.schedule.timesteps
        }

        fn sigmas(&self) -> Option<&[f64]> {
            Some(&self.schedule.sigmas)
        }

        fn init_noise_sigma(&self) -> f64 {
            self.schedule.init_noise_sigma
        }
    };
}
pub(crate) use sigma_schedule_accessors;

/// A sigma schedule in the k-diffusion parameterisation `x = x0 + sigma * noise`.
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One more than `timesteps`: the last is the level the final step lands on.
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
    pub prediction: PredictionType,
}

/// Inference timesteps of the Euler family (float32, possibly fractional later), per spacing.
pub(crate) fn euler_timesteps(
    config: &SchedulerConfig,
    defaults: &ClassDefaults,
    steps: usize,
) -> Vec<f64> {
    let n = config.num_train() as f64;
    let f32_round = |v: f64| f64::from(v as f32);
    match config.spacing(defaults) {
        TimestepSpacing::Linspace => np_linspace(0.0, n - 1.0, steps, true)
            .into_iter()
            .rev()
            .map(f32_round)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (config.num_train() / steps) as f64;
            let offset = config.offset() as f32;
            (0..steps)
                .rev()
                .map(|i| f64::from(np_round(i as f64 * ratio) as f32 + offset))
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(n, 0.0, -(n / steps as f64))
            .into_iter()
            .map(|t| f64::from(np_round(t) as f32 - 1.0))
            .collect(),
    }
}

impl SigmaSchedule {
    /// diffusers' `EulerDiscreteScheduler.set_timesteps`: training sigmas interpolated at the
    /// timesteps, or (`karras`) Karras sigmas between the end points mapped back to fractional
    /// timesteps; then the final level.
    pub fn euler(
        config: &SchedulerConfig,
        steps: usize,
        karras: bool,
        final_sigmas: FinalSigmas,
    ) -> Result<Self> {
        let defaults = DDPM_DEFAULTS;
        let train = config.train_schedule(&defaults, true)?;
        let train_sigmas = train.sigmas_f32();
        let mut timesteps = euler_timesteps(config, &defaults, steps);
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| sigmas::interp_unit_grid(t, &train_sigmas))
            .collect();
        if karras {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = sigmas::karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = sigmas::log_sigmas_f32(&train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigmas::sigma_to_t(s, &log_sigmas) as f32))
                .collect();
        }
        let sigmas = sigmas::with_final_sigma(sigmas, final_sigmas, &train_sigmas);
        let max_sigma = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
        let init_noise_sigma = match config.spacing(&defaults) {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: f64::from(init_noise_sigma),
            prediction: config.prediction(),
        })
    }

    pub fn sigma(&self, step_index: usize) -> Result<f64> {
        at(&self.sigmas, step_index, "sigma schedule")
    }

    /// Divides the sample by `sqrt(sigma^2 + 1)` (computed in float32 like diffusers' tensor).
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigma(step_index)? as f32;
        let scale = (sigma * sigma + 1.0).sqrt();
        weighted_sum(&[(1.0 / f64::from(scale), sample)], sample.dtype())
    }

    /// `x0 = a * sample + b * model_output` for the prediction type, at noise level `sigma`.
    pub fn data_prediction_coefficients(&self, sigma: f64) -> (f64, f64) {
        match self.prediction {
            PredictionType::Epsilon => (1.0, -sigma),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (1.0 / s2, -sigma / s2.sqrt())
            }
            PredictionType::Sample => (0.0, 1.0),
        }
    }

    /// The Euler move `x + (x - x0) / sigma * dt` as coefficients of sample and model output.
    pub fn euler_coefficients(&self, sigma: f64, dt: f64) -> (f64, f64) {
        let (a, b) = self.data_prediction_coefficients(sigma);
        (1.0 + (1.0 - a) * dt / sigma, -b * dt / sigma)
    }

    /// img2img: `original + sigma * noise` at the level of `step_index`.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        weighted_sum(&[(1.0, original), (sigma, noise)], original.dtype())
    }
}

/// `EulerDiscreteScheduler` (deterministic: no churn) or `EulerAncestralDiscreteScheduler`.
pub struct Euler {
    schedule: SigmaSchedule,
    ancestral: bool,
}

impl Euler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported(
            "EulerDiscreteScheduler",
            &[
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "interpolation_type",
                "timestep_type",
            ],
        )?;
        Ok(Self {
            schedule: SigmaSchedule::euler(
                config,
                steps,
                config.use_karras_sigmas.unwrap_or(false),
                config.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            )?,
            ancestral: false,
        })
    }

    pub fn ancestral(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if config.prediction() == PredictionType::Sample {
            return Err(Error::Scheduler(
                "EulerAncestralDiscreteScheduler: prediction_type must be epsilon or \
                 v_prediction. Given: sample"
                    .into(),
            ));
        }
        // diffusers' ancestral class has no Karras or final-sigma options: plain interpolated
        // sigmas ending at zero.
        Ok(Self {
            schedule: SigmaSchedule::euler(config, steps, false, FinalSigmas::Zero)?,
            ancestral: true,
        })
    }
}

/// The ancestral split of the move from `sigma` to `sigma_next`: (sigma_down, sigma_up).
fn ancestral_levels(sigma: f64, sigma_next: f64) -> (f64, f64) {
    let up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
        / (sigma * sigma))
        .sqrt();
    let down = (sigma_next * sigma_next - up * up).sqrt();
    (down, up)
}

impl Scheduler for Euler {
    sigma_schedule_accessors!();

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigma(step_index)?;
        let sigma_next = self.schedule.sigma(step_index + 1)?;
        if !self.ancestral {
            let (cx, cm) = self.schedule.euler_coefficients(sigma, sigma_next - sigma);
            return weighted_sum(&[(cx, sample), (cm, model_output)], sample.dtype());
        }
        let (sigma_down, sigma_up) = ancestral_levels(sigma, sigma_next);
        let (cx, cm) = self.schedule.euler_coefficients(sigma, sigma_down - sigma);
        let fresh = step_noise(noise, model_output)?;
        weighted_sum(
            &[(cx, sample), (cm, model_output), (sigma_up, &fresh)],
            sample.dtype(),
        )
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }
}

#[cfg(test)]
mod tests {
    use super::ancestral_levels;

    #[test]
    fn ancestral_split_preserves_variance() {
        let (down, up) = ancestral_levels(3.0, 1.5);
        assert!((down * down + up * up - 2.25).abs() < 1e-12);
        assert_eq!(ancestral_levels(3.0, 0.0), (0.0, 0.0));
    }
}
