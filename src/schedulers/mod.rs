//! Diffusion samplers ("schedulers" in diffusers): they pick the timesteps the model is run at and
//! turn each model prediction into the next, less noisy, latent.
//!
//! One file per family behind the [`Scheduler`] trait, each numerically following its diffusers
//! class: DDIM, DDPM, PNDM/PLMS, LMS, Euler and Euler ancestral, Heun, KDPM2 (+ ancestral),
//! DPM-Solver multistep (dpmsolver, dpmsolver++, their SDE forms), DPM-Solver singlestep,
//! DPM++ SDE, UniPC, DEIS and LCM. Samplers that have no meaning for a latent diffusion model
//! (KarrasVe, ScoreSdeVe, IPNDM, DDIMInverse) are refused by name with the reason. Names from
//! every API dialect parse into one [`SchedulerSpec`]; [`build`] combines it with the model's
//! `scheduler_config.json` ([`SchedulerConfig`]) and a step count. Adding a scheduler is one file,
//! one [`SchedulerKind`] arm and its names in [`SchedulerSpec::parse`]'s table.

mod config;
mod ddim;
mod dpm_multistep;
mod euler;
mod lcm;
pub mod sigmas;
// PNDM / PLMS, DDPM, LMS, DEIS, and the diffusers classes refused by name.
mod ddpm;
mod deis;
#[cfg(test)]
mod kind_tests;
mod lms;
mod pndm;
mod refused;
// Second-order, singlestep, UniPC and SDE samplers.
pub mod dpm_sde;
mod dpm_singlestep;
mod heun;
mod kdpm2;
mod unipc;

use candle_core::{DType, Tensor};

pub use crate::pipeline::noise::BatchNoise;
use crate::{Error, Result};
pub use config::{
    BetaSchedule, DpmAlgorithm, FinalSigmas, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing,
};
use sigmas::TrainSchedule;

/// A sampler configured for one generation: its timesteps and how to step between them.
pub trait Scheduler: Send {
    /// Model timesteps, one per step (may be fractional, e.g. Karras Euler).
    fn timesteps(&self) -> &[f64];
    /// The noise levels of sigma-parameterised schedulers (one more than the timesteps: the
    /// last is where the final step lands); `None` for the others.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    /// The factor diffusers multiplies the initial unit-variance noise by (1 unless the sampler
    /// works on a sigma schedule).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The model input for step `step_index`: the sample itself, unless the sampler works on a
    /// sigma schedule (Euler divides by `sqrt(sigma^2 + 1)`).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Advances from step `step_index` to the next; stochastic samplers draw from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor>;
    /// img2img: noise `original` to the level of step `step_index` of the schedule.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// How many model evaluations per listed timestep (1 for all first-order/multistep ones).
    fn order(&self) -> usize {
        1
    }
}

/// The scheduler families this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    Lcm,
    // Alpha-schedule and multistep families.
    Pndm,
    /// PNDM's pseudo linear multistep part alone (`skip_prk_steps` forced on), as the "PLMS"
    /// sampler of the original latent diffusion code.
    Plms,
    Ddpm,
    Lms,
    Deis,
    Heun,
    Kdpm2,
    Kdpm2Ancestral,
    DpmSolverSinglestep,
    UniPcMultistep,
    DpmSolverSde,
}

impl SchedulerKind {
    /// Every family, in the order the docs list them.
    pub const ALL: [SchedulerKind; 16] = [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Pndm,
        SchedulerKind::Plms,
        SchedulerKind::Lms,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Heun,
        SchedulerKind::Kdpm2,
        SchedulerKind::Kdpm2Ancestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::DpmSolverSinglestep,
        SchedulerKind::DpmSolverSde,
        SchedulerKind::UniPcMultistep,
        SchedulerKind::Deis,
        SchedulerKind::Lcm,
    ];

    /// The diffusers class this kind reproduces.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::Pndm | SchedulerKind::Plms => "PNDMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::Deis => "DEISMultistepScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Kdpm2 => "KDPM2DiscreteScheduler",
            SchedulerKind::Kdpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            SchedulerKind::DpmSolverSinglestep => "DPMSolverSinglestepScheduler",
            SchedulerKind::UniPcMultistep => "UniPCMultistepScheduler",
            SchedulerKind::DpmSolverSde => "DPMSolverSDEScheduler",
        }
    }
}

