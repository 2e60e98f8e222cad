//! Diffusion exponential integrator sampler (Zhang & Chen 2023, "Fast Sampling of Diffusion
//! Models with Exponential Integrator"), diffusers' `DEISMultistepScheduler`: the log-rho
//! multistep variant of order 1 to 3, which integrates the noise prediction's Lagrange
//! polynomial in log(rho), rho = sigma_t / alpha_t, exactly over each step; optionally on Karras
//! sigmas.
//!
//! Order 1 is DDIM. Higher orders reuse the noise predictions of the previous steps instead of
//! extra model calls; the final steps of a short schedule drop to lower order (`lower_order_final`).

use candle_core::Tensor;

use super::config::{DpmAlgorithm, DDPM_DEFAULTS};
use super::dpm_multistep::{alpha_sigma, lambda};
use super::sigmas::{self, interp_unit_grid, multistep_timesteps, np_round};
use super::{
    at, prediction_coefficients, weighted_sum, BatchNoise, PredictionType, Scheduler,
    SchedulerConfig,
};
use crate::{Error, Result};

pub struct Deis {
    timesteps: Vec<f64>,
    /// Karras noise levels per step, and the level the last step lands on (the smallest training
    /// sigma, not zero: log(rho) must stay finite).
    sigmas: Vec<f64>,
    prediction: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    /// Noise predictions of the last `solver_order` steps, oldest first.
    history: Vec<Tensor>,
    /// Steps taken so far, capped at `solver_order`.
    lower_order_nums: usize,
}

impl Deis {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let class = "DEISMultistepScheduler";
        config.reject_unsupported(
            class,
            &[
                "thresholding",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_flow_sigmas",
            ],
        )?;
        // diffusers maps the DPM-Solver algorithm names onto "deis" (the serde alias here).
        if let Some(DpmAlgorithm::SdeDpmSolverPlusPlus | DpmAlgorithm::SdeDpmSolver) =
            config.algorithm_type
        {
            return Err(Error::Scheduler(format!(
                "{class}: algorithm_type must be deis (SDE variants are not implemented upstream)"
            )));
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::Scheduler(format!(
                "{class}: solver_order must be 1, 2 or 3. Given: {solver_order}"
            )));
        }
        // The class has no zero-SNR option: a value set for another class is ignored.
        let config = SchedulerConfig {
            rescale_betas_zero_snr: None,
            ..config.clone()
        };
        let defaults = DDPM_DEFAULTS;
        let train = config.train_schedule(&defaults, false)?;
        let train_sigmas = train.sigmas_f32();
        let mut timesteps = multistep_timesteps(&config, config.spacing(&defaults), steps);
        let sigmas: Vec<f64> = if config.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0]);
            let sigma_max = config
                .sigma_max
                .unwrap_or(train_sigmas[train_sigmas.len() - 1]);
            let mut karras = sigmas::karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = sigmas::log_sigmas_f32(&train_sigmas);
            timesteps = karras
                .iter()
                .map(|&s| np_round(sigmas::sigma_to_t(s, &log_sigmas)))
                .collect();
            karras.push(karras[karras.len() - 1]);
            karras
        } else {
            let mut interpolated: Vec<f64> = timesteps
                .iter()
                .map(|&t| interp_unit_grid(t, &train_sigmas))
                .collect();
            interpolated.push(train_sigmas[0]);
            interpolated
        };
        let sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction: config.prediction(),
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            history: Vec::with_capacity(solver_order),
            lower_order_nums: 0,
        })
    }

    fn sigma(&self, index: usize) -> Result<f64> {
        at(&self.sigmas, index, "sigma schedule")
    }
}

// The log-rho coefficients are differences of two antiderivative values that are large next to
// their difference, more so the finer the schedule. They are evaluated in f64; diffusers uses
// float32 (and numpy's vectorised float32 log), which moves its samples by up to ~2e-5 relative
// at 25 steps and ~3e-4 at 50 (order 3) from the f64 result.

/// An antiderivative, in rho, of the linear Lagrange basis polynomial in log(rho) that is 1 at
/// rho = b and 0 at rho = c, evaluated at `t`.
fn ind2(t: f64, b: f64, c: f64) -> f64 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

/// The same for the quadratic basis polynomial that is 1 at b and 0 at c and d.
fn ind3(t: f64, b: f64, c: f64, d: f64) -> f64 {
    let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
    let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    numerator / ((lb - lc) * (lb - ld))
}

