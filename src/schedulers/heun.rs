//! Heun's second-order sampler (Karras et al. 2022, "Elucidating the Design Space of
//! Diffusion-Based Generative Models", Algorithm 1), diffusers' `HeunDiscreteScheduler`: an Euler
//! step to the next noise level, then a second model evaluation there and the step redone with the
//! mean of the two slopes.
//!
//! diffusers lists every model evaluation of these two-evaluation samplers as a timestep (the
//! second one of each step repeats the next level's timestep), and so do we: `step` is called once
//! per listed timestep and carries the first half's state into the second. `order()` is 2, so
//! img2img starts at `t_start * 2` as diffusers does. The sigma tables shared with the other
//! k-diffusion ports (KDPM2, DPM-Solver SDE) live here too.

use candle_core::{DType, Tensor};

use super::config::{BetaSchedule, ClassDefaults, FinalSigmas, TimestepSpacing};
use super::euler::{euler_timesteps, sigma_schedule_accessors, SigmaSchedule};
use super::sigmas::{self, interp_unit_grid, np_linspace};
use super::{weighted_sum, BatchNoise, Scheduler, SchedulerConfig};
use crate::{Error, Result};

/// diffusers' defaults of its k-diffusion ports (Heun, KDPM2, KDPM2 ancestral, DPM-Solver SDE).
pub(crate) const K_DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::Linear,
    timestep_spacing: TimestepSpacing::Linspace,
};

/// One noise level per step, before the second evaluations are interleaved.
pub(crate) struct StepSigmas {
    /// The model timestep of each step's first evaluation, as numpy computes it (f64).
    pub timesteps: Vec<f64>,
    /// Each step's noise level as numpy computes it (f64; diffusers stores them as f32 later).
    pub sigmas: Vec<f64>,
    /// Logs of the training sigmas (f32 values), to map a level back to a timestep.
    pub log_sigmas: Vec<f64>,
    pub spacing: TimestepSpacing,
}

impl StepSigmas {
    /// The levels of `steps` steps: training sigmas interpolated at the spaced timesteps, or
    /// (`use_karras_sigmas`) Karras levels between the end points mapped back to fractional
    /// timesteps. `f32_timesteps`: the class computes its linspace grid in float32.
    pub fn new(
        class: &str,
        config: &SchedulerConfig,
        steps: usize,
        f32_timesteps: bool,
    ) -> Result<Self> {
        config.reject_unsupported(class, &["use_exponential_sigmas", "use_beta_sigmas"])?;
        if steps == 0 || steps > config.num_train() {
            return Err(Error::Scheduler(format!(
                "{class}: num_inference_steps must be in 1..={}. Given: {steps}",
                config.num_train()
            )));
        }
        // These classes have no zero-SNR option: the betas are used as given.
        let mut plain = config.clone();
        plain.rescale_betas_zero_snr = None;
        let train_sigmas = plain.train_schedule(&K_DEFAULTS, false)?.sigmas_f32();
        let spacing = config.spacing(&K_DEFAULTS);
        let mut timesteps = match spacing {
            TimestepSpacing::Linspace if !f32_timesteps => {
                np_linspace(0.0, config.num_train() as f64 - 1.0, steps, true)
                    .into_iter()
                    .rev()
                    .collect()
            }
            _ => euler_timesteps(config, &K_DEFAULTS, steps),
        };
        let mut levels: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp_unit_grid(t, &train_sigmas))
            .collect();
        let log_sigmas = sigmas::log_sigmas_f32(&train_sigmas);
        // None of these classes reads sigma_min / sigma_max from its config.
        if config.use_karras_sigmas.unwrap_or(false) {
            levels = sigmas::karras_sigmas(levels[levels.len() - 1], levels[0], steps);
            timesteps = levels
                .iter()
                .map(|&s| sigmas::sigma_to_t(s, &log_sigmas))
                .collect();
        }
        Ok(Self {
            timesteps,
            sigmas: levels,
            log_sigmas,
            spacing,
        })
    }

    /// The levels as diffusers stores them: f32, followed by the final zero.
    pub fn with_final_zero(&self) -> Vec<f64> {
        sigmas::with_final_sigma(self.sigmas.clone(), FinalSigmas::Zero, &[])
    }
}

/// `values[0]`, then each of `values[1..end]` twice, then the last value: diffusers' layout of
/// per-evaluation tables for the two-evaluation samplers.
pub(crate) fn interleaved(values: &[f64], end: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(2 * values.len());
    out.extend(values.first());
    for &v in &values[1..end] {
        out.extend([v, v]);
    }
    out.extend(values.last());
    out
}

/// The initial noise scale of the sigma samplers: the largest level, or `sqrt(max^2 + 1)` with
/// "leading" spacing (computed in f32 like diffusers' tensor).
pub(crate) fn init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
    f64::from(match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    })
}

/// Divides the sample by `sqrt(sigma^2 + 1)` (in f32 like diffusers' tensor).
pub(crate) fn scale_at_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    let sigma = sigma as f32;
    let scale = (sigma * sigma + 1.0).sqrt();
    weighted_sum(&[(1.0 / f64::from(scale), sample)], sample.dtype())
}