/// A scheduler choice as a client makes it: the family plus the scheduler-config values the
/// choice sets over the model's own `scheduler_config.json`, either implied by the name
/// ("DPM++ 2M Karras" = multistep DPM-Solver++ with `use_karras_sigmas`) or sent as options
/// (`use_karras_sigmas`, `algorithm_type`, `solver_order`, `timestep_spacing`, ...).
#[derive(Debug, Clone)]
pub struct SchedulerSpec {
    pub kind: SchedulerKind,
    /// Fields set here replace the model config's; `None` keeps the model's value.
    pub overrides: SchedulerConfig,
    /// DDIM's eta (0 = deterministic DDIM, 1 = DDPM-like); a call argument in diffusers.
    pub eta: Option<f64>,
}

/// A name clients use and the spec it stands for.
struct NamedSpec {
    /// Shown in error messages.
    shown: &'static str,
    /// Normalised spellings: lower case, no spaces, `_`, `-`, `.`, no "scheduler" suffix.
    aliases: &'static [&'static str],
    kind: SchedulerKind,
    karras: Option<bool>,
    algorithm_type: Option<DpmAlgorithm>,
}

const fn named(
    shown: &'static str,
    aliases: &'static [&'static str],
    kind: SchedulerKind,
    karras: Option<bool>,
    algorithm_type: Option<DpmAlgorithm>,
) -> NamedSpec {
    NamedSpec {
        shown,
        aliases,
        kind,
        karras,
        algorithm_type,
    }
}

