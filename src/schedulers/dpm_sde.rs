//! "DPM++ SDE": the stochastic second-order singlestep DPM-Solver++ of k-diffusion
//! (`sample_dpmpp_sde`, after Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models"), diffusers' `DPMSolverSDEScheduler`. Each step takes an
//! ancestral DPM-Solver++(1) half-step to the midpoint of `t = -ln sigma`, evaluates the model
//! there, and redoes the whole step from its start with the midpoint's data prediction, adding
//! Brownian noise in both halves.
//!
//! The noise is the increment of one Brownian path over the noise levels, so the two halves of a
//! step see correlated noise. diffusers draws it from a torchsde Brownian tree seeded
//! independently of the pipeline's generators, which no seed reproduces; here the path comes from
//! an [`SdeNoise`]: by default [`BrownianNoise`], a path per image drawn from that image's own
//! generator, so a seed still gives the same image whatever the batch.
//!
//! As for Heun, both evaluations of a step are listed timesteps and `order()` is 2.

use candle_core::{DType, Tensor};

use super::config::PredictionType;
use super::euler::{sigma_schedule_accessors, SigmaSchedule};
use super::heun::{
    init_noise_sigma, interleaved, scale_at_sigma, second_without_first, StepSigmas,
};
use super::sigmas::sigma_to_t;
use super::{step_noise, weighted_sum, BatchNoise, Scheduler, SchedulerConfig};
use crate::{Error, Result};

/// The Brownian increments of the SDE solver.
pub trait SdeNoise: Send {
    /// `(W(sigma_next) - W(sigma)) / sqrt(|sigma - sigma_next|)` for a Brownian motion W indexed
    /// by noise level, one path per image: unit variance, f32, shaped like `like` (`[B, ...]`).
    /// Calls on overlapping intervals must agree with one path. `noise` holds the images'
    /// generators, for sources that draw from them.
    fn increment(
        &mut self,
        sigma: f64,
        sigma_next: f64,
        like: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor>;
}

/// A Brownian path per image, built on demand from that image's generator: the first level
/// asked for is the origin, a level beyond the known ones extends the path by an independent
/// Gaussian step, and a level between two known ones is drawn from the Brownian bridge between
/// them. So every query, in any order, is consistent with one path, as a Brownian tree is.
#[derive(Default)]
pub struct BrownianNoise {
    /// Known points of the path, by increasing level.
    points: Vec<(f64, Tensor)>,
}

impl BrownianNoise {
    pub fn new() -> Self {
        Self::default()
    }

    fn value_at(&mut self, level: f64, like: &Tensor, noise: &mut BatchNoise) -> Result<Tensor> {
        let pos = match self
            .points
            .binary_search_by(|(known, _)| known.total_cmp(&level))
        {
            Ok(found) => return Ok(self.points[found].1.clone()),
            Err(pos) => pos,
        };
        let value = if self.points.is_empty() {
            Tensor::zeros(like.shape(), DType::F32, like.device())?
        } else {
            let z = step_noise(noise, like)?;
            if pos == 0 || pos == self.points.len() {
                let (known, w) = &self.points[pos.min(self.points.len() - 1)];
                weighted_sum(&[(1.0, w), ((level - known).abs().sqrt(), &z)], w.dtype())?
            } else {
                let (lo, w_lo) = &self.points[pos - 1];
                let (hi, w_hi) = &self.points[pos];
                let frac = (level - lo) / (hi - lo);
                let std = ((level - lo) * (hi - level) / (hi - lo)).sqrt();
                weighted_sum(&[(1.0 - frac, w_lo), (frac, w_hi), (std, &z)], w_lo.dtype())?
            }
        };
        self.points.insert(pos, (level, value.clone()));
        Ok(value)
    }
}

impl SdeNoise for BrownianNoise {
    fn increment(
        &mut self,
        sigma: f64,
        sigma_next: f64,
        like: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let span = (sigma - sigma_next).abs();
        if span.is_nan() || span == 0.0 {
            return Err(Error::Scheduler(format!(
                "a Brownian increment needs two different noise levels, got {sigma} and {sigma_next}"
            )));
        }
        let from = self.value_at(sigma, like, noise)?;
        let to = self.value_at(sigma_next, like, noise)?;
        weighted_sum(
            &[(1.0 / span.sqrt(), &to), (-1.0 / span.sqrt(), &from)],
            from.dtype(),
        )
    }
}

/// `DPMSolverSDEScheduler`.
pub struct DpmSolverSde {
    schedule: SigmaSchedule,
    noise_source: Box<dyn SdeNoise>,
    /// The sample a step started from, between its two evaluations.
    first_sample: Option<Tensor>,
}

/// `exp(-t)` of `t = -ln sigma` in f32, as diffusers round-trips every level.
fn via_t(sigma: f32) -> f32 {
    (-(-sigma.ln())).exp()
}

/// The level halfway between `sigma` and `sigma_next` in `t = -ln sigma` (in f32 like diffusers).
fn midpoint_level(sigma: f64, sigma_next: f64) -> f64 {
    let t = -(sigma as f32).ln();
    let t_next = -(sigma_next as f32).ln();
    f64::from((-(t + (t_next - t) * 0.5)).exp())
}

impl DpmSolverSde {
    /// The solver with [`BrownianNoise`].
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::with_noise(config, steps, Box::new(BrownianNoise::new()))
    }

