//! DPM-Solver-2 in k-diffusion's form (Karras et al. 2022, "Elucidating the Design Space of
//! Diffusion-Based Generative Models", Algorithm 2 with the midpoint rule of Lu et al. 2022,
//! "DPM-Solver"): an Euler half-step to the geometric midpoint of two noise levels, a second model
//! evaluation there, and the full step taken with the midpoint's slope.
//!
//! - "DPM2", diffusers' `KDPM2DiscreteScheduler`.
//! - "DPM2 a", diffusers' `KDPM2AncestralDiscreteScheduler` (k-diffusion
//!   `sample_dpm_2_ancestral`): the full step ends at `sigma_down` and fresh noise of level
//!   `sigma_up` is added, drawn from each image's own generator exactly where diffusers draws it
//!   (the second evaluation of every step but the last).
//!
//! As for Heun, every model evaluation is a listed timestep and `order()` is 2.

use candle_core::Tensor;

use super::config::PredictionType;
use super::euler::{sigma_schedule_accessors, SigmaSchedule};
use super::heun::{
    init_noise_sigma, interleaved, scale_at_sigma, second_without_first, slope, StepSigmas,
};
use super::{at, step_noise, weighted_sum, BatchNoise, Scheduler, SchedulerConfig};
use crate::{Error, Result};

/// The levels of step k: it starts at `sigmas[2k]` of the schedule, evaluates the model again at
/// `mid[k]`, ends at `end[k]` and adds `up[k]` of fresh noise.
struct StepLevels {
    mid: Vec<f64>,
    end: Vec<f64>,
    up: Vec<f64>,
}

/// `KDPM2DiscreteScheduler` or `KDPM2AncestralDiscreteScheduler`.
pub struct Kdpm2 {
    schedule: SigmaSchedule,
    levels: StepLevels,
    ancestral: bool,
    /// The sample a step started from, between its two evaluations.
    first_sample: Option<Tensor>,
}

/// `exp(lerp(ln a, ln b, 0.5))` in f32 as torch evaluates it (its lerp at weight 0.5 is
/// `b - (b - a) * 0.5`): the geometric mean; 0 when `a` is 0 (NaN when only `b` is, a value
/// diffusers never reads).
fn log_midpoint(a: f64, b: f64) -> f64 {
    let (la, lb) = ((a as f32).ln(), (b as f32).ln());
    f64::from((lb - (lb - la) * 0.5).exp())
}

/// diffusers' sigma -> timestep map as KDPM2 evaluates it for the midpoint levels, on float32
/// tensors: log-sigma interpolation between the neighbouring training timesteps, every operation
/// rounded to f32 (near t = 0 this decides whether the timestep is exactly 0).
fn sigma_to_t_f32(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = (sigma as f32).max(1e-10).ln();
    let logs: Vec<f32> = log_sigmas.iter().map(|&l| l as f32).collect();
    let at_or_below = logs.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low = at_or_below.saturating_sub(1).min(logs.len() - 2);
    let w = ((logs[low] - log_sigma) / (logs[low] - logs[low + 1])).clamp(0.0, 1.0);
    f64::from((1.0 - w) * low as f32 + w * (low + 1) as f32)
}

impl Kdpm2 {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::build(config, steps, false)
    }

    pub fn ancestral(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::build(config, steps, true)
    }

    fn build(config: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self> {
        let class = if ancestral {
            "KDPM2AncestralDiscreteScheduler"
        } else {
            "KDPM2DiscreteScheduler"
        };
        if config.prediction() == PredictionType::Sample {
            return Err(Error::Scheduler(format!(
                "{class}: prediction_type `sample` is not supported (diffusers does not implement it)"
            )));
        }
        let step_sigmas = StepSigmas::new(class, config, steps, true)?;
        let karras = config.use_karras_sigmas.unwrap_or(false);
        // Karras timesteps are rounded to integers; the others are float32.
        let timesteps: Vec<f64> = step_sigmas
            .timesteps
            .iter()
            .map(|&t| if karras { t.round_ties_even() } else { t })
            .collect();
        // s_0 .. s_{N-1}, 0 as f32 values.
        let s = step_sigmas.with_final_zero();
        let n = steps;
        let (mid, end, up): (Vec<f64>, Vec<f64>, Vec<f64>) = if ancestral {
            // Per level i: split the move to s_{i+1} into a deterministic part down to
            // sigma_down and fresh noise of sigma_up (computed in f32 like diffusers' tensors).
            let (mut ups, mut downs) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for k in 0..n {
                let (sk, next) = (s[k] as f32, s[k + 1] as f32);
                let up = (next * next * (sk * sk - next * next) / (sk * sk)).sqrt();
                ups.push(f64::from(up));
                downs.push(f64::from((next * next - up * up).sqrt()));
            }
            let mut mids: Vec<f64> = (0..n).map(|k| log_midpoint(s[k], downs[k])).collect();
            // diffusers zeroes the last midpoint: the final step is a plain Euler step to 0.
            mids[n - 1] = 0.0;
            (mids, downs, ups)
        } else {
            let mids = (0..n).map(|k| log_midpoint(s[k + 1], s[k])).collect();
            (mids, s[1..].to_vec(), vec![0.0; n])
        };

        // Each step's first evaluation at its own timestep, the second at the midpoint's.
        let mut listed = Vec::with_capacity(2 * n - 1);
        listed.push(timesteps[0]);
        for k in 1..n {
            // The ancestral class pairs step k's timestep with step k-1's midpoint, the plain one
            // with the midpoint between levels k-1 and k (its own step k-1); both are the second
            // evaluation of step k-1.
            listed.push(sigma_to_t_f32(mid[k - 1], &step_sigmas.log_sigmas));
            listed.push(timesteps[k]);
        }
        let sigmas = interleaved(&s, s.len());
        Ok(Self {
            schedule: SigmaSchedule {
                timesteps: listed,
                init_noise_sigma: init_noise_sigma(&sigmas, step_sigmas.spacing),
                sigmas,
                prediction: config.prediction(),
            },
            levels: StepLevels { mid, end, up },
            ancestral,
            first_sample: None,
        })
    }
}