const NAMES: &[NamedSpec] = {
    use DpmAlgorithm::*;
    use SchedulerKind::*;
    const PP: Option<DpmAlgorithm> = Some(DpmSolverPlusPlus);
    const SDE: Option<DpmAlgorithm> = Some(SdeDpmSolverPlusPlus);
    &[
        named("DDIM", &["ddim"], Ddim, None, None),
        named("Euler", &["euler", "keuler"], Euler, Some(false), None),
        named(
            "Euler Karras",
            &["eulerkarras", "keulerkarras"],
            Euler,
            Some(true),
            None,
        ),
        named(
            "EulerDiscreteScheduler",
            &["eulerdiscrete"],
            Euler,
            None,
            None,
        ),
        named(
            "Euler a",
            &["eulera", "eulerancestral", "keulera", "keulerancestral"],
            EulerAncestral,
            None,
            None,
        ),
        named(
            "EulerAncestralDiscreteScheduler",
            &["eulerancestraldiscrete"],
            EulerAncestral,
            None,
            None,
        ),
        named(
            "DPM++ 2M",
            &["dpm++2m", "dpmpp2m", "kdpmpp2m"],
            DpmSolverMultistep,
            Some(false),
            PP,
        ),
        named(
            "DPM++ 2M Karras",
            &["dpm++2mkarras", "dpmpp2mkarras", "kdpmpp2mkarras"],
            DpmSolverMultistep,
            Some(true),
            PP,
        ),
        named(
            "DPM++ 2M SDE",
            &["dpm++2msde", "dpmpp2msde", "kdpmpp2msde"],
            DpmSolverMultistep,
            Some(false),
            SDE,
        ),
        named(
            "DPM++ 2M SDE Karras",
            &["dpm++2msdekarras", "dpmpp2msdekarras", "kdpmpp2msdekarras"],
            DpmSolverMultistep,
            Some(true),
            SDE,
        ),
        named(
            "DPMSolverMultistepScheduler",
            &["dpmsolvermultistep"],
            DpmSolverMultistep,
            None,
            None,
        ),
        named("LCM", &["lcm"], Lcm, None, None),
        // PNDM / PLMS, DDPM, LMS, DEIS.
        named("PNDM", &["pndm"], Pndm, None, None),
        named("PLMS", &["plms"], Plms, None, None),
        named("DDPM", &["ddpm"], Ddpm, None, None),
        named("LMS", &["lms", "klms"], Lms, Some(false), None),
        named(
            "LMS Karras",
            &["lmskarras", "klmskarras"],
            Lms,
            Some(true),
            None,
        ),
        named("LMSDiscreteScheduler", &["lmsdiscrete"], Lms, None, None),
        named("DEIS", &["deis", "deismultistep"], Deis, None, None),
        // Second-order k-diffusion samplers, DPM-Solver singlestep and SDE, UniPC.
        named("Heun", &["heun", "kheun"], Heun, Some(false), None),
        named(
            "Heun Karras",
            &["heunkarras", "kheunkarras"],
            Heun,
            Some(true),
            None,
        ),
        named("HeunDiscreteScheduler", &["heundiscrete"], Heun, None, None),
        named("DPM2", &["dpm2", "kdpm2"], Kdpm2, Some(false), None),
        named(
            "DPM2 Karras",
            &["dpm2karras", "kdpm2karras"],
            Kdpm2,
            Some(true),
            None,
        ),
        named(
            "KDPM2DiscreteScheduler",
            &["kdpm2discrete"],
            Kdpm2,
            None,
            None,
        ),
        named(
            "DPM2 a",
            &["dpm2a", "kdpm2a", "dpm2ancestral", "kdpm2ancestral"],
            Kdpm2Ancestral,
            Some(false),
            None,
        ),
        named(
            "DPM2 a Karras",
            &[
                "dpm2akarras",
                "kdpm2akarras",
                "dpm2ancestralkarras",
                "kdpm2ancestralkarras",
            ],
            Kdpm2Ancestral,
            Some(true),
            None,
        ),
        named(
            "KDPM2AncestralDiscreteScheduler",
            &["kdpm2ancestraldiscrete"],
            Kdpm2Ancestral,
            None,
            None,
        ),
        // Singlestep DPM-Solver++ of order 2 (the class default order). Not "DPM++ 2S a": that
        // sampler adds ancestral noise and steps through lambda midpoints, a different algorithm.
        named(
            "DPM++ 2S",
            &["dpm++2s", "dpmpp2s"],
            DpmSolverSinglestep,
            Some(false),
            PP,
        ),
        named(
            "DPM++ 2S Karras",
            &["dpm++2skarras", "dpmpp2skarras"],
            DpmSolverSinglestep,
            Some(true),
            PP,
        ),
        named(
            "DPMSolverSinglestepScheduler",
            &["dpmsolversinglestep"],
            DpmSolverSinglestep,
            None,
            None,
        ),
        named(
            "DPM++ SDE",
            &["dpm++sde", "dpmppsde", "kdpmppsde", "dpmppsdegpu"],
            DpmSolverSde,
            Some(false),
            None,
        ),
        named(
            "DPM++ SDE Karras",
            &[
                "dpm++sdekarras",
                "dpmppsdekarras",
                "kdpmppsdekarras",
                "dpmppsdegpukarras",
            ],
            DpmSolverSde,
            Some(true),
            None,
        ),
        named(
            "DPMSolverSDEScheduler",
            &["dpmsolversde"],
            DpmSolverSde,
            None,
            None,
        ),
        named(
            "UniPC",
            &["unipc", "unipcbh2"],
            UniPcMultistep,
            Some(false),
            None,
        ),
        named(
            "UniPC Karras",
            &["unipckarras", "unipcbh2karras"],
            UniPcMultistep,
            Some(true),
            None,
        ),
        named(
            "UniPCMultistepScheduler",
            &["unipcmultistep"],
            UniPcMultistep,
            None,
            None,
        ),
    ]
};

impl SchedulerSpec {
    /// A spec of `kind` with every option taken from the config.
    pub fn new(kind: SchedulerKind) -> Self {
        Self {
            kind,
            overrides: SchedulerConfig::default(),
            eta: None,
        }
    }

    /// The names [`SchedulerSpec::parse`] accepts besides class names, as shown to users.
    pub fn accepted_names() -> Vec<&'static str> {
        NAMES.iter().map(|named| named.shown).collect()
    }

    /// Parses a scheduler name: a diffusers class name with or without the "Scheduler" suffix, or
    /// a common sampler name ("DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LCM",
    /// ...), case-insensitively. An unknown name is an `Error::Scheduler` listing accepted names.
    pub fn parse(name: &str) -> Result<Self> {
        let mut key: String = name
            .chars()
            .filter(|c| !(c.is_whitespace() || matches!(c, '_' | '-' | '.')))
            .flat_map(char::to_lowercase)
            .collect();
        if let Some(stripped) = key.strip_suffix("scheduler") {
            key.truncate(stripped.len());
        }
        refused::check(&key, name)?;
        NAMES
            .iter()
            .find(|named| named.aliases.contains(&key.as_str()))
            .map(|named| {
                let mut spec = Self::new(named.kind);
                spec.overrides.use_karras_sigmas = named.karras;
                spec.overrides.algorithm_type = named.algorithm_type;
                spec
            })
            .ok_or_else(|| {
                let accepted: Vec<&str> = NAMES.iter().map(|named| named.shown).collect();
                let mut classes: Vec<&str> =
                    SchedulerKind::ALL.iter().map(|k| k.class_name()).collect();
                classes.dedup();
                Error::Scheduler(format!(
                    "unknown scheduler `{name}`; accepted: {} (or a diffusers class name with or \
                     without the `Scheduler` suffix: {})",
                    accepted.join(", "),
                    classes.join(", ")
                ))
            })
    }
}

