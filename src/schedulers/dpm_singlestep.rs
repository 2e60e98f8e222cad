//! Singlestep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models", Algorithm 1 and its third-order form), diffusers'
//! `DPMSolverSinglestepScheduler` with `algorithm_type` "dpmsolver++" (or "sde-dpmsolver++"),
//! solver order 1 to 3, optionally on Karras sigmas.
//!
//! Unlike the multistep solver, a k-th order step restarts from the sample at the beginning of its
//! group: the schedule is cut into groups of orders (1, 2), (1, 2, 3) ... whose intermediate
//! evaluations are the schedule's own timesteps, and the group's last step solves from the group's
//! first sample with all the group's data predictions. Each model evaluation is one listed
//! timestep, so `order()` is 1 as in diffusers.

use candle_core::Tensor;

use super::config::{DpmAlgorithm, FinalSigmas, PredictionType, SolverType, DDPM_DEFAULTS};
use super::dpm_multistep::{alpha_sigma, lambda};
use super::sigmas::{self, interp_unit_grid, np_linspace, np_round};
use super::{
    at, prediction_coefficients, step_noise, weighted_sum, BatchNoise, Scheduler, SchedulerConfig,
};
use crate::{Error, Result};

/// `DPMSolverSinglestepScheduler`.
pub struct DpmSolverSinglestep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: PredictionType,
    sde: bool,
    heun: bool,
    /// The order of each step's update.
    orders: Vec<usize>,
    /// The last `solver_order` data predictions, oldest first (`None` before they exist).
    history: Vec<Option<Tensor>>,
    /// The sample the current group of steps started from.
    group_start: Option<Tensor>,
}

/// diffusers' order of each step: groups (1, 2, ..., solver_order), the tail cut short when
/// `lower_order_final`, and a first-order last step when the schedule ends at sigma zero.
fn step_orders(
    steps: usize,
    solver_order: usize,
    lower_order_final: bool,
    final_zero: bool,
) -> Vec<usize> {
    let group: Vec<usize> = (1..=solver_order).collect();
    let full_groups = steps / solver_order;
    let mut orders: Vec<usize> = if lower_order_final {
        match (solver_order, steps % solver_order) {
            (3, 0) => {
                let mut o = group.repeat(full_groups - 1);
                o.extend([1, 2, 1]);
                o
            }
            (2, 0) => {
                let mut o = group.repeat(full_groups - 1);
                o.extend([1, 1]);
                o
            }
            (_, rest) => {
                let mut o = group.repeat(full_groups);
                o.extend(1..=rest);
                o
            }
        }
    } else {
        group.repeat(full_groups)
    };
    if final_zero {
        if let Some(last) = orders.last_mut() {
            *last = 1;
        }
    }
    orders
}

