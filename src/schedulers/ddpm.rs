//! Denoising diffusion probabilistic models (Ho, Jain & Abbeel 2020), diffusers' `DDPMScheduler`:
//! ancestral sampling from the posterior q(x_prev | x_t, x0) (eq. 7) with the model's x0
//! prediction, plus fresh per-image noise of the posterior's (or the prior's) variance at every
//! step but a final one at timestep 0. The noise continues each image's own generator, as
//! diffusers draws it with a list of CPU generators.

use candle_core::Tensor;

use super::config::{ClassDefaults, DDPM_DEFAULTS};
use super::ddim::ddim_timesteps;
use super::sigmas::TrainSchedule;
use super::{
    alpha_add_noise, alpha_prediction_coefficients, at, step_noise, weighted_sum, BatchNoise,
    PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
};
use crate::{Error, Result};

const DDPM_CLASS_DEFAULTS: ClassDefaults = ClassDefaults {
    timestep_spacing: TimestepSpacing::Leading,
    ..DDPM_DEFAULTS
};

/// The variance of the noise added at each step (DDPM section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    /// The posterior variance beta~_t.
    Small,
    /// The same, taken through exp(0.5 * log(.)) as diffusers does for this name.
    SmallLog,
    /// The prior step variance beta_t.
    Large,
}

impl Variance {
    fn parse(name: Option<&str>) -> Result<Self> {
        match name.unwrap_or("fixed_small") {
            "fixed_small" => Ok(Variance::Small),
            "fixed_small_log" => Ok(Variance::SmallLog),
            "fixed_large" => Ok(Variance::Large),
            "fixed_large_log" => Err(Error::Scheduler(
                "DDPMScheduler: variance_type fixed_large_log is not supported (diffusers takes \
                 the square root of a log variance there, which is NaN); use fixed_small or \
                 fixed_large"
                    .into(),
            )),
            "learned" | "learned_range" => Err(Error::Scheduler(format!(
                "DDPMScheduler: variance_type {} needs a model that predicts its variance (twice \
                 the latent channels), which Stable Diffusion UNets do not; use fixed_small or \
                 fixed_large",
                name.unwrap_or_default()
            ))),
            other => Err(Error::Scheduler(format!(
                "DDPMScheduler: unknown variance_type `{other}`; accepted: fixed_small, \
                 fixed_small_log, fixed_large"
            ))),
        }
    }
}

pub struct Ddpm {
    train: TrainSchedule,
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    prediction: PredictionType,
    clip_range: Option<f64>,
    variance: Variance,
}

impl Ddpm {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported("DDPMScheduler", &["thresholding"])?;
        let variance = Variance::parse(config.variance_type.as_deref())?;
        let train = config.train_schedule(&DDPM_CLASS_DEFAULTS, false)?;
        let int_timesteps = ddim_timesteps(config, config.spacing(&DDPM_CLASS_DEFAULTS), steps);
        for &t in &int_timesteps {
            train.alpha_cumprod(t)?;
        }
        let clip_range = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Self {
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            train,
            prediction: config.prediction(),
            clip_range,
            variance,
        })
    }

    /// The standard deviation of the noise added when stepping from `t`, where `alpha_prev`
    /// belongs to the next timestep and `beta` is the step's own beta.
    fn noise_std(&self, alpha: f64, alpha_prev: f64, beta: f64) -> f64 {
        // The posterior variance, floored as diffusers does before taking its log.
        let posterior = ((1.0 - alpha_prev) / (1.0 - alpha) * beta).max(1e-20);
        match self.variance {
            Variance::Small => posterior.sqrt(),
            Variance::SmallLog => (0.5 * posterior.ln()).exp(),
            Variance::Large => beta.sqrt(),
        }
    }
}

impl Scheduler for Ddpm {
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
        // The next listed timestep; past the last one the sample is clean (alpha = 1).
        let alpha_prev = match self.int_timesteps.get(step_index + 1) {
            Some(&prev_t) => self.train.alpha_cumprod(prev_t)?,
            None => 1.0,
        };
        let alpha = self.train.alpha_cumprod(t)?;
        let step_alpha = alpha / alpha_prev;
        let beta = 1.0 - step_alpha;
        // DDPM eq. 7: the posterior mean is c_x0 * x0 + c_t * x_t.
        let c_x0 = alpha_prev.sqrt() * beta / (1.0 - alpha);
        let c_t = step_alpha.sqrt() * (1.0 - alpha_prev) / (1.0 - alpha);
        let [(xa, xb), _] = alpha_prediction_coefficients(self.prediction, alpha);
        let dtype = sample.dtype();
        let mut terms: Vec<(f64, &Tensor)> = Vec::with_capacity(3);
        let clipped;
        match self.clip_range {
            None => {
                terms.push((c_x0 * xa + c_t, sample));
                terms.push((c_x0 * xb, model_output));
            }
            Some(range) => {
                clipped = weighted_sum(&[(xa, sample), (xb, model_output)], dtype)?
                    .clamp(-range, range)?;
                terms.push((c_x0, &clipped));
                terms.push((c_t, sample));
            }
        }
        let fresh;
        if t > 0 {
            fresh = step_noise(noise, model_output)?;
            terms.push((self.noise_std(alpha, alpha_prev, beta), &fresh));
        }
        weighted_sum(&terms, dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let t = at(&self.int_timesteps, step_index, "timesteps")?;
        alpha_add_noise(&self.train, original, noise, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{build, SchedulerKind, SchedulerSpec};

    #[test]
    fn variance_types() {
        for (name, ok) in [
            ("fixed_small", true),
            ("fixed_small_log", true),
            ("fixed_large", true),
            ("fixed_large_log", false),
            ("learned", false),
            ("learned_range", false),
            ("small", false),
        ] {
            let cfg = SchedulerConfig::default()
                .with_overrides(&serde_json::json!({ "variance_type": name }))
                .unwrap();
            let built = build(&SchedulerSpec::new(SchedulerKind::Ddpm), &cfg, 10);
            match built {
                Ok(_) => assert!(ok, "{name}"),
                Err(Error::Scheduler(m)) => assert!(!ok && m.contains("variance_type"), "{m}"),
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }

    #[test]
    fn log_variance_equals_the_plain_one() {
        let mut a = Ddpm::new(&SchedulerConfig::default(), 10).unwrap();
        let s = a.noise_std(0.5, 0.6, 0.2);
        a.variance = Variance::SmallLog;
        assert!((a.noise_std(0.5, 0.6, 0.2) - s).abs() < 1e-15);
        a.variance = Variance::Large;
        assert!((a.noise_std(0.5, 0.6, 0.2) - 0.2f64.sqrt()).abs() < 1e-15);
    }

    /// No noise is drawn for a final step at timestep 0, so the generators stay where they were.
    #[test]
    fn no_noise_at_timestep_zero() {
        let cfg = SchedulerConfig::default()
            .with_overrides(&serde_json::json!({"timestep_spacing": "linspace"}))
            .unwrap();
        let mut s = build(&SchedulerSpec::new(SchedulerKind::Ddpm), &cfg, 2).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 0.0]);
        let x = Tensor::ones(
            (1, 1, 4, 4),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut used = BatchNoise::from_seeds(&[3]);
        let mut fresh = BatchNoise::from_seeds(&[3]);
        s.step(&x, 1, &x, &mut used).unwrap();
        let dev = candle_core::Device::Cpu;
        let a = used.randn(&[4], &dev, candle_core::DType::F32).unwrap();
        let b = fresh.randn(&[4], &dev, candle_core::DType::F32).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }
}