/// A scheduler of `spec` on the model's `config`, set up for `num_inference_steps` steps.
pub fn build(
    spec: &SchedulerSpec,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 {
        return Err(Error::Scheduler(
            "num_inference_steps must be >= 1. Given: 0".into(),
        ));
    }
    let num_train = config.num_train();
    if num_inference_steps > num_train {
        return Err(Error::Scheduler(format!(
            "num_inference_steps must be <= {num_train} (the model's training timesteps). Given: {num_inference_steps}"
        )));
    }
    let config = config.overridden_by(&spec.overrides)?;
    let steps = num_inference_steps;
    Ok(match spec.kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&config, steps, spec.eta.unwrap_or(0.0))?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(&config, steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler::Euler::ancestral(&config, steps)?),
        SchedulerKind::DpmSolverMultistep => {
            Box::new(dpm_multistep::DpmSolverMultistep::new(&config, steps)?)
        }
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(&config, steps)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(&config, steps, None)?),
        SchedulerKind::Plms => Box::new(pndm::Pndm::new(&config, steps, Some(true))?),
        SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(&config, steps)?),
        SchedulerKind::Lms => Box::new(lms::Lms::new(&config, steps)?),
        SchedulerKind::Deis => Box::new(deis::Deis::new(&config, steps)?),
        SchedulerKind::Heun => Box::new(heun::Heun::new(&config, steps)?),
        SchedulerKind::Kdpm2 => Box::new(kdpm2::Kdpm2::new(&config, steps)?),
        SchedulerKind::Kdpm2Ancestral => Box::new(kdpm2::Kdpm2::ancestral(&config, steps)?),
        SchedulerKind::DpmSolverSinglestep => {
            Box::new(dpm_singlestep::DpmSolverSinglestep::new(&config, steps)?)
        }
        SchedulerKind::UniPcMultistep => Box::new(unipc::UniPc::new(&config, steps)?),
        SchedulerKind::DpmSolverSde => Box::new(dpm_sde::DpmSolverSde::new(&config, steps)?),
    })
}

/// `sum_i coef_i * tensor_i`, returned in `out_dtype`. Coefficients are f64; the arithmetic runs in
/// the tensors' dtype, except that half-precision tensors are combined in f32 and rounded once at
/// the end, as diffusers' sigma-based schedulers upcast the sample.
pub(crate) fn weighted_sum(terms: &[(f64, &Tensor)], out_dtype: DType) -> Result<Tensor> {
    let compute = match out_dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    let mut acc: Option<Tensor> = None;
    for &(coef, tensor) in terms {
        if coef == 0.0 {
            continue;
        }
        let t = tensor.to_dtype(compute)?;
        let scaled = if coef == 1.0 { t } else { t.affine(coef, 0.0)? };
        acc = Some(match acc {
            None => scaled,
            Some(a) => (a + scaled)?,
        });
    }
    let sum = match acc {
        Some(sum) => sum,
        None => {
            let first = terms
                .first()
                .expect("weighted_sum needs at least one term, this is a bug");
            first.1.zeros_like()?
        }
    };
    Ok(sum.to_dtype(out_dtype)?)
}

/// The model output read as the clean sample x0 and as the noise eps, each as coefficients
/// `(a, b)` of `a * sample + b * model_output`, for a sample `alpha_t * x0 + sigma_t * eps` of the
/// variance-preserving process: `[x0, eps]`.
pub(crate) fn prediction_coefficients(
    prediction: PredictionType,
    alpha_t: f64,
    sigma_t: f64,
) -> [(f64, f64); 2] {
    match prediction {
        PredictionType::Epsilon => [(1.0 / alpha_t, -sigma_t / alpha_t), (0.0, 1.0)],
        PredictionType::Sample => [(0.0, 1.0), (1.0 / sigma_t, -alpha_t / sigma_t)],
        PredictionType::VPrediction => [(alpha_t, -sigma_t), (sigma_t, alpha_t)],
    }
}

