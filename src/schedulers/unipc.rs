//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
//! Diffusion Models"), diffusers' `UniPCMultistepScheduler`: a multistep predictor (UniP) and, once
//! the model has been evaluated at the predicted sample, a corrector (UniC) that refines that
//! sample with the new evaluation before the next prediction, at no extra model call.
//!
//! Options: `solver_type` bh1 (B(h) = h) or bh2 (B(h) = e^h - 1, the default), `predict_x0`
//! (data or noise prediction), `solver_order` 1 to 3, `lower_order_final`, `disable_corrector`
//! (the steps whose corrector is skipped), Karras sigmas, the three timestep spacings and
//! `final_sigmas_type`.

use candle_core::Tensor;

use super::config::{FinalSigmas, SolverType, DDPM_DEFAULTS};
use super::dpm_multistep::{alpha_sigma, lambda};
use super::dpm_singlestep::vp_add_noise;
use super::sigmas::{self, interp_unit_grid, multistep_timesteps, np_round};
use super::{
    at, prediction_coefficients, weighted_sum, BatchNoise, PredictionType, Scheduler,
    SchedulerConfig,
};
use crate::{Error, Result};

/// `UniPCMultistepScheduler`.
pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: PredictionType,
    predict_x0: bool,
    bh1: bool,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// Converted model outputs (x0 or eps) of the last `solver_order` steps, oldest first.
    history: Vec<Tensor>,
    /// The sample the last prediction started from, for the corrector.
    last_sample: Option<Tensor>,
    /// The order of the last prediction, which its correction uses too.
    last_order: usize,
    /// Steps taken so far, capped at `solver_order` (the warm-up of the multistep history).
    lower_order_nums: usize,
}

/// The weights of one UniP / UniC update: of the start sample, of the newest stored output m0,
/// of the older outputs (newest first) and, for the corrector, of the new model output.
struct Update {
    sample: f64,
    m0: f64,
    older: Vec<f64>,
    new_output: f64,
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("a non-empty range, this is a bug");
        if a[pivot][col] == 0.0 || !a[pivot][col].is_finite() {
            return Err(Error::Scheduler(
                "UniPC: the order conditions are singular (repeated noise levels)".into(),
            ));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    Ok(x)
}

impl UniPc {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let class = "UniPCMultistepScheduler";
        config.reject_unsupported(
            class,
            &[
                "thresholding",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_flow_sigmas",
            ],
        )?;
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
        let defaults = DDPM_DEFAULTS;
        let train = config.train_schedule(&defaults, true)?;
        let n = config.num_train();
        let mut timesteps = multistep_timesteps(config, config.spacing(&defaults), steps);
        let steps = timesteps.len();
        let train_sigmas = train.sigmas_f32();
        let final_sigmas = config.final_sigmas_type.unwrap_or(FinalSigmas::Zero);
        let mut levels: Vec<f64> = if config.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0]);
            let sigma_max = config.sigma_max.unwrap_or(train_sigmas[n - 1]);
            let karras = sigmas::karras_sigmas(sigma_min, sigma_max, steps);
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
        // The last level: zero, or the smallest level (of the Karras ramp when it is used).
        let last = match final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin if config.use_karras_sigmas.unwrap_or(false) => {
                levels[levels.len() - 1]
            }
            FinalSigmas::SigmaMin => train_sigmas[0],
        };
        levels.push(last);
        let sigmas: Vec<f64> = levels.into_iter().map(|s| f64::from(s as f32)).collect();

        let bh1 = config.solver_type == Some(SolverType::Bh1);
        let predict_x0 = config.predict_x0.unwrap_or(true);
        let lower_order_final = config.lower_order_final.unwrap_or(true);
        if final_sigmas == FinalSigmas::Zero {
            // With a final level of zero these updates divide by zero (diffusers returns NaN).
            let reason = if bh1 {
                Some("solver_type bh1")
            } else if !predict_x0 {
                Some("predict_x0 false")
            } else if !lower_order_final && solver_order > 1 && steps > 1 {
                Some("lower_order_final false")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::Scheduler(format!(
                    "{class}: {reason} needs final_sigmas_type `sigma_min` (with `zero` the last \
                     step is undefined)"
                )));
            }
        }
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction(),
            predict_x0,
            bh1,
            solver_order,
            lower_order_final,
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            history: Vec::with_capacity(solver_order),
            last_sample: None,
            last_order: 1,
            lower_order_nums: 0,
        })
    }

    fn sigma(&self, index: usize) -> Result<f64> {
        at(&self.sigmas, index, "sigma schedule")
    }

    /// The model output as the solver's variable: x0 (`predict_x0`) or the noise.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let [x0, eps] = prediction_coefficients(self.prediction, alpha_t, sigma_t);
        let (a, b) = if self.predict_x0 { x0 } else { eps };
        weighted_sum(&[(a, sample), (b, model_output)], sample.dtype())
    }

    /// The weights of an update of `order` from level `sigma_s0` to `sigma_t`, the older
    /// outputs being at `older` (newest first, `order - 1` of them). The predictor extrapolates
    /// with them; the corrector also weighs in the model output at `sigma_t`.
    fn update(
        &self,
        sigma_t: f64,
        sigma_s0: f64,
        older: &[f64],
        order: usize,
        corrector: bool,
    ) -> Result<Update> {
        let (alpha_t, sigma_t_vp) = alpha_sigma(sigma_t);
        let (alpha_s0, sigma_s0_vp) = alpha_sigma(sigma_s0);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let mut rks: Vec<f64> = older.iter().map(|&s| (lambda(s) - lambda_s0) / h).collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh1 { hh } else { h_phi_1 };
        // b_i = i! * phi_{i+1}(hh) * hh / B(h), phi from the recursion phi_{k+1} = (phi_k - 1/k!) / hh.
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let rows = |size: usize| -> Vec<Vec<f64>> {
            (0..size)
                .map(|i| rks[..size].iter().map(|r| r.powi(i as i32)).collect())
                .collect()
        };
        let rhos = match (corrector, order) {
            (false, 1) => vec![],
            (false, 2) | (true, 1) => vec![0.5],
            (false, _) => solve(rows(order - 1), b[..order - 1].to_vec())?,
            (true, _) => solve(rows(order), b.clone())?,
        };
        let scale = if self.predict_x0 { alpha_t } else { sigma_t_vp };
        let sample = if self.predict_x0 {
            sigma_t_vp / sigma_s0_vp
        } else {
            alpha_t / alpha_s0
        };
        let mut m0 = -scale * h_phi_1;
        // D1_k = (m_k - m0) / r_k, weighted by rho_k and -scale * B(h).
        let older_weights: Vec<f64> = rks[..order - 1]
            .iter()
            .zip(&rhos)
            .map(|(&rk, &rho)| {
                let w = -scale * b_h * rho / rk;
                m0 -= w;
                w
            })
            .collect();
        let new_output = if corrector {
            let w = -scale * b_h * rhos[order - 1];
            m0 -= w;
            w
        } else {
            0.0
        };
        Ok(Update {
            sample,
            m0,
            older: older_weights,
            new_output,
        })
    }

    /// `update` applied: the start sample, the stored outputs and the new output weighed.
    fn apply(
        &self,
        update: &Update,
        start: &Tensor,
        new_output: Option<&Tensor>,
    ) -> Result<Tensor> {
        let len = self.history.len();
        let mut terms = vec![(update.sample, start), (update.m0, &self.history[len - 1])];
        for (k, &w) in update.older.iter().enumerate() {
            terms.push((w, &self.history[len - 2 - k]));
        }
        if let Some(output) = new_output {
            terms.push((update.new_output, output));
        }
        weighted_sum(&terms, start.dtype())
    }

    /// The noise levels of the `count` stored outputs before the newest, which is at `index`.
    fn older_levels(&self, index: usize, count: usize) -> Result<Vec<f64>> {
        if self.history.len() <= count || index < count {
            return Err(Error::Scheduler(
                "UniPC history out of step with the schedule".into(),
            ));
        }
        (1..=count).map(|k| self.sigma(index - k)).collect()
    }
}

