//! Checks shared by the kinds beyond the first five (PNDM / PLMS, DDPM, LMS, DEIS, Heun, DPM2,
//! DPM2 a, DPM++ 2S, UniPC, DPM++ SDE): the names that select them, step count limits, and
//! half-precision steps.

use candle_core::{DType, Device, Tensor};

use super::tests::sd15_config;
use super::{build, BatchNoise, SchedulerConfig, SchedulerKind, SchedulerSpec};
use crate::Error;

const KINDS: [SchedulerKind; 11] = [
    SchedulerKind::Pndm,
    SchedulerKind::Plms,
    SchedulerKind::Ddpm,
    SchedulerKind::Lms,
    SchedulerKind::Deis,
    SchedulerKind::Heun,
    SchedulerKind::Kdpm2,
    SchedulerKind::Kdpm2Ancestral,
    SchedulerKind::DpmSolverSinglestep,
    SchedulerKind::UniPcMultistep,
    SchedulerKind::DpmSolverSde,
];

#[test]
fn names_select_the_kinds() {
    let cases: &[(&str, SchedulerKind, Option<bool>)] = &[
        ("PNDM", SchedulerKind::Pndm, None),
        ("PNDMScheduler", SchedulerKind::Pndm, None),
        ("pndm_scheduler", SchedulerKind::Pndm, None),
        ("PLMS", SchedulerKind::Plms, None),
        ("DDPM", SchedulerKind::Ddpm, None),
        ("DDPMScheduler", SchedulerKind::Ddpm, None),
        ("LMS", SchedulerKind::Lms, Some(false)),
        ("lms", SchedulerKind::Lms, Some(false)),
        ("k_lms", SchedulerKind::Lms, Some(false)),
        ("LMS Karras", SchedulerKind::Lms, Some(true)),
        ("k_lms_karras", SchedulerKind::Lms, Some(true)),
        ("LMSDiscrete", SchedulerKind::Lms, None),
        ("LMSDiscreteScheduler", SchedulerKind::Lms, None),
        ("DEIS", SchedulerKind::Deis, None),
        ("DEISMultistep", SchedulerKind::Deis, None),
        ("DEISMultistepScheduler", SchedulerKind::Deis, None),
    ];
    for &(name, kind, karras) in cases {
        let spec = SchedulerSpec::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(spec.kind, kind, "{name}");
        assert_eq!(spec.overrides.use_karras_sigmas, karras, "{name}");
    }
    // Each class name parses back to a kind of that class.
    for kind in KINDS {
        let class = kind.class_name();
        let spec = SchedulerSpec::parse(class).unwrap_or_else(|e| panic!("{class}: {e}"));
        assert_eq!(spec.kind.class_name(), class);
    }
    let shown = SchedulerSpec::accepted_names();
    for name in [
        "PNDM",
        "PLMS",
        "DDPM",
        "LMS",
        "LMS Karras",
        "DEIS",
        "DDIM",
        "LCM",
    ] {
        assert!(shown.contains(&name), "{name} in {shown:?}");
    }
}

#[test]
fn step_counts_are_checked() {
    for kind in KINDS {
        let spec = SchedulerSpec::new(kind);
        let cfg = sd15_config();
        assert!(matches!(build(&spec, &cfg, 0), Err(Error::Scheduler(_))));
        assert!(matches!(build(&spec, &cfg, 1001), Err(Error::Scheduler(_))));
        let one = build(&spec, &cfg, 1).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(one.timesteps().len(), 1, "{kind:?}");
    }
}

/// Two steps (the multistep kinds combine the first two model outputs in the second) in f16
/// stay close to the same steps in f32.
#[test]
fn half_precision_steps_stay_close_to_f32() {
    let dev = Device::Cpu;
    let cfg = sd15_config();
    let sample = Tensor::arange(0f32, 64.0, &dev)
        .unwrap()
        .affine(0.1, -3.0)
        .unwrap()
        .reshape((1, 4, 4, 4))
        .unwrap();
    for kind in KINDS {
        let spec = SchedulerSpec::new(kind);
        let mut full = build(&spec, &cfg, 10).unwrap();
        let mut half = build(&spec, &cfg, 10).unwrap();
        let (mut a, mut b) = (sample.clone(), sample.to_dtype(DType::F16).unwrap());
        // One generator stream per run, so DDPM adds the same noise to both.
        let (mut noise_a, mut noise_b) =
            (BatchNoise::from_seeds(&[0]), BatchNoise::from_seeds(&[0]));
        for step in 0..2 {
            let input_a = full.scale_model_input(&a, step).unwrap();
            let input_b = half.scale_model_input(&b, step).unwrap();
            a = full
                .step(&input_a.sin().unwrap(), step, &a, &mut noise_a)
                .unwrap();
            b = half
                .step(&input_b.sin().unwrap(), step, &b, &mut noise_b)
                .unwrap();
        }
        assert_eq!(b.dtype(), DType::F16, "{kind:?}");
        let diff = (a - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Inputs rounded to f16 (|x| <= 3.3, ulp 2e-3) and a rounding per step.
        assert!(diff < 1e-2, "{kind:?}: {diff}");
    }
}

#[test]
fn every_named_kind_is_listed_once_in_all() {
    use std::collections::HashSet;
    let all: HashSet<SchedulerKind> = SchedulerKind::ALL.iter().copied().collect();
    assert_eq!(
        all.len(),
        SchedulerKind::ALL.len(),
        "a kind is listed twice"
    );
    for name in SchedulerSpec::accepted_names() {
        let kind = SchedulerSpec::parse(name).unwrap().kind;
        assert!(
            all.contains(&kind),
            "{name}: {kind:?} missing from SchedulerKind::ALL"
        );
    }
}

#[test]
fn sample_prediction_is_refused_where_diffusers_cannot_run_it() {
    let config = SchedulerConfig::from_json(&serde_json::json!({"prediction_type": "sample"}))
        .expect("a valid config literal");
    for name in ["Euler a", "PNDM", "DPM2", "DPM2 a", "DPM++ SDE"] {
        let spec = SchedulerSpec::parse(name).unwrap();
        let err = match build(&spec, &config, 10) {
            Ok(_) => panic!("{name}: `sample` prediction accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("sample"), "{name}: {err}");
    }
}
