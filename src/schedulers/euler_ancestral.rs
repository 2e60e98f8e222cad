//! Euler ancestral sampler ("Euler a"; Karras et al. 2022 / k-diffusion `sample_euler_ancestral`):
//! an Euler step down to `sigma_down`, then fresh noise of level `sigma_up` added back, so that
//! the marginal at the next level is right. diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! The fresh noise comes from each image's own generator, continuing its stream, exactly as
//! diffusers draws it with a list of CPU generators, so a seed reproduces the same image.

use candle_core::Tensor;

use super::config::FinalSigmas;
use super::euler::SigmaSchedule;
use super::{step_noise, weighted_sum, BatchNoise, Scheduler, SchedulerConfig};
use crate::Result;

pub struct EulerAncestral {
    schedule: SigmaSchedule,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        // diffusers' ancestral class has no Karras or final-sigma options: plain interpolated
        // sigmas ending at zero.
        Ok(Self {
            schedule: SigmaSchedule::euler(config, steps, false, FinalSigmas::Zero)?,
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

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.schedule.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

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
