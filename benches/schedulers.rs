//! Cost of one scheduler step of every family, f32 on the CPU, at the latent sizes of SD1.5 at
//! 512x512 ([1, 4, 64, 64]) and SDXL at 1024x1024 ([1, 4, 128, 128]), to set beside a UNet
//! evaluation at the same size (`sd-serve bench`): the step should be negligible.

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion};
use sd_serve::pipeline::noise::BatchNoise;
use sd_serve::schedulers::{build, SchedulerConfig, SchedulerSpec};

fn sd_config() -> SchedulerConfig {
    SchedulerConfig::from_json(&serde_json::json!({
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "set_alpha_to_one": false,
        "clip_sample": false
    }))
    .expect("a valid config literal")
}

/// One name per family (plus the SDE variant of DPM++ 2M, which draws noise).
const SCHEDULERS: [(&str, usize); 17] = [
    ("DDIM", 30),
    ("DDPM", 30),
    ("PNDM", 30),
    ("LMS", 30),
    ("Euler", 30),
    ("Euler a", 30),
    ("Heun", 30),
    ("DPM2", 30),
    ("DPM2 a", 30),
    ("DPM++ 2M Karras", 30),
    ("DPM++ 2M SDE", 30),
    ("DPM++ 2S", 30),
    ("DPM++ SDE", 30),
    ("UniPC", 30),
    ("DEIS", 30),
    ("LCM", 8),
    ("PLMS", 30),
];

fn scheduler_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let config = sd_config();
    for side in [64, 128] {
        let mut noise = BatchNoise::from_seeds(&[0]);
        let sample = noise.randn(&[4, side, side], &dev, DType::F32).unwrap();
        let model_output = noise.randn(&[4, side, side], &dev, DType::F32).unwrap();
        let mut group = c.benchmark_group(format!("scheduler_step_1x4x{side}x{side}_f32"));
        for (name, steps) in SCHEDULERS {
            let spec = SchedulerSpec::parse(name).unwrap();
            let mut scheduler = build(&spec, &config, steps).unwrap();
            // A step from the middle of the schedule; multistep solvers get their history first.
            // Even, so two-evaluation samplers (Heun, DPM2, DPM++ SDE) repeat a first half.
            let index = (scheduler.timesteps().len() / 2) & !1;
            for i in 0..index {
                scheduler
                    .step(&model_output, i, &sample, &mut noise)
                    .unwrap();
            }
            group.bench_function(name, |b| {
                b.iter(|| {
                    scheduler
                        .step(&model_output, index, &sample, &mut noise)
                        .unwrap()
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, scheduler_step);
criterion_main!(benches);
