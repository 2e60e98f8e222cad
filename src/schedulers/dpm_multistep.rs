//! Multistep DPM-Solver, diffusers' `DPMSolverMultistepScheduler`, solver order 1 to 3, optionally
//! on Karras sigmas ("DPM++ 2M Karras"). Two solver families:
//!
//! - DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//!   Probabilistic Models"), `algorithm_type` "dpmsolver++", and its SDE variant
//!   "sde-dpmsolver++", integrate the data prediction x0;
//! - the original DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion
//!   Probabilistic Model Sampling in Around 10 Steps"), "dpmsolver", and its SDE variant
//!   "sde-dpmsolver", integrate the noise prediction.
//!
//! The solvers work in half-log-SNR `lambda = log(alpha_t / sigma_t)`; the multistep form reuses
//! the previous steps' predictions instead of extra model calls.

use candle_core::Tensor;

use super::config::{
    BetaSchedule, DpmAlgorithm, FinalSigmas, SolverType, TimestepSpacing, DDPM_DEFAULTS,
};
use super::sigmas::{self, interp_unit_grid, np_arange, np_linspace, np_round};
use super::{
    at, prediction_coefficients, step_noise, weighted_sum, BatchNoise, PredictionType, Scheduler,
    SchedulerConfig,
};
use crate::{Error, Result};

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: PredictionType,
    algorithm: DpmAlgorithm,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas: FinalSigmas,
    /// Converted model outputs (x0 or noise predictions) of the last `solver_order` steps, oldest
    /// first.
    history: Vec<Tensor>,
    /// Steps taken so far, capped at `solver_order` (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
}

/// The VP-SDE pair (alpha_t, sigma_t) of a Karras noise level sigma.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

pub(crate) fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    alpha.ln() - sigma_t.ln()
}

