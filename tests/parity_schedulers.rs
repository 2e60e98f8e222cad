//! Scheduler parity with diffusers: each case of `tests/fixtures/goldens/manifest.json`
//! ("schedulers") builds our scheduler from the case's class name and the SD 1.5 scheduler config
//! plus overrides, runs the fixture's loop with the same stand-in model and the same seeded noise,
//! and compares timesteps, sigmas, init_noise_sigma and the sample after every step, and img2img
//! `add_noise`. Two-evaluation samplers (Heun, KDPM2, DPM++ SDE) list every model evaluation as a
//! timestep, as diffusers does, so the loop is the same for all. DPM++ SDE cases replace the
//! Brownian noise with the fixture's deterministic stand-in (`noise_sampler: "sde_stand_in"`).

mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use sd_serve::pipeline::noise::BatchNoise;
use sd_serve::schedulers::dpm_sde::DpmSolverSde;
use sd_serve::schedulers::{build, Scheduler, SchedulerConfig, SchedulerSpec};

use common::{flat64, load_goldens, manifest, max_rel_err, max_rel_err_tensors, StandInSdeNoise};

// diffusers rounds every scalar coefficient op to f32 and evaluates x0 and the derivative as
// separate f32 tensors; we fold the coefficients in f64 and round once, and candle's sin in the
// stand-in model may differ from torch's by an ulp. Over 25 steps this stays below 4e-6 relative
// to max(1, |x|) (seen up to 2.9e-6), so 1e-5 leaves room without hiding a wrong coefficient
// (those show up at 1e-3 and above).
const SAMPLE_TOL: f64 = 1e-5;
// Schedules are rounded to float32 where diffusers rounds them, but torch's vectorised sqrt is
// not always correctly rounded: sigmas may differ by one f32 ulp (1.2e-7 relative).
const SCALAR_TOL: f64 = 1e-6;
// Timesteps mapped back from f32 noise levels (KDPM2's midpoints): torch's vectorised log, lerp
// and exp land up to ~13 f32 ulps (1.6e-6 relative) from correctly rounded ones, and the map to t
// divides a log-sigma error by the log-sigma spacing of the training steps (0.35 at t = 0), so up
// to ~5e-6 near t = 0 (seen: 1.4e-6, KDPM2 ancestral's last midpoint, 0 in diffusers); a wrong
// timestep is off by 1e-3 or more.
const TIMESTEP_TOL: f64 = 5e-6;

/// The sample tolerance of a scheduler class.
fn sample_tolerance(class: &str) -> f64 {
    match class {
        // diffusers evaluates DEIS's log-rho coefficients, differences of much larger
        // antiderivative values, in float32: at 10-25 steps (order 3) that alone moves its samples
        // by up to 1.8e-5 from the same class run in float64, which ours follows to 1.6e-6.
        "DEISMultistepScheduler" => 3e-5,
        _ => SAMPLE_TOL,
    }
}

/// One golden case: a scheduler class on the base config plus overrides, and diffusers' outputs.
struct Case {
    name: String,
    class: String,
    steps: usize,
    config: SchedulerConfig,
    add_noise_step: usize,
    /// The noise source the golden's SDE sampler used instead of a Brownian tree, if any.
    noise_sampler: Option<String>,
    golden: HashMap<String, Tensor>,
}

impl Case {
    /// Our scheduler for the case's class; a class we do not map fails the test.
    fn scheduler(&self) -> Box<dyn Scheduler> {
        match self.noise_sampler.as_deref() {
            None => {
                let spec = SchedulerSpec::parse(&self.class)
                    .unwrap_or_else(|e| panic!("{}: class {}: {e}", self.name, self.class));
                assert_eq!(spec.kind.class_name(), self.class, "{}", self.name);
                build(&spec, &self.config, self.steps)
                    .unwrap_or_else(|e| panic!("{}: {e}", self.name))
            }
            Some("sde_stand_in") => {
                assert_eq!(self.class, "DPMSolverSDEScheduler", "{}", self.name);
                let calls = flat64(&self.golden["sde_noise_calls"]);
                let stand_in = StandInSdeNoise::new(&calls, &self.name);
                Box::new(
                    DpmSolverSde::with_noise(&self.config, self.steps, Box::new(stand_in)).unwrap(),
                )
            }
            Some(other) => panic!("{}: unknown noise sampler `{other}`", self.name),
        }
    }
}