    /// The solver drawing its Brownian increments from `noise_source`.
    pub fn with_noise(
        config: &SchedulerConfig,
        steps: usize,
        noise_source: Box<dyn SdeNoise>,
    ) -> Result<Self> {
        let class = "DPMSolverSDEScheduler";
        if config.prediction() == PredictionType::Sample {
            return Err(Error::Scheduler(format!(
                "{class}: prediction_type `sample` is not supported (diffusers does not implement it)"
            )));
        }
        let step_sigmas = StepSigmas::new(class, config, steps, false)?;
        // The second evaluation of step k runs at the timestep of the midpoint level (f64).
        let mut listed = Vec::with_capacity(2 * steps - 1);
        listed.push(step_sigmas.timesteps[0]);
        for k in 1..steps {
            let (s, s_next) = (step_sigmas.sigmas[k - 1], step_sigmas.sigmas[k]);
            let (t, t_next) = (-s.ln(), -s_next.ln());
            let mid = (-(t + (t_next - t) * 0.5)).exp();
            listed.push(sigma_to_t(mid, &step_sigmas.log_sigmas));
            listed.push(step_sigmas.timesteps[k]);
        }
        let all = step_sigmas.with_final_zero();
        let sigmas = interleaved(&all, all.len() - 1);
        Ok(Self {
            schedule: SigmaSchedule {
                timesteps: listed,
                init_noise_sigma: init_noise_sigma(&sigmas, step_sigmas.spacing),
                sigmas,
                prediction: config.prediction(),
            },
            noise_source,
            first_sample: None,
        })
    }
}