impl DpmSolverMultistep {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let class = "DPMSolverMultistepScheduler";
        config.reject_unsupported(
            class,
            &[
                "thresholding",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
                "variance_type",
            ],
        )?;
        let algorithm = config
            .algorithm_type
            .unwrap_or(DpmAlgorithm::DpmSolverPlusPlus);
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::Scheduler(format!(
                "{class}: solver_order must be 1, 2 or 3. Given: {solver_order}"
            )));
        }
        let defaults = DDPM_DEFAULTS;
        let train = config.train_schedule(&defaults, true)?;
        let n = config.num_train();

        // Inference steps stop before the clipped tail of low lambdas, if a clip is configured.
        let lambda_min = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        let clipped = train
            .alphas_cumprod
            .iter()
            .rev()
            .map(|&a| {
                let a = a as f32;
                f64::from(a.sqrt().ln() - (1.0 - a).sqrt().ln())
            })
            .take_while(|&l| l < lambda_min)
            .count();
        let last_timestep = n - clipped;
        let mut timesteps: Vec<f64> = match config.spacing(&defaults) {
            TimestepSpacing::Linspace => {
                let mut grid = np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1, true);
                grid.remove(0);
                grid.into_iter()
                    .rev()
                    .map(|t| np_round(t).trunc())
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = (last_timestep / (steps + 1)) as f64;
                (1..=steps)
                    .rev()
                    .map(|i| i as f64 * ratio + config.offset() as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange(last_timestep as f64, 0.0, -(n as f64 / steps as f64))
                    .into_iter()
                    .map(|t| np_round(t) - 1.0)
                    .collect()
            }
        };

        let train_sigmas = train.sigmas_f32();
        let sigmas: Vec<f64> = if config.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0]);
            let sigma_max = config.sigma_max.unwrap_or(train_sigmas[n - 1]);
            let karras = sigmas::karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = sigmas::log_sigmas_f32(&train_sigmas);
            let round = config.beta_schedule != Some(BetaSchedule::SquaredcosCapV2);
            timesteps = karras
                .iter()
                .map(|&s| {
                    let t = sigmas::sigma_to_t(s, &log_sigmas);
                    // The model gets integer timesteps: rounded, or truncated like numpy's cast.
                    if round {
                        np_round(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            karras
        } else {
            timesteps
                .iter()
                .map(|&t| interp_unit_grid(t, &train_sigmas))
                .collect()
        };
        let final_sigmas = config.final_sigmas_type.unwrap_or(FinalSigmas::Zero);
        // The noise-prediction updates scale by e^h: a final sigma of zero makes h infinite.
        if !algorithm.predicts_data() && final_sigmas == FinalSigmas::Zero {
            return Err(Error::Scheduler(format!(
                "{class}: algorithm_type {} needs final_sigmas_type \"sigma_min\" (a final sigma \
                 of zero is only supported by dpmsolver++ and sde-dpmsolver++)",
                algorithm.name()
            )));
        }
        let sigmas = sigmas::with_final_sigma(sigmas, final_sigmas, &train_sigmas);
        let scheduler = Self {
            timesteps,
            sigmas,
            prediction: config.prediction(),
            algorithm,
            solver_order,
            // Only "heun" selects the Heun form; the other families' names mean midpoint here.
            solver_type: match config.solver_type {
                Some(SolverType::Heun) => SolverType::Heun,
                _ => SolverType::Midpoint,
            },
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigmas,
            history: Vec::with_capacity(solver_order),
            lower_order_nums: 0,
        };
        // diffusers has no third-order SDE-DPM-Solver update and fails at the first step that
        // would take one; refuse such a schedule before any model call.
        let third_order_step =
            (0..scheduler.timesteps.len()).any(|i| scheduler.order_at(i, i.min(solver_order)) == 3);
        if algorithm == DpmAlgorithm::SdeDpmSolver && third_order_step {
            return Err(Error::Scheduler(format!(
                "{class}: algorithm_type sde-dpmsolver has no third-order update; use solver_order \
                 1 or 2 (or at most 4 steps with lower_order_final)"
            )));
        }
        Ok(scheduler)
    }

    /// The solver order of step `step_index` after `lower_order_nums` earlier steps: lower near
    /// the end of short schedules, where it is more stable, and while the history fills up.
    fn order_at(&self, step_index: usize, lower_order_nums: usize) -> usize {
        let len = self.timesteps.len();
        let short = self.lower_order_final && len < 15;
        let lower_order_final = step_index + 1 == len
            && (self.euler_at_final || short || self.final_sigmas == FinalSigmas::Zero);
        let lower_order_second = step_index + 2 == len && short;
        if self.solver_order == 1 || lower_order_nums < 1 || lower_order_final {
            1
        } else if self.solver_order == 2 || lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        }
    }

    /// The model output in the solver's parameterisation at noise level `sigma`: the data
    /// prediction x0 for DPM-Solver++, the noise prediction for DPM-Solver.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f64,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let [data, noise] = prediction_coefficients(self.prediction, alpha_t, sigma_t);
        let (a, b) = if self.algorithm.predicts_data() {
            data
        } else {
            noise
        };
        weighted_sum(&[(a, sample), (b, model_output)], sample.dtype())
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let sigma_s0 = at(&self.sigmas, step_index, "sigma schedule")?;
        let sigma_t = at(&self.sigmas, step_index + 1, "sigma schedule")?;

        let converted = self.convert_model_output(model_output, sample, sigma_s0)?;
        if self.history.len() == self.solver_order {
            self.history.remove(0);
        }
        self.history.push(converted);
        let sde = matches!(
            self.algorithm,
            DpmAlgorithm::SdeDpmSolverPlusPlus | DpmAlgorithm::SdeDpmSolver
        );
        let fresh = if sde {
            Some(step_noise(noise, model_output)?)
        } else {
            None
        };

        // Never more history than has been stored (a schedule entered mid-way starts at order 1).
        let order = self
            .order_at(step_index, self.lower_order_nums)
            .min(self.history.len());
        if order == 3 && self.algorithm == DpmAlgorithm::SdeDpmSolver {
            return Err(Error::Scheduler(
                "sde-dpmsolver has no third-order update".into(),
            ));
        }
        let sigma_at = |back: usize| {
            step_index
                .checked_sub(back)
                .and_then(|i| self.sigmas.get(i).copied())
                .ok_or_else(|| Error::Scheduler("multistep history out of step".into()))
        };
        let (alpha_t, sigma_t_vp) = alpha_sigma(sigma_t);
        let (alpha_s0, sigma_s0_vp) = alpha_sigma(sigma_s0);
        let lambda_t = lambda(sigma_t);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda_t - lambda_s0;
        let hist = |back: usize| &self.history[self.history.len() - 1 - back];

        // Coefficients of the sample, of the differences D0, D1, D2 of the stored predictions and
        // of the fresh noise, per variant. With a final zero sigma (DPM-Solver++ only), h is
        // infinite and the first-order update reduces to returning x0.
        let midpoint = order == 2 && self.solver_type == SolverType::Midpoint;
        let (c_sample, c_d0, c_d1, c_d2, c_noise) = match self.algorithm {
            DpmAlgorithm::DpmSolverPlusPlus => {
                let em1 = (-h).exp_m1();
                let c_d1 = if midpoint {
                    -0.5 * alpha_t * em1
                } else {
                    alpha_t * (em1 / h + 1.0)
                };
                let c_d2 = -alpha_t * ((em1 + h) / (h * h) - 0.5);
                (sigma_t_vp / sigma_s0_vp, -alpha_t * em1, c_d1, c_d2, 0.0)
            }
            DpmAlgorithm::SdeDpmSolverPlusPlus => {
                let phi = -(-2.0 * h).exp_m1();
                let c_d1 = if midpoint {
                    0.5 * alpha_t * phi
                } else {
                    alpha_t * (phi / (-2.0 * h) + 1.0)
                };
                let c_d2 = alpha_t * ((phi - 2.0 * h) / (2.0 * h).powi(2) - 0.5);
                (
                    sigma_t_vp / sigma_s0_vp * (-h).exp(),
                    alpha_t * phi,
                    c_d1,
                    c_d2,
                    sigma_t_vp * phi.sqrt(),
                )
            }
            DpmAlgorithm::DpmSolver => {
                let ep1 = h.exp_m1();
                let c_d1 = if midpoint {
                    -0.5 * sigma_t_vp * ep1
                } else {
                    -sigma_t_vp * (ep1 / h - 1.0)
                };
                let c_d2 = -sigma_t_vp * ((ep1 - h) / (h * h) - 0.5);
                (alpha_t / alpha_s0, -sigma_t_vp * ep1, c_d1, c_d2, 0.0)
            }
            DpmAlgorithm::SdeDpmSolver => {
                // The noise term is twice the ODE's, and the fresh noise makes up the variance.
                let ep1 = h.exp_m1();
                let c_d1 = if midpoint {
                    -sigma_t_vp * ep1
                } else {
                    -2.0 * sigma_t_vp * (ep1 / h - 1.0)
                };
                (
                    alpha_t / alpha_s0,
                    -2.0 * sigma_t_vp * ep1,
                    c_d1,
                    0.0,
                    sigma_t_vp * (2.0 * h).exp_m1().sqrt(),
                )
            }
        };

        // Expand D0..D2 into weights of the stored predictions m0 (newest), m1, m2.
        let mut m = [c_d0, 0.0, 0.0];
        match order {
            1 => {}
            2 => {
                // D1 = (m0 - m1) / r0
                let r0 = (lambda_s0 - lambda(sigma_at(1)?)) / h;
                m[0] += c_d1 / r0;
                m[1] -= c_d1 / r0;
            }
            _ => {
                let lambda_s1 = lambda(sigma_at(1)?);
                let lambda_s2 = lambda(sigma_at(2)?);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let r1 = (lambda_s1 - lambda_s2) / h;
                // D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
                // D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
                let k = (c_d1 * r0 + c_d2) / (r0 + r1);
                let (w10, w11) = (c_d1 + k, -k);
                m[0] += w10 / r0;
                m[1] += -w10 / r0 + w11 / r1;
                m[2] -= w11 / r1;
            }
        }
        let mut refs: Vec<(f64, &Tensor)> = vec![(c_sample, sample)];
        for (back, &coef) in m.iter().enumerate().take(order) {
            refs.push((coef, hist(back)));
        }
        if let Some(fresh) = &fresh {
            refs.push((c_noise, fresh));
        }
        let prev = weighted_sum(&refs, sample.dtype())?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = at(&self.sigmas, step_index, "sigma schedule")?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        weighted_sum(&[(alpha_t, original), (sigma_t, noise)], original.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(overrides: serde_json::Value) -> SchedulerConfig {
        SchedulerConfig::default()
            .with_overrides(&overrides)
            .unwrap()
    }

    fn refusal(overrides: serde_json::Value, steps: usize) -> String {
        match DpmSolverMultistep::new(&config(overrides), steps) {
            Err(Error::Scheduler(message)) => message,
            Err(other) => panic!("not a scheduler error: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn noise_prediction_forms_need_a_nonzero_final_sigma() {
        for algorithm in ["dpmsolver", "sde-dpmsolver"] {
            let message = refusal(serde_json::json!({ "algorithm_type": algorithm }), 10);
            assert!(message.contains("sigma_min"), "{message}");
            let message = refusal(
                serde_json::json!({ "algorithm_type": algorithm, "final_sigmas_type": "zero" }),
                10,
            );
            assert!(message.contains(algorithm), "{message}");
            let ok = serde_json::json!({
                "algorithm_type": algorithm, "final_sigmas_type": "sigma_min"
            });
            assert!(
                DpmSolverMultistep::new(&config(ok), 10).is_ok(),
                "{algorithm}"
            );
        }
    }

    #[test]
    fn sde_dpmsolver_refuses_third_order_steps() {
        let order3 = |algorithm: &str, lower_order_final: bool| {
            serde_json::json!({
                "algorithm_type": algorithm,
                "final_sigmas_type": "sigma_min",
                "solver_order": 3,
                "lower_order_final": lower_order_final,
            })
        };
        let message = refusal(order3("sde-dpmsolver", true), 5);
        assert!(message.contains("third-order"), "{message}");
        assert!(!refusal(order3("sde-dpmsolver", false), 3).is_empty());
        // Up to 4 steps, lower_order_final keeps every step at order 2 or below.
        for steps in 1..=4 {
            let cfg = config(order3("sde-dpmsolver", true));
            assert!(DpmSolverMultistep::new(&cfg, steps).is_ok(), "{steps}");
        }
        assert!(DpmSolverMultistep::new(&config(order3("sde-dpmsolver", false)), 2).is_ok());
        for algorithm in ["dpmsolver", "dpmsolver++", "sde-dpmsolver++"] {
            let cfg = config(order3(algorithm, true));
            assert!(DpmSolverMultistep::new(&cfg, 25).is_ok(), "{algorithm}");
        }
    }

    #[test]
    fn noise_prediction_steps_stay_finite_to_the_end() {
        let dev = candle_core::Device::Cpu;
        for algorithm in ["dpmsolver", "sde-dpmsolver"] {
            let cfg = config(serde_json::json!({
                "algorithm_type": algorithm, "final_sigmas_type": "sigma_min"
            }));
            let mut scheduler = DpmSolverMultistep::new(&cfg, 6).unwrap();
            let mut noise = BatchNoise::from_seeds(&[3]);
            let mut x = noise.randn(&[2, 2], &dev, candle_core::DType::F32).unwrap();
            for i in 0..scheduler.timesteps().len() {
                let eps = (&x * 0.5).unwrap();
                x = scheduler.step(&eps, i, &x, &mut noise).unwrap();
            }
            let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{algorithm}");
        }
    }
}
