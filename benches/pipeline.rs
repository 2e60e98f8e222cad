//! CPU benches on the tiny fixture models: one UNet step (batch of two, as with guidance) and a
//! whole txt2img request. Full-size figures come from `sd-serve bench`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};

use sd_serve::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use sd_serve::pipeline::{GenerationRequest, StableDiffusion};
use sd_serve::registry::Registry;
use sd_serve::weights::load_diffusers_folder;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn unet_step(c: &mut Criterion) {
    let device = Device::Cpu;
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let files = load_diffusers_folder(&fixtures().join(model), &device, DType::F32)
            .expect("fixture model loads");
        let config: UNet2DConditionConfig =
            serde_json::from_value(files.unet.config.clone()).expect("unet config parses");
        let unet =
            UNet2DConditionModel::new(files.unet.weights.var_builder(DType::F32, &device), &config)
                .expect("unet builds");
        let sample = Tensor::randn(0f32, 1.0, (2, config.in_channels, 8, 8), &device).unwrap();
        let context_dim = files.unet.config["cross_attention_dim"]
            .as_u64()
            .expect("fixture UNets have one cross-attention width")
            as usize;
        let context = Tensor::randn(0f32, 1.0, (2, 77, context_dim), &device).unwrap();
        let added = config.projection_class_embeddings_input_dim.map(|dim| {
            let time_dims = 6 * config.addition_time_embed_dim.unwrap_or(0);
            sd_serve::models::unet::AddedConditions {
                text_embeds: Tensor::randn(0f32, 1.0, (2, dim - time_dims), &device).unwrap(),
                time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]; 2], &device).unwrap(),
            }
        });
        c.bench_function(&format!("unet_step/{model}/64x64"), |b| {
            b.iter(|| {
                unet.forward(&sample, 500.0, &context, added.as_ref())
                    .unwrap()
            })
        });
    }
}

fn txt2img(c: &mut Criterion) {
    let device = Device::Cpu;
    let registry = Registry::from_file(&fixtures().join("models.toml")).expect("registry");
    let mut group = c.benchmark_group("txt2img");
    group.sample_size(10);
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let files = registry
            .resolve(model)
            .and_then(|e| e.load(&device, DType::F32))
            .expect("fixture model loads");
        let sd = StableDiffusion::load(&files, &device, DType::F32).expect("pipeline builds");
        let mut req = GenerationRequest::new("a photo of an astronaut riding a horse");
        req.width = 64;
        req.height = 64;
        req.steps = 10;
        req.seed = 42;
        group.bench_function(format!("{model}/64x64/10steps"), |b| {
            b.iter(|| sd.generate(&req, &mut |_, _| true).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, unet_step, txt2img);
criterion_main!(benches);