impl Scheduler for DpmSolverSde {
    sigma_schedule_accessors!();

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        if step_index.is_multiple_of(2) {
            return self.schedule.scale_model_input(sample, step_index);
        }
        let sigma = self.schedule.sigma(step_index - 1)?;
        let sigma_next = self.schedule.sigma(step_index)?;
        scale_at_sigma(sample, midpoint_level(sigma, sigma_next))
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let first = step_index.is_multiple_of(2);
        let start_index = step_index - step_index % 2;
        let sigma = self.schedule.sigma(start_index)?;
        let sigma_next = self.schedule.sigma(start_index + 1)?;
        let mid = midpoint_level(sigma, sigma_next);
        if first && sigma_next == 0.0 {
            // The last step: an Euler step to zero, which lands on the data prediction.
            let (cx, cm) = self.schedule.euler_coefficients(sigma, -sigma);
            return weighted_sum(&[(cx, sample), (cm, model_output)], sample.dtype());
        }
        let (start, target, sigma_input) = if first {
            self.first_sample = Some(sample.clone());
            (sample.clone(), mid as f32, sigma)
        } else {
            let start = self
                .first_sample
                .take()
                .ok_or_else(|| second_without_first(step_index))?;
            (start, via_t(sigma_next as f32), mid)
        };
        // Ancestral DPM-Solver++(1) from `sigma` towards `target`: deterministic down to
        // sigma_down, Brownian noise of sigma_up (f32 scalars as diffusers computes them).
        let from = via_t(sigma as f32);
        let up =
            target.min((target * target * (from * from - target * target) / (from * from)).sqrt());
        let down = (target * target - up * up).sqrt();
        let (t, t_down) = (-(sigma as f32).ln(), -down.ln());
        let keep = f64::from(via_t(down) / from);
        let toward_x0 = -f64::from((t - t_down).exp_m1());
        let (a, b) = self.schedule.data_prediction_coefficients(sigma_input);
        let z =
            self.noise_source
                .increment(f64::from(from), f64::from(target), model_output, noise)?;
        weighted_sum(
            &[
                (keep, &start),
                (toward_x0 * a, sample),
                (toward_x0 * b, model_output),
                (f64::from(up), &z),
            ],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{SchedulerKind, SchedulerSpec};
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn parses_sde_names() {
        for (name, karras) in [
            ("DPM++ SDE", Some(false)),
            ("dpmpp_sde", Some(false)),
            ("k_dpmpp_sde", Some(false)),
            ("DPM++ SDE Karras", Some(true)),
            ("dpmpp_sde_gpu", Some(false)),
            ("DPMSolverSDEScheduler", None),
            ("DPMSolverSDE", None),
        ] {
            let spec = SchedulerSpec::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.kind, SchedulerKind::DpmSolverSde, "{name}");
            assert_eq!(spec.overrides.use_karras_sigmas, karras, "{name}");
        }
    }

    #[test]
    fn brownian_increments_agree_with_one_path() {
        let like = Tensor::zeros((2, 4096), DType::F32, &Device::Cpu).unwrap();
        let mut noise = BatchNoise::from_seeds(&[3, 4]);
        let mut path = BrownianNoise::new();
        // W(1) - W(4) queried whole, then in pieces, one of them inside the known range.
        let whole = path.increment(4.0, 1.0, &like, &mut noise).unwrap();
        let upper = path.increment(4.0, 2.0, &like, &mut noise).unwrap();
        let lower = path.increment(2.0, 1.0, &like, &mut noise).unwrap();
        let (whole, upper, lower) = (values(&whole), values(&upper), values(&lower));
        let mut var = [0f64; 3];
        for i in 0..whole.len() {
            // sqrt(3) * whole = sqrt(2) * upper + sqrt(1) * lower
            let joined = 2f32.sqrt() * upper[i] + lower[i];
            assert!((3f32.sqrt() * whole[i] - joined).abs() < 1e-5, "{i}");
            for (v, x) in var.iter_mut().zip([whole[i], upper[i], lower[i]]) {
                *v += f64::from(x * x) / whole.len() as f64;
            }
        }
        // Unit variance each (8192 samples: standard error of the variance about 0.016).
        for v in var {
            assert!((v - 1.0).abs() < 0.08, "{var:?}");
        }
        // The pieces of a bridge are uncorrelated.
        let cov: f64 = upper
            .iter()
            .zip(&lower)
            .map(|(&u, &l)| f64::from(u * l))
            .sum::<f64>()
            / upper.len() as f64;
        assert!(cov.abs() < 0.06, "{cov}");
        assert!(path.increment(1.0, 1.0, &like, &mut noise).is_err());
    }

    #[test]
    fn brownian_path_is_per_image() {
        let one = Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap();
        let two = Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap();
        let mut alone = (BrownianNoise::new(), BatchNoise::from_seeds(&[9]));
        let mut batch = (BrownianNoise::new(), BatchNoise::from_seeds(&[9, 10]));
        for (s, s_next) in [(5.0, 3.0), (5.0, 1.0), (1.0, 0.5), (1.0, 0.2)] {
            let a = alone.0.increment(s, s_next, &one, &mut alone.1).unwrap();
            let b = batch.0.increment(s, s_next, &two, &mut batch.1).unwrap();
            assert_eq!(values(&a), values(&b.narrow(0, 0, 1).unwrap()));
        }
    }

    #[test]
    fn midpoint_is_geometric() {
        assert!((midpoint_level(4.0, 1.0) - 2.0).abs() < 1e-6);
    }
}
