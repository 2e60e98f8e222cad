//! Linear multistep sampling over noise levels sigma (k-diffusion's `sample_lms`; Karras et al.
//! 2022 for the sigma parameterisation), diffusers' `LMSDiscreteScheduler`: the probability-flow
//! ODE dx/dsigma = (x - x0) / sigma is integrated with the Lagrange polynomial through the last
//! (up to 4) derivatives, optionally on Karras sigmas ("LMS Karras").
//!
//! The coefficient of each stored derivative is the integral of its Lagrange basis polynomial over
//! the step. diffusers gets it from adaptive quadrature (scipy `quad`, whose 21-point rule is exact
//! for these cubic polynomials up to rounding); here it is computed exactly by Gauss-Legendre
//! quadrature with three nodes, exact for polynomials up to degree 5.

use candle_core::{DType, Tensor};

use super::config::FinalSigmas;
use super::euler::{sigma_schedule_accessors, SigmaSchedule};
use super::{weighted_sum, BatchNoise, Scheduler, SchedulerConfig};
use crate::Result;

/// The multistep order diffusers' pipelines use (`step(order=4)` default).
const MAX_ORDER: usize = 4;

pub struct Lms {
    schedule: SigmaSchedule,
    /// ODE derivatives of the last steps, oldest first (at most `MAX_ORDER`).
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported(
            "LMSDiscreteScheduler",
            &["use_exponential_sigmas", "use_beta_sigmas"],
        )?;
        // The class has no sigma_min / sigma_max / zero-SNR options: Karras sigmas span the
        // schedule's own end points, whatever another class's config set.
        let config = SchedulerConfig {
            sigma_min: None,
            sigma_max: None,
            rescale_betas_zero_snr: None,
            ..config.clone()
        };
        let karras = config.use_karras_sigmas.unwrap_or(false);
        Ok(Self {
            schedule: SigmaSchedule::euler(&config, steps, karras, FinalSigmas::Zero)?,
            derivatives: Vec::with_capacity(MAX_ORDER),
        })
    }
}

/// `integral over [a, b] of prod_{j != k} (tau - nodes[j]) / (nodes[k] - nodes[j]) dtau`: the
/// weight of the value at `nodes[k]` in the integral of the polynomial interpolating the nodes.
pub(crate) fn lagrange_integral(nodes: &[f64], k: usize, a: f64, b: f64) -> f64 {
    // Gauss-Legendre, 3 nodes on [-1, 1]: exact for degree <= 5 (here the degree is <= 3).
    const X: [f64; 3] = [-0.774_596_669_241_483_4, 0.0, 0.774_596_669_241_483_4];
    const W: [f64; 3] = [5.0 / 9.0, 8.0 / 9.0, 5.0 / 9.0];
    debug_assert!(nodes.len() <= 4, "degree above 5 needs more Gauss nodes");
    let basis = |tau: f64| {
        nodes
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != k)
            .map(|(_, &node)| (tau - node) / (nodes[k] - node))
            .product::<f64>()
    };
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    half * X
        .iter()
        .zip(W)
        .map(|(&x, w)| w * basis(mid + half * x))
        .sum::<f64>()
}

impl Scheduler for Lms {
    sigma_schedule_accessors!();

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigma(step_index)?;
        let sigma_next = self.schedule.sigma(step_index + 1)?;
        // d = (x - x0) / sigma with x0 = a * x + b * model_output.
        let (a, b) = self.schedule.data_prediction_coefficients(sigma);
        let keep = match sample.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let derivative = weighted_sum(
            &[((1.0 - a) / sigma, sample), (-b / sigma, model_output)],
            keep,
        )?;
        if self.derivatives.len() == MAX_ORDER {
            self.derivatives.remove(0);
        }
        self.derivatives.push(derivative);