impl Scheduler for UniPc {
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
        _noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let converted = self.convert(model_output, sample, self.sigma(step_index)?)?;
        // Correct the sample the last prediction produced, with the output just computed at it.
        let corrected;
        let sample = match &self.last_sample {
            Some(last) if step_index > 0 && !self.disable_corrector.contains(&(step_index - 1)) => {
                let order = self.last_order;
                let older = self.older_levels(step_index - 1, order - 1)?;
                let update = self.update(
                    self.sigma(step_index)?,
                    self.sigma(step_index - 1)?,
                    &older,
                    order,
                    true,
                )?;
                corrected = self.apply(&update, last, Some(&converted))?;
                &corrected
            }
            _ => sample,
        };
        if self.history.len() == self.solver_order {
            self.history.remove(0);
        }
        self.history.push(converted);

        let remaining = self.timesteps.len() - step_index;
        let mut order = if self.lower_order_final {
            self.solver_order.min(remaining)
        } else {
            self.solver_order
        };
        order = order.min(self.lower_order_nums + 1);
        let older = self.older_levels(step_index, order - 1)?;
        let update = self.update(
            self.sigma(step_index + 1)?,
            self.sigma(step_index)?,
            &older,
            order,
            false,
        )?;
        let prev = self.apply(&update, sample, None)?;
        self.last_sample = Some(sample.clone());
        self.last_order = order;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
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
    fn solves_small_systems() {
        let x = solve(vec![vec![0.0, 2.0], vec![1.0, 1.0]], vec![4.0, 3.0]).unwrap();
        assert_eq!(x, vec![1.0, 2.0]);
        assert!(solve(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_err());
    }

    #[test]
    fn parses_unipc_names() {
        for (name, karras) in [
            ("UniPC", Some(false)),
            ("uni_pc", Some(false)),
            ("uni_pc_bh2", Some(false)),
            ("UniPC Karras", Some(true)),
            ("UniPCMultistepScheduler", None),
            ("UniPCMultistep", None),
        ] {
            let spec = SchedulerSpec::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.kind, SchedulerKind::UniPcMultistep, "{name}");
            assert_eq!(spec.overrides.use_karras_sigmas, karras, "{name}");
        }
    }

    #[test]
    fn refuses_updates_undefined_at_a_zero_final_sigma() {
        let spec = SchedulerSpec::new(SchedulerKind::UniPcMultistep);
        for over in [
            serde_json::json!({"solver_type": "bh1"}),
            serde_json::json!({"predict_x0": false}),
            serde_json::json!({"lower_order_final": false}),
        ] {
            let cfg = SchedulerConfig::default().with_overrides(&over).unwrap();
            let err = build(&spec, &cfg, 10).err().expect("refused");
            assert!(err.to_string().contains("sigma_min"), "{err}");
            let cfg = cfg
                .with_overrides(&serde_json::json!({"final_sigmas_type": "sigma_min"}))
                .unwrap();
            assert!(build(&spec, &cfg, 10).is_ok(), "{over}");
        }
    }
}
