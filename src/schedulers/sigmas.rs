//! Noise-schedule tables shared by the schedulers: training betas and their cumulative alpha
//! products, inference timestep spacing, Karras sigmas and the sigma -> timestep map.
//!
//! The training tables are built in float32 exactly as diffusers builds them with torch (its
//! `linspace` and `cumprod` kernels round in a particular way), because every scheduler reads its
//! coefficients from them and a model's schedule is defined by those float32 values. Everything
//! derived from them afterwards is computed in f64. The inference grids use numpy's rounding rules
//! (`linspace`, float `arange`, round-half-to-even) so timesteps land on the same integers.

use crate::{Error, Result};

use super::config::{BetaSchedule, FinalSigmas, TimestepSpacing};
use super::SchedulerConfig;

/// The training noise schedule: `alphas_cumprod[t]` for t in 0..num_train_timesteps, as float32
/// values held in f64.
#[derive(Debug, Clone)]
pub struct TrainSchedule {
    pub alphas_cumprod: Vec<f64>,
}

/// What a scheduler needs to build its training schedule, with its class's defaults filled in.
pub struct TrainScheduleSpec<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
    /// Sigma-based schedulers keep the last alpha product just above zero after a zero-SNR
    /// rescale so that its sigma stays finite.
    pub zero_snr_floor: bool,
}

impl TrainSchedule {
    pub fn new(spec: &TrainScheduleSpec) -> Result<Self> {
        let n = spec.num_train_timesteps;
        if n == 0 {
            return Err(Error::Scheduler(
                "num_train_timesteps must be >= 1. Given: 0".into(),
            ));
        }
        let mut betas: Vec<f32> = match spec.trained_betas {
            Some(betas) => {
                if betas.len() != n {
                    return Err(Error::Scheduler(format!(
                        "trained_betas has {} values, num_train_timesteps is {n}",
                        betas.len()
                    )));
                }
                betas.iter().map(|&b| b as f32).collect()
            }
            None => match spec.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(spec.beta_start, spec.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(spec.beta_start.sqrt(), spec.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => squaredcos_cap_v2_betas(n),
            },
        };
        if spec.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod: Vec<f64> = torch_cumprod_f32(&alphas)
            .into_iter()
            .map(f64::from)
            .collect();
        if spec.rescale_betas_zero_snr && spec.zero_snr_floor {
            alphas_cumprod[n - 1] = 2f64.powi(-24);
        }
        Ok(Self { alphas_cumprod })
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `alphas_cumprod[t]` for an integer timestep, or an error naming the timestep.
    pub fn alpha_cumprod(&self, timestep: i64) -> Result<f64> {
        usize::try_from(timestep)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t).copied())
            .ok_or_else(|| {
                Error::Scheduler(format!(
                    "timestep {timestep} is outside the training schedule 0..{}",
                    self.len()
                ))
            })
    }

