//! A diffusers `scheduler_config.json`, deserialised with every field optional.
//!
//! diffusers fills a missing field with the default of the scheduler class being built, not of the
//! class that wrote the file (an SD 1.5 `PNDMScheduler` config loaded into `DDIMScheduler` gets
//! DDIM's "leading" spacing but `EulerDiscreteScheduler`'s "linspace"), so the defaults are applied
//! by each scheduler, and here a field is `None` when the file did not set it.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

/// What the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise.
    Epsilon,
    /// The velocity `alpha * noise - sigma * x0` (Salimans & Ho, 2022).
    VPrediction,
    /// The clean sample itself.
    #[serde(alias = "original_sample")]
    Sample,
}

/// How inference timesteps are spread over the training range (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The last noise level of a sigma schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// DPM-Solver variants (Lu et al. 2022). `dpmsolver++` solves for the data prediction,
/// `dpmsolver` for the noise prediction; the SDE variants add fresh noise at every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DpmAlgorithm {
    // diffusers maps "deis" to dpmsolver++; "dpmsolver+++" is a spelling found in API docs.
    #[serde(rename = "dpmsolver++", alias = "deis", alias = "dpmsolver+++")]
    DpmSolverPlusPlus,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

impl DpmAlgorithm {
    /// The `algorithm_type` value diffusers writes for this variant.
    pub fn name(self) -> &'static str {
        match self {
            DpmAlgorithm::DpmSolverPlusPlus => "dpmsolver++",
            DpmAlgorithm::SdeDpmSolverPlusPlus => "sde-dpmsolver++",
            DpmAlgorithm::DpmSolver => "dpmsolver",
            DpmAlgorithm::SdeDpmSolver => "sde-dpmsolver",
        }
    }

    /// Whether the solver integrates the data prediction x0 (DPM-Solver++) rather than the noise
    /// prediction (the original DPM-Solver).
    pub fn predicts_data(self) -> bool {
        matches!(
            self,
            DpmAlgorithm::DpmSolverPlusPlus | DpmAlgorithm::SdeDpmSolverPlusPlus
        )
    }
}

/// The higher-order update rule of a multistep solver: DPM-Solver's midpoint or Heun form, DEIS'
/// logrho, UniPC's bh1 or bh2 (its B(h) = h or e^h - 1). A class given another family's name uses
/// its own default instead, as diffusers does when it loads such a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    Midpoint,
    Heun,
    Logrho,
    Bh1,
    Bh2,
}