/// The dtype intermediate tensors are kept in: f32 for half-precision samples.
pub(crate) fn working_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// The ODE slope `(sample - x0) / sigma` at noise level `sigma`, x0 read from the model output
/// at that level and clamped to `clip` if given, in the working dtype.
pub(crate) fn slope(
    schedule: &SigmaSchedule,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
    clip: Option<f64>,
) -> Result<Tensor> {
    let dtype = working_dtype(sample.dtype());
    let (a, b) = schedule.data_prediction_coefficients(sigma);
    match clip {
        None => weighted_sum(
            &[((1.0 - a) / sigma, sample), (-b / sigma, model_output)],
            dtype,
        ),
        Some(range) => {
            let x0 =
                weighted_sum(&[(a, sample), (b, model_output)], dtype)?.clamp(-range, range)?;
            weighted_sum(&[(1.0 / sigma, sample), (-1.0 / sigma, &x0)], dtype)
        }
    }
}

/// What the first evaluation of a step leaves for the second.
struct FirstHalf {
    sample: Tensor,
    slope: Tensor,
    dt: f64,
}

/// `HeunDiscreteScheduler`.
pub struct Heun {
    schedule: SigmaSchedule,
    clip: Option<f64>,
    first_half: Option<FirstHalf>,
}

impl Heun {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let step_sigmas = StepSigmas::new("HeunDiscreteScheduler", config, steps, true)?;
        // The model gets float32 timesteps (Karras ones stay fractional).
        let timesteps: Vec<f64> = step_sigmas
            .timesteps
            .iter()
            .map(|&t| f64::from(t as f32))
            .collect();
        let all = step_sigmas.with_final_zero();
        let sigmas = interleaved(&all, all.len() - 1);
        let clip = config
            .clip_sample
            .unwrap_or(false)
            .then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Self {
            schedule: SigmaSchedule {
                timesteps: interleaved(&timesteps, timesteps.len())[..2 * steps - 1].to_vec(),
                init_noise_sigma: init_noise_sigma(&sigmas, step_sigmas.spacing),
                sigmas,
                prediction: config.prediction(),
            },
            clip,
            first_half: None,
        })
    }
}

impl Scheduler for Heun {
    sigma_schedule_accessors!();

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigma(step_index)?;
        if step_index.is_multiple_of(2) {
            // Euler step to the next level; the slope is kept for the correction.
            let sigma_next = self.schedule.sigma(step_index + 1)?;
            let slope = slope(&self.schedule, model_output, sample, sigma, self.clip)?;
            let dt = sigma_next - sigma;
            let prev = weighted_sum(&[(1.0, sample), (dt, &slope)], sample.dtype())?;
            self.first_half = Some(FirstHalf {
                sample: sample.clone(),
                slope,
                dt,
            });
            return Ok(prev);
        }
        // Second evaluation, at the level the Euler step reached: redo the step from the same
        // start with the mean of both slopes.
        let first = self
            .first_half
            .take()
            .ok_or_else(|| second_without_first(step_index))?;
        let slope = slope(&self.schedule, model_output, sample, sigma, self.clip)?;
        let half = first.dt / 2.0;
        weighted_sum(
            &[(1.0, &first.sample), (half, &first.slope), (half, &slope)],
            sample.dtype(),
        )
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }

    fn order(&self) -> usize {
        2
    }
}

/// The error for a step's second evaluation whose first was not run (a schedule entered at an
/// odd index).
pub(crate) fn second_without_first(step_index: usize) -> Error {
    Error::Scheduler(format!(
        "step index {step_index} is the second evaluation of a step whose first was not run \
         (two-evaluation samplers start at an even index)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{build, PredictionType, SchedulerKind, SchedulerSpec};
    use candle_core::Device;

    #[test]
    fn interleaves_every_inner_value() {
        assert_eq!(
            interleaved(&[3.0, 2.0, 1.0, 0.0], 3),
            vec![3.0, 2.0, 2.0, 1.0, 1.0, 0.0]
        );
        assert_eq!(
            interleaved(&[3.0, 2.0, 0.0], 3),
            vec![3.0, 2.0, 2.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn parses_heun_names() {
        for name in ["Heun", "k_heun", "HeunDiscreteScheduler", "heun discrete"] {
            let spec = SchedulerSpec::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.kind, SchedulerKind::Heun, "{name}");
        }
        let karras = SchedulerSpec::parse("Heun Karras").unwrap();
        assert_eq!(karras.overrides.use_karras_sigmas, Some(true));
    }

    #[test]
    fn lists_every_evaluation_and_has_order_two() {
        let spec = SchedulerSpec::new(SchedulerKind::Heun);
        let s = build(&spec, &SchedulerConfig::default(), 4).unwrap();
        assert_eq!(s.order(), 2);
        assert_eq!(
            s.timesteps(),
            &[999.0, 666.0, 666.0, 333.0, 333.0, 0.0, 0.0]
        );
        let sigmas = s.sigmas().unwrap();
        assert_eq!(sigmas.len(), 8);
        assert_eq!(sigmas[1], sigmas[2]);
        assert_eq!(sigmas[7], 0.0);
    }

    #[test]
    fn second_evaluation_needs_the_first() {
        let spec = SchedulerSpec::new(SchedulerKind::Heun);
        let mut s = build(&spec, &SchedulerConfig::default(), 4).unwrap();
        let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let mut noise = BatchNoise::from_seeds(&[0]);
        assert!(matches!(
            s.step(&x, 1, &x, &mut noise),
            Err(Error::Scheduler(_))
        ));
        assert!(s.step(&x, 2, &x, &mut noise).is_ok());
        assert!(s.step(&x, 3, &x, &mut noise).is_ok());
    }

    #[test]
    fn heun_reads_sample_predictions() {
        let cfg = SchedulerConfig {
            prediction_type: Some(PredictionType::Sample),
            ..Default::default()
        };
        assert!(build(&SchedulerSpec::new(SchedulerKind::Heun), &cfg, 5).is_ok());
    }
}