/// The manifest's scheduler cases, and the seed of the generator feeding their loops.
fn cases() -> (Vec<Case>, u64) {
    let manifest = manifest();
    let section = &manifest["schedulers"];
    let base = SchedulerConfig::from_json(&section["base_config"]).unwrap();
    let noise_seed = section["loop"]["noise_seed"].as_u64().unwrap();
    let cases: Vec<Case> = section["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| Case {
            name: case["name"].as_str().unwrap().to_string(),
            class: case["class"].as_str().unwrap().to_string(),
            steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            config: base.with_overrides(&case["overrides"]).unwrap(),
            add_noise_step: case["add_noise_step_index"].as_u64().unwrap() as usize,
            noise_sampler: case["noise_sampler"].as_str().map(str::to_string),
            golden: load_goldens(case["file"].as_str().unwrap()),
        })
        .collect();
    assert!(!cases.is_empty());
    (cases, noise_seed)
}

/// The fixture's stand-in for a UNet: `0.5 * inp + 0.1 * sin(3 * inp) * (t / 1000)`.
fn stand_in_model(inp: &Tensor, t: f64) -> Tensor {
    let wave = ((inp * 3.0).unwrap().sin().unwrap() * 0.1).unwrap();
    ((inp * 0.5).unwrap() + (wave * (t / 1000.0)).unwrap()).unwrap()
}

/// The fixture's loop, with the same generators feeding the initial latents (`[B, 4, 8, 8]`, one
/// image per generator) and every step's noise. `after_step(i, x)` sees the sample after step i;
/// returns the initial latents and the final sample.
fn run_loop(
    scheduler: &mut dyn Scheduler,
    noise: &mut BatchNoise,
    mut after_step: impl FnMut(usize, &Tensor),
) -> (Tensor, Tensor) {
    let initial = noise
        .randn(&[4, 8, 8], &Device::Cpu, DType::F32)
        .unwrap()
        .affine(scheduler.init_noise_sigma(), 0.0)
        .unwrap();
    let mut x = initial.clone();
    let ts: Vec<f64> = scheduler.timesteps().to_vec();
    for (i, &t) in ts.iter().enumerate() {
        let inp = scheduler.scale_model_input(&x, i).unwrap();
        let eps = stand_in_model(&inp, t);
        x = scheduler.step(&eps, i, &x, noise).unwrap();
        after_step(i, &x);
    }
    (initial, x)
}