        // The order follows the position in the schedule, as in diffusers: a run entered late
        // (img2img) weights its first derivatives with the coefficients of a longer history.
        let order = (step_index + 1).min(MAX_ORDER);
        let nodes: Vec<f64> = (0..order)
            .map(|back| self.schedule.sigma(step_index - back))
            .collect::<Result<_>>()?;
        let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, sample)];
        for (k, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            terms.push((lagrange_integral(&nodes, k, sigma, sigma_next), derivative));
        }
        weighted_sum(&terms, sample.dtype())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact integral of the Lagrange basis polynomial, from its expanded coefficients.
    fn exact(nodes: &[f64], k: usize, a: f64, b: f64) -> f64 {
        // Coefficients of prod_{j != k} (tau - x_j), lowest degree first.
        let mut poly = vec![1.0];
        let mut denom = 1.0;
        for (j, &x) in nodes.iter().enumerate() {
            if j == k {
                continue;
            }
            let mut next = vec![0.0; poly.len() + 1];
            for (d, &c) in poly.iter().enumerate() {
                next[d + 1] += c;
                next[d] -= c * x;
            }
            poly = next;
            denom *= nodes[k] - x;
        }
        let antiderivative = |t: f64| {
            poly.iter()
                .enumerate()
                .map(|(d, &c)| c * t.powi(d as i32 + 1) / (d + 1) as f64)
                .sum::<f64>()
        };
        (antiderivative(b) - antiderivative(a)) / denom
    }

    #[test]
    fn gauss_legendre_is_exact_for_the_basis_polynomials() {
        let nodes = [14.614_647, 10.2, 6.9, 4.1];
        let mut worst = 0f64;
        for order in 1..=4 {
            for (a, b) in [(14.614_647, 9.3), (4.1, 2.2), (0.35, 0.0), (0.03, 0.0)] {
                let used = &nodes[..order];
                let mut sum = 0.0;
                for k in 0..order {
                    let ours = lagrange_integral(used, k, a, b);
                    let reference = exact(used, k, a, b);
                    worst = worst.max((ours - reference).abs() / reference.abs().max(1.0));
                    sum += ours;
                }
                // The basis polynomials sum to 1, so their integrals sum to b - a.
                assert!((sum - (b - a)).abs() < 1e-12, "{order}: {sum}");
            }
        }
        assert!(worst < 1e-12, "{worst}");
    }

    /// The coefficients diffusers gets from scipy's `quad` (its integrand evaluated in float32)
    /// for SD 1.5's 10-step schedule, at steps 0, 1, 3 and 9.
    #[test]
    fn coefficients_match_scipy_quad() {
        let sigmas = [
            8.390_686_988_830_566,
            5.134_433_269_500_732,
            3.347_764_968_872_070_3,
            2.292_854_785_919_189_5,
            1.623_692_989_349_365_2,
            1.168_216_466_903_686_5,
            0.835_653_245_449_066_2,
            0.574_050_784_111_023,
            0.346_187_293_529_510_5,
            0.041_314_478_963_613_51,
            0.0,
        ];
        let reference: [(usize, &[f64]); 4] = [
            (0, &[-3.256_253_719_329_834]),
            (1, &[-2.276_830_303_808_386, 0.490_162_006_608_432_8]),
            (
                3,
                &[
                    -1.054_255_714_052_576_1,
                    0.507_366_926_136_333_7,
                    -0.133_362_636_445_477_25,
                    0.011_089_612_489_364_36,
                ],
            ),
            (
                9,
                &[
                    -0.047_093_215_456_186_76,
                    0.011_560_109_767_339_954,
                    -0.007_344_925_849_768_973,
                    0.001_563_550_113_281_711_8,
                ],
            ),
        ];
        let mut worst = 0f64;
        for (step, coefficients) in reference {
            let order = coefficients.len();
            let nodes: Vec<f64> = (0..order).map(|back| sigmas[step - back]).collect();
            for (k, &expected) in coefficients.iter().enumerate() {
                let ours = lagrange_integral(&nodes, k, sigmas[step], sigmas[step + 1]);
                worst = worst.max((ours - expected).abs() / expected.abs());
            }
        }
        // scipy integrates a float32 evaluation of the polynomial: ~1e-7 relative noise.
        assert!(worst < 1e-6, "{worst}");
    }
}