impl Scheduler for Kdpm2 {
    sigma_schedule_accessors!();

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        if step_index.is_multiple_of(2) {
            self.schedule.scale_model_input(sample, step_index)
        } else {
            scale_at_sigma(
                sample,
                at(&self.levels.mid, step_index / 2, "midpoint levels")?,
            )
        }
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let k = step_index / 2;
        let sigma = self.schedule.sigma(2 * k)?;
        let mid = at(&self.levels.mid, k, "midpoint levels")?;
        if step_index.is_multiple_of(2) {
            // Euler half-step to the midpoint.
            let slope = slope(&self.schedule, model_output, sample, sigma, None)?;
            let prev = weighted_sum(&[(1.0, sample), (mid - sigma, &slope)], sample.dtype())?;
            self.first_sample = Some(sample.clone());
            return Ok(prev);
        }
        let start = self
            .first_sample
            .take()
            .ok_or_else(|| second_without_first(step_index))?;
        // The whole step from its start with the slope at the midpoint.
        let end = at(&self.levels.end, k, "step levels")?;
        let slope = slope(&self.schedule, model_output, sample, mid, None)?;
        let mut terms = vec![(1.0, &start), (end - sigma, &slope)];
        let fresh;
        if self.ancestral {
            fresh = step_noise(noise, model_output)?;
            terms.push((at(&self.levels.up, k, "step levels")?, &fresh));
        }
        weighted_sum(&terms, sample.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }

    fn order(&self) -> usize {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{build, SchedulerKind, SchedulerSpec};

    #[test]
    fn parses_dpm2_names() {
        let cases: &[(&str, SchedulerKind, Option<bool>)] = &[
            ("DPM2", SchedulerKind::Kdpm2, Some(false)),
            ("k_dpm_2", SchedulerKind::Kdpm2, Some(false)),
            ("DPM2 Karras", SchedulerKind::Kdpm2, Some(true)),
            ("KDPM2DiscreteScheduler", SchedulerKind::Kdpm2, None),
            ("DPM2 a", SchedulerKind::Kdpm2Ancestral, Some(false)),
            ("k_dpm_2_a", SchedulerKind::Kdpm2Ancestral, Some(false)),
            (
                "dpm_2_ancestral",
                SchedulerKind::Kdpm2Ancestral,
                Some(false),
            ),
            ("DPM2 a Karras", SchedulerKind::Kdpm2Ancestral, Some(true)),
            (
                "KDPM2AncestralDiscreteScheduler",
                SchedulerKind::Kdpm2Ancestral,
                None,
            ),
        ];
        for &(name, kind, karras) in cases {
            let spec = SchedulerSpec::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.kind, kind, "{name}");
            assert_eq!(spec.overrides.use_karras_sigmas, karras, "{name}");
        }
    }

    #[test]
    fn midpoint_is_the_geometric_mean() {
        assert!((log_midpoint(4.0, 1.0) - 2.0).abs() < 1e-6);
        assert_eq!(log_midpoint(0.0, 3.0), 0.0);
    }

    #[test]
    fn sample_prediction_is_refused() {
        let cfg = SchedulerConfig {
            prediction_type: Some(PredictionType::Sample),
            ..Default::default()
        };
        for kind in [SchedulerKind::Kdpm2, SchedulerKind::Kdpm2Ancestral] {
            let err = build(&SchedulerSpec::new(kind), &cfg, 5).err().unwrap();
            assert!(err.to_string().contains("sample"), "{err}");
        }
    }

    #[test]
    fn one_step_schedules_have_one_evaluation() {
        for kind in [SchedulerKind::Kdpm2, SchedulerKind::Kdpm2Ancestral] {
            let s = build(&SchedulerSpec::new(kind), &SchedulerConfig::default(), 1).unwrap();
            // numpy's one-point linspace is its start: the single step runs at t = 0.
            assert_eq!(s.timesteps(), &[0.0]);
            assert_eq!(s.order(), 2);
        }
    }
}