impl Scheduler for Deis {
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
        let len = self.timesteps.len();
        let rho_s0 = self.sigma(step_index)?;
        let rho_t = self.sigma(step_index + 1)?;
        let (alpha_s0, sigma_s0) = alpha_sigma(rho_s0);
        let (alpha_t, sigma_t) = alpha_sigma(rho_t);
        let short = self.lower_order_final && len < 15;
        let lower_order_final = short && step_index + 1 == len;
        let lower_order_second = short && step_index + 2 == len;

        // The model output read as the noise prediction.
        let [_, (ea, eb)] = prediction_coefficients(self.prediction, alpha_s0, sigma_s0);
        let eps = weighted_sum(&[(ea, sample), (eb, model_output)], sample.dtype())?;
        if self.history.len() == self.solver_order {
            self.history.remove(0);
        }
        self.history.push(eps);

        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        // Never more history than has been stored.
        let order = order.min(self.history.len());
        let rho_back = |back: usize| {
            step_index
                .checked_sub(back)
                .ok_or_else(|| Error::Scheduler("multistep history out of step".into()))
                .and_then(|index| self.sigma(index))
        };
        // x_t = alpha_t * (x_s / alpha_s0 + sum_k c_k * eps_k), eps_0 the newest.
        let coefficients: Vec<f64> = match order {
            1 => {
                let h = lambda(rho_t) - lambda(rho_s0);
                vec![-sigma_t * h.exp_m1() / alpha_t]
            }
            2 => {
                let rho_s1 = rho_back(1)?;
                vec![
                    ind2(rho_t, rho_s0, rho_s1) - ind2(rho_s0, rho_s0, rho_s1),
                    ind2(rho_t, rho_s1, rho_s0) - ind2(rho_s0, rho_s1, rho_s0),
                ]
            }
            _ => {
                let (rho_s1, rho_s2) = (rho_back(1)?, rho_back(2)?);
                vec![
                    ind3(rho_t, rho_s0, rho_s1, rho_s2) - ind3(rho_s0, rho_s0, rho_s1, rho_s2),
                    ind3(rho_t, rho_s1, rho_s2, rho_s0) - ind3(rho_s0, rho_s1, rho_s2, rho_s0),
                    ind3(rho_t, rho_s2, rho_s0, rho_s1) - ind3(rho_s0, rho_s2, rho_s0, rho_s1),
                ]
            }
        };
        let mut terms: Vec<(f64, &Tensor)> = vec![(alpha_t / alpha_s0, sample)];
        for (&c, eps) in coefficients.iter().zip(self.history.iter().rev()) {
            terms.push((alpha_t * c, eps));
        }
        let prev = weighted_sum(&terms, sample.dtype())?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index)?);
        weighted_sum(&[(alpha_t, original), (sigma_t, noise)], original.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ind2` and `ind3` are antiderivatives of the Lagrange basis polynomials in log(rho):
    /// their differences over a step equal a numerical integral of the basis.
    #[test]
    fn log_rho_coefficients_integrate_the_basis() {
        let (s0, s1, s2) = (3.0f64, 5.0f64, 8.0f64);
        let (t0, t1) = (s0, 2.0f64);
        // Composite Simpson in rho: error ~1e-14 for these smooth integrands.
        let integrate = |f: &dyn Fn(f64) -> f64| {
            let n = 2000;
            let h = (t1 - t0) / n as f64;
            let weight = |i: usize| match i {
                0 => 1.0,
                i if i == n => 1.0,
                i if i % 2 == 1 => 4.0,
                _ => 2.0,
            };
            (0..=n)
                .map(|i| weight(i) * f(t0 + i as f64 * h))
                .sum::<f64>()
                * h
                / 3.0
        };
        let l = f64::ln;
        let basis2 = |r: f64| (l(r) - l(s1)) / (l(s0) - l(s1));
        let ours2 = ind2(t1, s0, s1) - ind2(t0, s0, s1);
        let reference2 = integrate(&basis2);
        assert!(
            (ours2 - reference2).abs() < 1e-10,
            "{ours2} vs {reference2}"
        );
        let basis3 = |r: f64| (l(r) - l(s1)) * (l(r) - l(s2)) / ((l(s0) - l(s1)) * (l(s0) - l(s2)));
        let ours3 = ind3(t1, s0, s1, s2) - ind3(t0, s0, s1, s2);
        let reference3 = integrate(&basis3);
        assert!(
            (ours3 - reference3).abs() < 1e-10,
            "{ours3} vs {reference3}"
        );
    }
}