    /// The Karras-style noise levels `sqrt((1 - a) / a)` of each training timestep, computed in
    /// float32 as diffusers does.
    pub fn sigmas_f32(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                f64::from(((1.0 - a) / a).sqrt())
            })
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: float32 endpoints and step, each
/// element computed with one rounding from the nearer end.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                (f64::from(start) + f64::from(step) * i as f64) as f32
            } else {
                (f64::from(end) - f64::from(step) * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 vector: accumulated in f64, each output rounded to f32.
fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// The cosine schedule of Nichol & Dhariwal (2021), betas capped at 0.999.
fn squaredcos_cap_v2_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescale betas to a zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
/// Sample Steps are Flawed", Algorithm 1), in float32 as diffusers does.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = torch_cumprod_f32(&alphas)
        .into_iter()
        .map(f32::sqrt)
        .collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for s in sqrt_bar.iter_mut() {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for k in 1..bar.len() {
        out.push(1.0 - bar[k] / bar[k - 1]);
    }
    out
}

/// `numpy.linspace(start, stop, num, endpoint)` in f64.
pub fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    if div == 0 {
        return vec![start; num];
    }
    let step = (stop - start) / div as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if endpoint && num > 1 {
        out[num - 1] = stop;
    }
    out
}

/// `numpy.arange(start, stop, step)` for a float step: numpy sets the first two elements, then
/// fills element i with `start + i * (second - first)`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `numpy.interp(x, 0..fp.len(), fp)`: piecewise-linear interpolation over integer abscissae.
pub fn interp_unit_grid(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// The noise levels of Karras et al. (2022, "Elucidating the Design Space of Diffusion-Based
/// Generative Models", eq. 5) with rho = 7, from `sigma_max` down to `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, steps, true)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// `sigmas` followed by the level the final step lands on (zero, or the smallest training sigma),
/// every level rounded to float32 as diffusers stores them.
pub fn with_final_sigma(
    mut sigmas: Vec<f64>,
    final_sigmas: FinalSigmas,
    train_sigmas: &[f64],
) -> Vec<f64> {
    sigmas.push(match final_sigmas {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => train_sigmas[0],
    });
    sigmas.into_iter().map(|s| f64::from(s as f32)).collect()
}

/// The (fractional) training timestep whose noise level is `sigma`, interpolating linearly in
/// log-sigma between the two neighbouring training timesteps (diffusers' `_sigma_to_t`).
/// `log_sigmas` are the logs of the training sigmas, increasing with t.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last training log-sigma at or below `log_sigma` (0 if none), at most n - 2.
    let at_or_below = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low_idx = at_or_below.saturating_sub(1).min(n.saturating_sub(2));
    let high_idx = (low_idx + 1).min(n - 1);
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The logs of the training sigmas, rounded to float32 as numpy computes them on a float32 array.
pub fn log_sigmas_f32(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|&s| f64::from(s.ln() as f32))
        .collect()
}

/// Round half to even, as numpy's `round` does.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// The integer timesteps of the multistep solvers, per spacing: `steps` of the `steps + 1`
/// evenly spaced points, dropping the one at 0.
pub(crate) fn multistep_timesteps(
    config: &SchedulerConfig,
    spacing: TimestepSpacing,
    steps: usize,
) -> Vec<f64> {
    let n = config.num_train();
    match spacing {
        TimestepSpacing::Linspace => {
            let mut grid = np_linspace(0.0, n as f64 - 1.0, steps + 1, true);
            grid.remove(0);
            grid.into_iter().rev().map(np_round).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (n / (steps + 1)) as f64;
            (1..=steps)
                .rev()
                .map(|i| i as f64 * ratio + config.offset() as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(n as f64, 0.0, -(n as f64 / steps as f64))
            .into_iter()
            .map(|t| np_round(t) - 1.0)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_matches_numpy_length_rule() {
        let v = np_arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], 1000.0);
        assert!(np_arange(0.0, 0.0, -1.0).is_empty());
    }

    #[test]
    fn linspace_endpoints() {
        let v = np_linspace(0.0, 999.0, 4, true);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
        let v = np_linspace(0.0, 10.0, 4, false);
        assert_eq!(v, vec![0.0, 2.5, 5.0, 7.5]);
    }

    #[test]
    fn sigma_to_t_hits_training_points() {
        let sigmas: Vec<f64> = (1..=10).map(|i| i as f64).collect();
        let logs: Vec<f64> = sigmas.iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(4.0, &logs) - 3.0).abs() < 1e-12);
        assert_eq!(sigma_to_t(0.5, &logs), 0.0);
        assert_eq!(sigma_to_t(100.0, &logs), 9.0);
    }

    #[test]
    fn karras_endpoints() {
        let s = karras_sigmas(0.03, 14.6, 5);
        assert!((s[0] - 14.6).abs() < 1e-9 && (s[4] - 0.03).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }
}
