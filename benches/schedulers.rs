//! Cost of one scheduler step on an SDXL-sized latent ([1, 4, 128, 128], f32, CPU), to set beside
//! the cost of a UNet evaluation: the step should be negligible.

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion};
use sd_serve::pipeline::noise::BatchNoise;
use sd_serve::schedulers::{build, SchedulerConfig, SchedulerSpec};

fn sdxl_config() -> SchedulerConfig {
    SchedulerConfig::from_json(&serde_json::json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "set_alpha_to_one": false,
        "clip_sample": false
    }))
    .expect("a valid config literal")
}

fn scheduler_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let config = sdxl_config();
    let mut noise = BatchNoise::from_seeds(&[0]);
    let sample = noise.randn(&[4, 128, 128], &dev, DType::F32).unwrap();
    let model_output = noise.randn(&[4, 128, 128], &dev, DType::F32).unwrap();
    let mut group = c.benchmark_group("scheduler_step_1x4x128x128_f32");
    for (name, steps) in [
        ("DDIM", 30),
        ("Euler", 30),
        ("Euler a", 30),
        ("DPM++ 2M Karras", 30),
        ("LCM", 8),
    ] {
        let spec = SchedulerSpec::parse(name).unwrap();
        let mut scheduler = build(&spec, &config, steps).unwrap();
        // A step from the middle of the schedule; multistep solvers get their history first.
        let index = steps / 2;
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

criterion_group!(benches, scheduler_step);
criterion_main!(benches);
