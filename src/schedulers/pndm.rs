//! Pseudo numerical methods for diffusion models (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical
//! Methods for Diffusion Models on Manifolds"), diffusers' `PNDMScheduler`: the DDIM-like transfer
//! of eq. 9 driven by a 4th-order linear multistep (Adams-Bashforth) combination of past noise
//! predictions (PLMS). Stable Diffusion 1.x ships it with `skip_prk_steps`, where the multistep
//! history is started by one Heun-like step (the second timestep is listed twice); without it,
//! three pseudo Runge-Kutta steps of four model calls each start the history (PRK).
//!
//! The step rule depends on how many steps this scheduler has taken, not on the position in the
//! schedule, as in diffusers: an img2img run entering the schedule late starts its history there.

use candle_core::Tensor;

use super::config::{ClassDefaults, DDPM_DEFAULTS};
use super::ddim::ddim_timesteps;
use super::sigmas::TrainSchedule;
use super::{alpha_add_noise, at, weighted_sum, BatchNoise, PredictionType, Scheduler};
use super::{SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

const PNDM_DEFAULTS: ClassDefaults = ClassDefaults {
    timestep_spacing: TimestepSpacing::Leading,
    ..DDPM_DEFAULTS
};

/// Adams-Bashforth weights of the noise predictions, newest first, by history length.
const PLMS_WEIGHTS: [&[f64]; 4] = [
    &[1.0],
    &[3.0 / 2.0, -1.0 / 2.0],
    &[23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0],
    &[55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
];

/// Runge-Kutta weights of the four evaluations of one warm-up step.
const RK_WEIGHTS: [f64; 4] = [1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0];

pub struct Pndm {
    train: TrainSchedule,
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    /// The twelve leading timesteps of the Runge-Kutta warm-up; empty with `skip_prk_steps`.
    prk_timesteps: Vec<i64>,
    /// `num_train / steps`: the PLMS stride; half of it is the Runge-Kutta half step.
    stride: i64,
    final_alpha_cumprod: f64,
    prediction: PredictionType,
    /// Steps taken so far.
    counter: usize,
    /// Noise predictions the multistep rule combines, oldest first (at most 4).
    ets: Vec<Tensor>,
    /// Model outputs of the current Runge-Kutta step so far.
    rk_outputs: Vec<Tensor>,
    /// The sample a two-call step (Heun start or Runge-Kutta) started from.
    cur_sample: Option<Tensor>,
}

impl Pndm {
    /// `skip_prk_steps`: `Some` forces it (PLMS), `None` takes the config's.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        skip_prk_steps: Option<bool>,
    ) -> Result<Self> {
        let class = "PNDMScheduler";
        let prediction = config.prediction();
        if prediction == PredictionType::Sample {
            return Err(Error::Scheduler(format!(
                "{class}: prediction_type must be epsilon or v_prediction. Given: sample"
            )));
        }
        let skip_prk = skip_prk_steps.unwrap_or(config.skip_prk_steps.unwrap_or(false));
        // The class has no zero-SNR option: a value set for another class is ignored.
        let config = SchedulerConfig {
            rescale_betas_zero_snr: None,
            ..config.clone()
        };
        let train = config.train_schedule(&PNDM_DEFAULTS, false)?;
        let n = config.num_train();
        let stride = (n / steps) as i64;
        // Ascending, as diffusers builds them before laying out the warm-up.
        let mut base = ddim_timesteps(&config, config.spacing(&PNDM_DEFAULTS), steps);
        base.reverse();
        let len = base.len();
        let (prk_timesteps, plms_timesteps): (Vec<i64>, Vec<i64>) = if skip_prk {
            // The second-largest timestep is listed twice: the Heun-like start evaluates the
            // model there once for the move and once more for the corrected move.
            let mut plms: Vec<i64> = base[..len.saturating_sub(1)].to_vec();
            plms.extend_from_slice(&base[len.saturating_sub(2)..len.saturating_sub(1)]);
            plms.extend_from_slice(&base[len.saturating_sub(1)..]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < 4 {
                return Err(Error::Scheduler(format!(
                    "{class} without skip_prk_steps needs at least 4 steps (its Runge-Kutta \
                     warm-up spans the first three intervals). Given: {steps}"
                )));
            }
            // The four largest timesteps, each followed by its half step; the warm-up visits
            // t, t - h, t - h, t - 2h for each of the three top intervals.
            let half = stride / 2;
            let with_halves: Vec<i64> = base[len - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let doubled: Vec<i64> = with_halves[..with_halves.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let int_timesteps: Vec<i64> = prk_timesteps
            .iter()
            .chain(&plms_timesteps)
            .copied()
            .collect();
        for &t in &int_timesteps {
            train.alpha_cumprod(t)?;
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        Ok(Self {
            train,
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            prk_timesteps,
            stride,
            final_alpha_cumprod,
            prediction,
            counter: 0,
            ets: Vec::with_capacity(4),
            rk_outputs: Vec::with_capacity(3),
            cur_sample: None,
        })
    }

    fn alpha_cumprod(&self, t: i64) -> Result<f64> {
        if t >= 0 {
            self.train.alpha_cumprod(t)
        } else {
            Ok(self.final_alpha_cumprod)
        }
    }

    /// PNDM eq. 9: the sample at `prev_t` from `sample` at `t` and a noise prediction given as a
    /// weighted sum of model outputs (noise or velocity, per the prediction type).
    fn transfer(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        outputs: &[(f64, &Tensor)],
    ) -> Result<Tensor> {
        let alpha = self.train.alpha_cumprod(t)?;
        let alpha_prev = self.alpha_cumprod(prev_t)?;
        // eps = k_out * output + k_sample * sample.
        let (k_out, k_sample) = match self.prediction {
            PredictionType::VPrediction => (alpha.sqrt(), (1.0 - alpha).sqrt()),
            _ => (1.0, 0.0),
        };
        let denom = alpha * (1.0 - alpha_prev).sqrt() + (alpha * (1.0 - alpha) * alpha_prev).sqrt();
        let c_eps = -(alpha_prev - alpha) / denom;
        let mut terms = vec![((alpha_prev / alpha).sqrt() + c_eps * k_sample, sample)];
        terms.extend(outputs.iter().map(|&(w, out)| (c_eps * k_out * w, out)));
        weighted_sum(&terms, sample.dtype())
    }

    /// One of the twelve warm-up calls: Runge-Kutta evaluations at t, t - h, t - h, then the
    /// combined move to t - 2h, each move starting from the step's first sample.
    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let phase = self.counter % 4;
        let diff = if self.counter % 2 == 1 {
            0
        } else {
            self.stride / 2
        };
        let prev_t = t - diff;
        let start_t = self.prk_timesteps[self.counter / 4 * 4];
        if phase == 0 {
            self.cur_sample = Some(sample.clone());
            self.ets.push(model_output.clone());
            self.rk_outputs.clear();
        }
        let start = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = if phase < 3 {
            self.rk_outputs.push(model_output.clone());
            self.transfer(&start, start_t, prev_t, &[(1.0, model_output)])?
        } else {
            let mut outputs: Vec<(f64, &Tensor)> = RK_WEIGHTS
                .iter()
                .zip(&self.rk_outputs)
                .map(|(&w, out)| (w, out))
                .collect();
            outputs.push((RK_WEIGHTS[3], model_output));
            let prev = self.transfer(&start, start_t, prev_t, &outputs)?;
            self.rk_outputs.clear();
            prev
        };
        Ok(prev)
    }

    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.prk_timesteps.is_empty() && self.ets.len() < 3 {
            return Err(Error::Scheduler(
                "PNDM multistep steps need the Runge-Kutta warm-up first".into(),
            ));
        }
        let (t, prev_t) = if self.counter == 1 {
            // The repeated timestep: redo the first move with the mean of both predictions.
            (t + self.stride, t)
        } else {
            if self.ets.len() == 4 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
            (t, t - self.stride)
        };
        if self.ets.len() == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            return self.transfer(sample, t, prev_t, &[(1.0, model_output)]);
        }
        if self.ets.len() == 1 && self.counter == 1 {
            let start = self.cur_sample.take().unwrap_or_else(|| sample.clone());
            let first = &self.ets[0];
            return self.transfer(&start, t, prev_t, &[(0.5, model_output), (0.5, first)]);
        }
        let weights = PLMS_WEIGHTS[self.ets.len() - 1];
        let outputs: Vec<(f64, &Tensor)> = weights
            .iter()
            .zip(self.ets.iter().rev())
            .map(|(&w, e)| (w, e))
            .collect();
        self.transfer(sample, t, prev_t, &outputs)
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let t = at(&self.int_timesteps, step_index, "timesteps")?;
        let prev = if self.counter < self.prk_timesteps.len() {
            self.step_prk(model_output, t, sample)?
        } else {
            self.step_plms(model_output, t, sample)?
        };
        self.counter += 1;
        Ok(prev)
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

    fn sd15() -> SchedulerConfig {
        SchedulerConfig::from_json(&serde_json::json!({
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "clip_sample": false
        }))
        .unwrap()
    }

    fn timesteps(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Vec<f64> {
        build(&SchedulerSpec::new(kind), cfg, steps)
            .unwrap()
            .timesteps()
            .to_vec()
    }

    #[test]
    fn plms_lists_the_second_timestep_twice() {
        let cfg = sd15();
        assert_eq!(
            timesteps(&cfg, SchedulerKind::Pndm, 4),
            [751.0, 501.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(timesteps(&cfg, SchedulerKind::Pndm, 1), [1.0]);
        assert_eq!(timesteps(&cfg, SchedulerKind::Pndm, 2), [501.0, 1.0, 1.0]);
    }

    #[test]
    fn runge_kutta_warm_up_layout() {
        let cfg = sd15()
            .with_overrides(&serde_json::json!({"skip_prk_steps": false}))
            .unwrap();
        assert_eq!(
            timesteps(&cfg, SchedulerKind::Pndm, 5),
            [801, 701, 701, 601, 601, 501, 501, 401, 401, 301, 301, 201, 201, 1].map(f64::from)
        );
        // PLMS forces skip_prk_steps whatever the config says.
        assert_eq!(timesteps(&cfg, SchedulerKind::Plms, 5).len(), 6);
        let linspace = cfg
            .with_overrides(&serde_json::json!({"timestep_spacing": "linspace"}))
            .unwrap();
        assert_eq!(
            timesteps(&linspace, SchedulerKind::Pndm, 10),
            [
                999, 938, 938, 888, 888, 827, 827, 777, 777, 716, 716, 666, 666, 555, 444, 333,
                222, 111, 0
            ]
            .map(f64::from)
        );
        let short = build(&SchedulerSpec::new(SchedulerKind::Pndm), &cfg, 3);
        assert!(matches!(short, Err(Error::Scheduler(m)) if m.contains("at least 4")));
    }

    #[test]
    fn sample_prediction_is_refused() {
        let cfg = sd15()
            .with_overrides(&serde_json::json!({"prediction_type": "sample"}))
            .unwrap();
        let err = build(&SchedulerSpec::new(SchedulerKind::Pndm), &cfg, 10);
        assert!(matches!(err, Err(Error::Scheduler(m)) if m.contains("prediction_type")));
    }
}