/// A deserialised `scheduler_config.json`. `None` means "not set in the file": the scheduler being
/// built supplies its own diffusers default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers class that wrote the file, e.g. "EulerDiscreteScheduler".
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<i64>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub thresholding: Option<bool>,
    // DDIM / LCM
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    // PNDM: false runs its Runge-Kutta warm-up, true is plain PLMS.
    pub skip_prk_steps: Option<bool>,
    // Euler / DPM-Solver sigma schedules
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: Option<FinalSigmas>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    // DPM-Solver
    pub algorithm_type: Option<DpmAlgorithm>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<SolverType>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    // UniPC
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
    // LCM
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` value; an invalid field is an `Error::Scheduler` naming it.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let mut value = value.clone();
        // diffusers records in `_use_default_values` the keys it filled with its own class
        // defaults; a config re-read for another class must take that class's defaults instead.
        if let Some(map) = value.as_object_mut() {
            if let Some(serde_json::Value::Array(keys)) = map.remove("_use_default_values") {
                for key in keys.iter().filter_map(|k| k.as_str()) {
                    map.remove(key);
                }
            }
        }
        serde_json::from_value(value)
            .map_err(|e| Error::Scheduler(format!("scheduler config: {e}")))
    }

    /// The config with every field `overrides` sets replacing its own.
    pub fn overridden_by(&self, overrides: &SchedulerConfig) -> Result<Self> {
        let mut set = serde_json::to_value(overrides)
            .map_err(|e| Error::Scheduler(format!("scheduler options: {e}")))?;
        if let Some(map) = set.as_object_mut() {
            map.retain(|key, value| !value.is_null() && key != "_class_name");
        }
        self.with_overrides(&set)
    }

    /// The config with the fields of `overrides` (a JSON object) replacing its own, as diffusers'
    /// `from_config(config, **overrides)` does.
    pub fn with_overrides(&self, overrides: &serde_json::Value) -> Result<Self> {
        let mut base = serde_json::to_value(self)
            .map_err(|e| Error::Scheduler(format!("scheduler config: {e}")))?;
        if let (Some(base), Some(over)) = (base.as_object_mut(), overrides.as_object()) {
            for (k, v) in over {
                base.insert(k.clone(), v.clone());
            }
        } else if !overrides.is_null() {
            return Err(Error::Scheduler(
                "scheduler config overrides must be a JSON object".into(),
            ));
        }
        Self::from_json(&base)
    }
}

/// The training-schedule defaults of one scheduler class.
pub(crate) struct ClassDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub timestep_spacing: TimestepSpacing,
}

/// diffusers' defaults shared by DDPM-derived classes (DDIM, Euler, DPM-Solver).
pub(crate) const DDPM_DEFAULTS: ClassDefaults = ClassDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: BetaSchedule::Linear,
    timestep_spacing: TimestepSpacing::Linspace,
};

impl SchedulerConfig {
    pub(crate) fn num_train(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    pub(crate) fn prediction(&self) -> PredictionType {
        self.prediction_type.unwrap_or(PredictionType::Epsilon)
    }

    pub(crate) fn spacing(&self, defaults: &ClassDefaults) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(defaults.timestep_spacing)
    }

    pub(crate) fn offset(&self) -> i64 {
        self.steps_offset.unwrap_or(0)
    }

    /// The training schedule with `defaults` for the unset fields.
    pub(crate) fn train_schedule(
        &self,
        defaults: &ClassDefaults,
        zero_snr_floor: bool,
    ) -> Result<super::sigmas::TrainSchedule> {
        super::sigmas::TrainSchedule::new(&super::sigmas::TrainScheduleSpec {
            num_train_timesteps: self.num_train(),
            beta_start: self.beta_start.unwrap_or(defaults.beta_start),
            beta_end: self.beta_end.unwrap_or(defaults.beta_end),
            beta_schedule: self.beta_schedule.unwrap_or(defaults.beta_schedule),
            trained_betas: self.trained_betas.as_deref(),
            rescale_betas_zero_snr: self.rescale_betas_zero_snr.unwrap_or(false),
            zero_snr_floor,
        })
    }

    /// Refuses options among `fields` (those the class reads) that change the numbers in ways this
    /// crate does not implement, instead of silently producing something diffusers would not.
    pub(crate) fn reject_unsupported(&self, class: &str, fields: &[&str]) -> Result<()> {
        let flag = |v: Option<bool>| v.unwrap_or(false);
        let is_set = |name: &str| match name {
            "thresholding" => flag(self.thresholding),
            "use_exponential_sigmas" => flag(self.use_exponential_sigmas),
            "use_beta_sigmas" => flag(self.use_beta_sigmas),
            "use_lu_lambdas" => flag(self.use_lu_lambdas),
            "use_flow_sigmas" => flag(self.use_flow_sigmas),
            "interpolation_type" => self
                .interpolation_type
                .as_deref()
                .is_some_and(|t| t != "linear"),
            "timestep_type" => self
                .timestep_type
                .as_deref()
                .is_some_and(|t| t != "discrete"),
            "variance_type" => self
                .variance_type
                .as_deref()
                .is_some_and(|t| t == "learned" || t == "learned_range"),
            _ => false,
        };
        match fields.iter().find(|name| is_set(name)) {
            Some(name) => Err(Error::Scheduler(format!(
                "{class}: the scheduler option `{name}` is not supported"
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn algorithm(value: &str) -> Result<Option<DpmAlgorithm>> {
        SchedulerConfig::from_json(&serde_json::json!({ "algorithm_type": value }))
            .map(|config| config.algorithm_type)
    }

    #[test]
    fn algorithm_type_spellings() {
        for (value, expected) in [
            ("dpmsolver++", DpmAlgorithm::DpmSolverPlusPlus),
            ("dpmsolver+++", DpmAlgorithm::DpmSolverPlusPlus),
            ("deis", DpmAlgorithm::DpmSolverPlusPlus),
            ("sde-dpmsolver++", DpmAlgorithm::SdeDpmSolverPlusPlus),
            ("dpmsolver", DpmAlgorithm::DpmSolver),
            ("sde-dpmsolver", DpmAlgorithm::SdeDpmSolver),
        ] {
            assert_eq!(algorithm(value).unwrap(), Some(expected), "{value}");
        }
        // Written back under diffusers' own name.
        let config = SchedulerConfig::from_json(&serde_json::json!({
            "algorithm_type": "dpmsolver+++"
        }))
        .unwrap();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["algorithm_type"], "dpmsolver++");
        for value in ["dpmsolver++++", "dpmsolver+", "DPMSolver++", ""] {
            assert!(
                matches!(algorithm(value), Err(Error::Scheduler(_))),
                "{value}"
            );
        }
    }
}