impl DpmSolverSinglestep {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let class = "DPMSolverSinglestepScheduler";
        config.reject_unsupported(
            class,
            &[
                "thresholding",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_flow_sigmas",
                "variance_type",
            ],
        )?;
        let algorithm = config
            .algorithm_type
            .unwrap_or(DpmAlgorithm::DpmSolverPlusPlus);
        let sde = match algorithm {
            DpmAlgorithm::DpmSolverPlusPlus => false,
            DpmAlgorithm::SdeDpmSolverPlusPlus => true,
            DpmAlgorithm::DpmSolver | DpmAlgorithm::SdeDpmSolver => {
                return Err(Error::Scheduler(format!(
                    "{class}: algorithm_type must be dpmsolver++ or sde-dpmsolver++ (the \
                     noise-prediction variants are deprecated upstream and not supported)"
                )))
            }
        };
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::Scheduler(format!(
                "{class}: solver_order must be 1, 2 or 3. Given: {solver_order}"
            )));
        }
        if steps == 0 || steps > config.num_train() {
            return Err(Error::Scheduler(format!(
                "{class}: num_inference_steps must be in 1..={}. Given: {steps}",
                config.num_train()
            )));
        }
        // The class has no zero-SNR option and always spaces its timesteps like linspace.
        let mut plain = config.clone();
        plain.rescale_betas_zero_snr = None;
        let train = plain.train_schedule(&DDPM_DEFAULTS, false)?;
        let n = config.num_train();
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
        let mut grid = np_linspace(0.0, (n - 1 - clipped.min(n - 1)) as f64, steps + 1, true);
        grid.remove(0);
        let mut timesteps: Vec<f64> = grid.into_iter().rev().map(np_round).collect();

        let train_sigmas = train.sigmas_f32();
        let levels: Vec<f64> = if config.use_karras_sigmas.unwrap_or(false) {
            let karras = sigmas::karras_sigmas(train_sigmas[0], train_sigmas[n - 1], steps);
            let log_sigmas = sigmas::log_sigmas_f32(&train_sigmas);
            timesteps = karras
                .iter()
                .map(|&s| np_round(sigmas::sigma_to_t(s, &log_sigmas)))
                .collect();
            karras
        } else {
            timesteps
                .iter()
                .map(|&t| interp_unit_grid(t, &train_sigmas))
                .collect()
        };
        let final_sigmas = config.final_sigmas_type.unwrap_or(FinalSigmas::Zero);
        let sigmas = sigmas::with_final_sigma(levels, final_sigmas, &train_sigmas);
        // diffusers switches lower_order_final on when the steps do not fill whole groups or the
        // schedule ends at zero.
        let lower_order_final = config.lower_order_final.unwrap_or(false)
            || !steps.is_multiple_of(solver_order)
            || final_sigmas == FinalSigmas::Zero;
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction(),
            sde,
            heun: config.solver_type == Some(SolverType::Heun),
            orders: step_orders(
                steps,
                solver_order,
                lower_order_final,
                final_sigmas == FinalSigmas::Zero,
            ),
            history: vec![None; solver_order],
            group_start: None,
        })
    }

    fn sigma(&self, step_index: usize) -> Result<f64> {
        at(&self.sigmas, step_index, "sigma schedule")
    }

    /// Weights of the sample, of the data predictions m0 (newest), m1, m2 and of the fresh noise
    /// in the `order`-th order update from the group start at `step_index + 1 - order` to the
    /// level after `step_index`.
    fn update_coefficients(&self, step_index: usize, order: usize) -> Result<(f64, [f64; 3], f64)> {
        let sigma_t = self.sigma(step_index + 1)?;
        let start = step_index + 1 - order;
        let (alpha_t, sigma_t_vp) = alpha_sigma(sigma_t);
        let (_, sigma_b_vp) = alpha_sigma(self.sigma(start)?);
        let lambda_b = lambda(self.sigma(start)?);
        let h = lambda(sigma_t) - lambda_b;
        let ratio = sigma_t_vp / sigma_b_vp;
        // Coefficients of the sample, of D0 (the group's first prediction), of the first- and
        // second-difference terms and of the noise. With a final zero sigma h is infinite and
        // the first-order update returns the data prediction.
        let (c_x, c0, c1, c2, c_noise) = if self.sde {
            let phi = -(-2.0 * h).exp_m1();
            let c1 = if self.heun || order == 3 {
                alpha_t * (phi / (-2.0 * h) + 1.0)
            } else {
                0.5 * alpha_t * phi
            };
            let c2 = alpha_t * ((phi - 2.0 * h) / (2.0 * h).powi(2) - 0.5);
            (
                ratio * (-h).exp(),
                alpha_t * phi,
                c1,
                c2,
                sigma_t_vp * phi.sqrt(),
            )
        } else {
            let em1 = (-h).exp_m1();
            let c1 = if self.heun || order == 3 {
                alpha_t * (em1 / h + 1.0)
            } else {
                -0.5 * alpha_t * em1
            };
            let c2 = -alpha_t * ((em1 + h) / (h * h) - 0.5);
            (ratio, -alpha_t * em1, c1, c2, 0.0)
        };
        let mut m = [0.0; 3];
        match order {
            1 => m[0] = c0,
            2 => {
                // D0 = m1, D1 = (m0 - m1) / r0
                let r0 = (lambda(self.sigma(step_index)?) - lambda_b) / h;
                m[1] = c0 - c1 / r0;
                m[0] = c1 / r0;
            }
            _ => {
                let r0 = (lambda(self.sigma(step_index)?) - lambda_b) / h;
                let r1 = (lambda(self.sigma(step_index - 1)?) - lambda_b) / h;
                // D0 = m2, D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0.
                m[2] = c0;
                let (on_d1_0, on_d1_1) = if self.heun {
                    // D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1)
                    (
                        (c1 * r0 - 2.0 * c2) / (r0 - r1),
                        (2.0 * c2 - c1 * r1) / (r0 - r1),
                    )
                } else {
                    (0.0, c1)
                };
                m[1] += on_d1_0 / r1;
                m[2] -= on_d1_0 / r1;
                m[0] += on_d1_1 / r0;
                m[2] -= on_d1_1 / r0;
            }
        }
        Ok((c_x, m, c_noise))
    }
}