/// [`prediction_coefficients`] at training timestep `t` of an alpha-parameterised schedule,
/// where `alpha_t = sqrt(alphas_cumprod[t])`.
pub(crate) fn alpha_prediction_coefficients(
    prediction: PredictionType,
    alpha_cumprod: f64,
) -> [(f64, f64); 2] {
    prediction_coefficients(
        prediction,
        alpha_cumprod.sqrt(),
        (1.0 - alpha_cumprod).sqrt(),
    )
}

/// img2img noising of the alpha-parameterised schedulers:
/// `sqrt(a_t) * original + sqrt(1 - a_t) * noise`.
pub(crate) fn alpha_add_noise(
    train: &TrainSchedule,
    original: &Tensor,
    noise: &Tensor,
    timestep: i64,
) -> Result<Tensor> {
    let alpha = train.alpha_cumprod(timestep)?;
    weighted_sum(
        &[(alpha.sqrt(), original), ((1.0 - alpha).sqrt(), noise)],
        original.dtype(),
    )
}

/// The per-image noise a stochastic step adds, shaped like `like` ([B, ...]), drawn from `noise`
/// (one generator per image, continuing its stream) in f32.
pub(crate) fn step_noise(noise: &mut BatchNoise, like: &Tensor) -> Result<Tensor> {
    let dims = like.dims();
    if dims.first() != Some(&noise.len()) {
        return Err(Error::Scheduler(format!(
            "a batch of {} latents needs as many noise generators, got {}",
            dims.first().copied().unwrap_or(0),
            noise.len()
        )));
    }
    noise.randn(&dims[1..], like.device(), DType::F32)
}