#[test]
fn schedulers_match_diffusers() {
    let (cases, noise_seed) = cases();
    let mut worst: BTreeMap<String, (f64, f64)> = BTreeMap::new();

    for case in &cases {
        let (name, g) = (&case.name, &case.golden);
        let tolerance = sample_tolerance(&case.class);
        let mut scheduler = case.scheduler();

        // Schedule scalars.
        let timesteps = flat64(&g["timesteps"]);
        let ts_err = max_rel_err(scheduler.timesteps(), &timesteps);
        assert!(
            ts_err <= TIMESTEP_TOL,
            "{name}: timesteps {:?} vs {timesteps:?}",
            scheduler.timesteps()
        );
        let mut scalar_err = ts_err;
        match (g.get("sigmas"), scheduler.sigmas()) {
            (Some(reference), Some(ours)) => {
                let err = max_rel_err(ours, &flat64(reference));
                assert!(err <= SCALAR_TOL, "{name}: sigmas differ by {err}");
                scalar_err = scalar_err.max(err);
            }
            (None, None) => {}
            (r, o) => panic!(
                "{name}: sigmas present in golden: {}, ours: {}",
                r.is_some(),
                o.is_some()
            ),
        }
        let init = flat64(&g["init_noise_sigma"])[0];
        let init_err = (scheduler.init_noise_sigma() - init).abs() / init.max(1.0);
        assert!(
            init_err <= SCALAR_TOL,
            "{name}: init_noise_sigma {} vs {init}",
            scheduler.init_noise_sigma()
        );
        scalar_err = scalar_err.max(init_err);

        let mut noise = BatchNoise::from_seeds(&[noise_seed]);
        let samples_ref = &g["samples"];
        let mut sample_err = 0f64;
        let (initial, _) = run_loop(scheduler.as_mut(), &mut noise, |i, x| {
            let err = max_rel_err_tensors(x, &samples_ref.get(i).unwrap());
            assert!(
                err <= tolerance,
                "{name}: sample after step {i} differs by {err}"
            );
            sample_err = sample_err.max(err);
        });
        sample_err = sample_err.max(max_rel_err_tensors(&initial, &g["x0"]));

        // img2img noising at step k of a fresh schedule.
        let noised = case
            .scheduler()
            .add_noise(
                &g["add_noise.original"],
                &g["add_noise.noise"],
                case.add_noise_step,
            )
            .unwrap();
        let err = max_rel_err_tensors(&noised, &g["add_noise.output"]);
        assert!(err <= tolerance, "{name}: add_noise differs by {err}");
        sample_err = sample_err.max(err);

        let family = name
            .split("_epsilon")
            .next()
            .unwrap()
            .split("_v_prediction")
            .next()
            .unwrap();
        let entry = worst.entry(family.to_string()).or_insert((0.0, 0.0));
        entry.0 = entry.0.max(sample_err);
        entry.1 = entry.1.max(scalar_err);
    }
    for (family, (sample, scalar)) in &worst {
        eprintln!("{family:>16}: max sample error {sample:e}, max schedule error {scalar:e}");
    }
}

/// The same seed gives the same image whatever the batch: image 0 of a batch of two, whose
/// stochastic steps draw from per-image generators, follows the single-image golden.
#[test]
fn stochastic_schedulers_are_batch_independent() {
    let (cases, noise_seed) = cases();
    let mut checked = 0;
    for case in &cases {
        if !matches!(
            case.class.as_str(),
            "EulerAncestralDiscreteScheduler"
                | "LCMScheduler"
                | "DDPMScheduler"
                | "KDPM2AncestralDiscreteScheduler"
        ) {
            continue;
        }
        let mut noise = BatchNoise::from_seeds(&[noise_seed, 7]);
        let (_, x) = run_loop(case.scheduler().as_mut(), &mut noise, |_, _| {});
        let image0 = x.narrow(0, 0, 1).unwrap();
        let samples = &case.golden["samples"];
        let last = samples.get(samples.dim(0).unwrap() - 1).unwrap();
        let err = max_rel_err_tensors(&image0, &last);
        assert!(
            err <= sample_tolerance(&case.class),
            "{}: image 0 of a batch differs by {err}",
            case.name
        );
        checked += 1;
    }
    assert!(checked > 0);
}

/// DPM++ SDE with its default noise (a Brownian path per image, drawn from the image's own
/// generator): image 0 of a batch of two is the image generated alone.
#[test]
fn sde_default_noise_is_batch_independent() {
    let (cases, noise_seed) = cases();
    let case = cases
        .iter()
        .find(|c| c.class == "DPMSolverSDEScheduler")
        .expect("a DPM++ SDE case");
    let spec = SchedulerSpec::parse("DPM++ SDE").unwrap();
    let run = |seeds: &[u64]| {
        let mut scheduler = build(&spec, &case.config, case.steps).unwrap();
        let mut noise = BatchNoise::from_seeds(seeds);
        run_loop(scheduler.as_mut(), &mut noise, |_, _| {}).1
    };
    let alone = run(&[noise_seed]);
    let batch = run(&[noise_seed, 7]);
    assert_eq!(
        flat64(&alone),
        flat64(&batch.narrow(0, 0, 1).unwrap()),
        "image 0 of a batch differs from the image alone"
    );
    assert!(flat64(&alone).iter().all(|v| v.is_finite()));
}