/// img2img noising of the VP samplers on a sigma table: `alpha_t * original + sigma_t * noise`.
pub(crate) fn vp_add_noise(
    sigmas: &[f64],
    original: &Tensor,
    noise: &Tensor,
    step_index: usize,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(at(sigmas, step_index, "sigma schedule")?);
    weighted_sum(&[(alpha_t, original), (sigma_t, noise)], original.dtype())
}

impl Scheduler for DpmSolverSinglestep {
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
        let (alpha_s, sigma_s) = alpha_sigma(self.sigma(step_index)?);
        let [(a, b), _] = prediction_coefficients(self.prediction, alpha_s, sigma_s);
        let x0 = weighted_sum(&[(a, sample), (b, model_output)], sample.dtype())?;
        self.history.remove(0);
        self.history.push(Some(x0));
        let fresh = if self.sde {
            Some(step_noise(noise, model_output)?)
        } else {
            None
        };
        // A schedule entered mid-group (img2img) lowers the order to the predictions it has.
        let mut order = at(&self.orders, step_index, "order list")?;
        let len = self.history.len();
        while order > 1 && self.history[len - order].is_none() {
            order -= 1;
        }
        if order == 1 {
            self.group_start = Some(sample.clone());
        }
        let start = self
            .group_start
            .as_ref()
            .ok_or_else(|| Error::Scheduler("singlestep group without its start".into()))?;
        let (c_x, m, c_noise) = self.update_coefficients(step_index, order)?;
        let mut terms: Vec<(f64, &Tensor)> = vec![(c_x, start)];
        for (back, &coef) in m.iter().enumerate().take(order) {
            let prediction = self.history[len - 1 - back]
                .as_ref()
                .expect("the order was lowered to the stored predictions, this is a bug");
            terms.push((coef, prediction));
        }
        if let Some(fresh) = &fresh {
            terms.push((c_noise, fresh));
        }
        weighted_sum(&terms, sample.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        vp_add_noise(&self.sigmas, original, noise, step_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{build, SchedulerKind, SchedulerSpec};

    #[test]
    fn order_lists_follow_diffusers() {
        assert_eq!(step_orders(6, 2, true, true), vec![1, 2, 1, 2, 1, 1]);
        assert_eq!(step_orders(5, 2, true, true), vec![1, 2, 1, 2, 1]);
        assert_eq!(step_orders(6, 2, false, false), vec![1, 2, 1, 2, 1, 2]);
        assert_eq!(step_orders(6, 3, true, false), vec![1, 2, 3, 1, 2, 1]);
        assert_eq!(step_orders(7, 3, true, true), vec![1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(step_orders(8, 3, true, true), vec![1, 2, 3, 1, 2, 3, 1, 1]);
        assert_eq!(step_orders(1, 3, true, true), vec![1]);
        assert_eq!(step_orders(3, 1, true, true), vec![1, 1, 1]);
    }

    #[test]
    fn parses_singlestep_names() {
        for (name, karras) in [
            ("DPM++ 2S", Some(false)),
            ("dpmpp_2s", Some(false)),
            ("DPM++ 2S Karras", Some(true)),
            ("DPMSolverSinglestepScheduler", None),
            ("DPMSolverSinglestep", None),
        ] {
            let spec = SchedulerSpec::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.kind, SchedulerKind::DpmSolverSinglestep, "{name}");
            assert_eq!(spec.overrides.use_karras_sigmas, karras, "{name}");
        }
        // The ancestral sampler of that name is another algorithm.
        for name in ["DPM++ 2S a", "dpmpp_2s_ancestral", "DPM++ 2S a Karras"] {
            assert!(SchedulerSpec::parse(name).is_err(), "{name}");
        }
    }

    #[test]
    fn refuses_noise_prediction_solvers_and_high_orders() {
        let spec = SchedulerSpec::new(SchedulerKind::DpmSolverSinglestep);
        for over in [
            serde_json::json!({"algorithm_type": "dpmsolver"}),
            serde_json::json!({"solver_order": 4}),
        ] {
            let cfg = SchedulerConfig::default().with_overrides(&over).unwrap();
            assert!(matches!(build(&spec, &cfg, 10), Err(Error::Scheduler(_))));
        }
    }
}