/// The entry of `values` for `step_index`, or an error if the index is past the schedule.
pub(crate) fn at<T: Copy>(values: &[T], step_index: usize, what: &str) -> Result<T> {
    values.get(step_index).copied().ok_or_else(|| {
        Error::Scheduler(format!(
            "step index {step_index} is past the end of the {what} ({} entries)",
            values.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sampler_and_class_names() {
        let cases: &[(&str, SchedulerKind, Option<bool>)] = &[
            ("DDIM", SchedulerKind::Ddim, None),
            ("DDIMScheduler", SchedulerKind::Ddim, None),
            ("ddim scheduler", SchedulerKind::Ddim, None),
            ("Euler", SchedulerKind::Euler, Some(false)),
            ("EulerDiscrete", SchedulerKind::Euler, None),
            ("eulerdiscretescheduler", SchedulerKind::Euler, None),
            ("Euler a", SchedulerKind::EulerAncestral, None),
            ("euler_a", SchedulerKind::EulerAncestral, None),
            (
                "EulerAncestralDiscreteScheduler",
                SchedulerKind::EulerAncestral,
                None,
            ),
            ("DPM++ 2M", SchedulerKind::DpmSolverMultistep, Some(false)),
            (
                "dpm++ 2m karras",
                SchedulerKind::DpmSolverMultistep,
                Some(true),
            ),
            (
                "DPMPP_2M_Karras",
                SchedulerKind::DpmSolverMultistep,
                Some(true),
            ),
            (
                "DPMSolverMultistep",
                SchedulerKind::DpmSolverMultistep,
                None,
            ),
            (
                "DPMSolverMultistepScheduler",
                SchedulerKind::DpmSolverMultistep,
                None,
            ),
            ("LCM", SchedulerKind::Lcm, None),
            ("LCMScheduler", SchedulerKind::Lcm, None),
        ];
        for &(name, kind, karras) in cases {
            let spec = SchedulerSpec::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.kind, kind, "{name}");
            assert_eq!(spec.overrides.use_karras_sigmas, karras, "{name}");
        }
        let sde = SchedulerSpec::parse("DPM++ 2M SDE Karras").unwrap();
        assert_eq!(
            sde.overrides.algorithm_type,
            Some(DpmAlgorithm::SdeDpmSolverPlusPlus)
        );
        assert_eq!(sde.overrides.use_karras_sigmas, Some(true));
    }

    #[test]
    fn unknown_name_lists_accepted_names() {
        let err = SchedulerSpec::parse("Restart").unwrap_err().to_string();
        assert!(err.contains("Restart"), "{err}");
        for name in [
            "DDIM",
            "Euler a",
            "DPM++ 2M Karras",
            "LCM",
            "DPMSolverMultistepScheduler",
        ] {
            assert!(err.contains(name), "{err}");
        }
        assert!(SchedulerSpec::parse("").is_err());
        assert!(SchedulerSpec::parse("Scheduler").is_err());
        assert!(SchedulerSpec::parse("Euler ancestral karras").is_err());
    }

    #[test]
    fn zero_steps_is_an_error() {
        for kind in [
            SchedulerKind::Ddim,
            SchedulerKind::Euler,
            SchedulerKind::EulerAncestral,
            SchedulerKind::DpmSolverMultistep,
            SchedulerKind::Lcm,
        ] {
            let spec = SchedulerSpec::new(kind);
            let cfg = SchedulerConfig::default();
            assert!(matches!(build(&spec, &cfg, 0), Err(Error::Scheduler(_))));
            assert!(matches!(build(&spec, &cfg, 1001), Err(Error::Scheduler(_))));
            let s = build(&spec, &cfg, 1).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert_eq!(s.timesteps().len(), 1, "{kind:?}");
        }
    }

    /// SD1.5's scheduler_config.json, as the hub repo has it.
    pub(super) fn sd15_config() -> SchedulerConfig {
        SchedulerConfig::from_json(&serde_json::json!({
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "trained_betas": null,
            "clip_sample": false
        }))
        .unwrap()
    }

    #[test]
    fn missing_fields_take_the_built_class_defaults() {
        let cfg = sd15_config();
        assert_eq!(cfg.class_name.as_deref(), Some("PNDMScheduler"));
        // DDIM defaults to "leading" spacing (plus steps_offset), Euler to "linspace".
        let ddim = build(&SchedulerSpec::new(SchedulerKind::Ddim), &cfg, 4).unwrap();
        assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        let euler = build(&SchedulerSpec::new(SchedulerKind::Euler), &cfg, 4).unwrap();
        assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    }

    #[test]
    fn unsupported_options_and_values_are_errors() {
        let cfg = sd15_config()
            .with_overrides(&serde_json::json!({"use_beta_sigmas": true}))
            .unwrap();
        let err = build(&SchedulerSpec::new(SchedulerKind::Euler), &cfg, 10)
            .err()
            .expect("beta sigmas are not implemented");
        assert!(err.to_string().contains("use_beta_sigmas"), "{err}");
        // A class that does not read the option ignores it, as diffusers does.
        assert!(build(&SchedulerSpec::new(SchedulerKind::Ddim), &cfg, 10).is_ok());
        let bad = serde_json::json!({"prediction_type": "flow"});
        assert!(matches!(
            SchedulerConfig::from_json(&bad),
            Err(Error::Scheduler(_))
        ));
        let lcm = build(&SchedulerSpec::new(SchedulerKind::Lcm), &cfg, 51);
        assert!(matches!(lcm, Err(Error::Scheduler(_))));
    }

    #[test]
    fn half_precision_steps_stay_close_to_f32() {
        let dev = candle_core::Device::Cpu;
        let cfg = sd15_config();
        let sample = Tensor::arange(0f32, 64.0, &dev)
            .unwrap()
            .affine(0.1, -3.0)
            .unwrap()
            .reshape((1, 4, 4, 4))
            .unwrap();
        let model_output = sample.sin().unwrap();
        for name in ["DDIM", "Euler", "DPM++ 2M Karras"] {
            let spec = SchedulerSpec::parse(name).unwrap();
            let mut full = build(&spec, &cfg, 10).unwrap();
            let mut half = build(&spec, &cfg, 10).unwrap();
            let mut noise = BatchNoise::from_seeds(&[0]);
            let a = full.step(&model_output, 0, &sample, &mut noise).unwrap();
            let b = half
                .step(
                    &model_output.to_dtype(DType::F16).unwrap(),
                    0,
                    &sample.to_dtype(DType::F16).unwrap(),
                    &mut noise,
                )
                .unwrap();
            assert_eq!(b.dtype(), DType::F16, "{name}");
            let diff = (a - b.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // Inputs rounded to f16 (|x| <= 3.3, ulp 2e-3) and one final rounding.
            assert!(diff < 1e-2, "{name}: {diff}");
        }
    }
}
