//! `sd-serve bench`: full-size SD1.5 and SDXL architectures with random weights on a device,
//! timed as a user would see them: UNet steps per second (with classifier-free guidance, so a
//! batch of two) and end-to-end seconds per image (text encoders, the denoising loop with its
//! scheduler, VAE decode). Random weights cost the same compute as trained ones.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::Serialize;

use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKl, AutoencoderKlConfig};
use crate::pipeline::noise::BatchNoise;
use crate::schedulers::{self, SchedulerConfig, SchedulerSpec};
use crate::weights::single_file::builtin_config;
use crate::weights::Family;
use crate::{Error, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Architectures to time: `sd15`, `sdxl` (comma separated).
    #[arg(long, default_value = "sd15,sdxl")]
    pub arch: String,
    /// Denoising steps of the end-to-end run.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Timed UNet steps (after warm-up) for the steps-per-second figure.
    #[arg(long, default_value_t = 10)]
    pub unet_iters: usize,
    /// Image side; default 512 for SD1.5, 1024 for SDXL.
    #[arg(long)]
    pub size: Option<usize>,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long)]
    pub device: Option<String>,
    /// `f32`, `f16` or `bf16`; default f16 on a GPU, f32 on the CPU.
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ArchReport {
    pub arch: String,
    pub width: usize,
    pub height: usize,
    pub dtype: String,
    pub steps: usize,
    pub unet_steps_per_second: f64,
    pub text_encode_seconds: f64,
    pub vae_decode_seconds: f64,
    /// Encoding the decoded image back to the latent mean (img2img's first step).
    pub vae_encode_seconds: f64,
    pub end_to_end_seconds_per_image: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub results: Vec<ArchReport>,
}

/// Every weight a module asks for: normal noise of a small deviation, so activations stay in a
/// realistic range (no denormals, no overflow in f16).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn random_vb(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

/// Opens a GPU, with an error that says why it cannot be used.
fn open_gpu(kind: &str, ordinal: usize) -> Result<Device> {
    let opened = match kind {
        "cuda" => Device::new_cuda(ordinal),
        _ => Device::new_metal(ordinal),
    };
    opened.map_err(|e| {
        let reason = match &e {
            candle_core::Error::NotCompiledWithCudaSupport => {
                "this sd-serve was built without CUDA (build it with `--features cuda`)".to_string()
            }
            candle_core::Error::NotCompiledWithMetalSupport => {
                "this sd-serve was built without Metal (build it with `--features metal`)"
                    .to_string()
            }
            _ => {
                let detail = e.to_string();
                if detail.contains("CUDA_ERROR_NO_DEVICE") {
                    "no CUDA device is visible to this process (is the NVIDIA driver loaded, \
                     and the GPU passed through to this container?)"
                        .to_string()
                } else if detail.contains("CUDA_ERROR_INVALID_DEVICE") {
                    format!("there is no CUDA device {ordinal} (devices count from 0)")
                } else {
                    detail
                }
            }
        };
        Error::Device(format!("cannot open {kind}:{ordinal}: {reason}"))
    })
}

/// Parses `--device` / `--dtype`. Without `--device`: the first GPU this build supports, else
/// (none compiled in, or none that opens) the CPU.
pub fn select_device(device: Option<&str>, dtype: Option<&str>) -> Result<(Device, DType)> {
    let device = match device {
        None => {
            let gpu = if candle_core::utils::cuda_is_available() {
                Some(open_gpu("cuda", 0))
            } else if candle_core::utils::metal_is_available() {
                Some(open_gpu("metal", 0))
            } else {
                None
            };
            match gpu {
                Some(Ok(device)) => device,
                Some(Err(e)) => {
                    tracing::warn!("{e}; running on the CPU");
                    Device::Cpu
                }
                None => Device::Cpu,
            }
        }
        Some("cpu") => Device::Cpu,
        Some("metal") => open_gpu("metal", 0)?,
        Some("cuda") => open_gpu("cuda", 0)?,
        Some(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => open_gpu("cuda", ordinal)?,
            _ => {
                return Err(Error::invalid(format!(
                    "`--device` must be cpu, cuda, cuda:N or metal. Given: {other}"
                )))
            }
        },
    };
    let dtype = match dtype {
        None if device.is_cpu() => DType::F32,
        None => DType::F16,
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => {
            return Err(Error::invalid(format!(
                "`--dtype` must be f32, f16 or bf16. Given: {other}"
            )))
        }
    };
    Ok((device, dtype))
}

fn config<T: serde::de::DeserializeOwned>(family: Family, component: &str) -> Result<T> {
    let value = builtin_config(family, component)
        .ok_or_else(|| Error::model(format!("no built-in {component} config for {family}")))?;
    serde_json::from_value(value)
        .map_err(|e| Error::model(format!("built-in {component} config: {e}")))
}

fn seconds_since(start: Instant, device: &Device) -> Result<f64> {
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64())
}

pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    let (device, dtype) = select_device(args.device.as_deref(), args.dtype.as_deref())?;
    let mut results = Vec::new();
    for arch in args
        .arch
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let (family, side) = match arch {
            "sd15" => (Family::Sd1, 512),
            "sdxl" => (Family::Sdxl, 1024),
            other => {
                return Err(Error::invalid(format!(
                    "`--arch` entries must be sd15 or sdxl. Given: {other}"
                )))
            }
        };
        results.push(bench_arch(
            family,
            arch,
            args.size.unwrap_or(side),
            args,
            &device,
            dtype,
        )?);
    }
    Ok(BenchReport {
        device: format!("{device:?}"),
        results,
    })
}

fn bench_arch(
    family: Family,
    arch: &str,
    side: usize,
    args: &BenchArgs,
    device: &Device,
    dtype: DType,
) -> Result<ArchReport> {
    if side == 0 || !side.is_multiple_of(8) {
        return Err(Error::invalid(format!(
            "`--size` must be a positive multiple of 8. Given: {side}"
        )));
    }
    if args.steps == 0 {
        return Err(Error::invalid("`--steps` must be >= 1"));
    }
    let unet_config: UNet2DConditionConfig = config(family, "unet")?;
    let vae_config: AutoencoderKlConfig = config(family, "vae")?;
    let unet = UNet2DConditionModel::new(random_vb(dtype, device), &unet_config)?;
    let vae_dtype = crate::pipeline::vae_dtype(family, dtype, &vae_config);
    let vae = AutoencoderKl::new(random_vb(vae_dtype, device), &vae_config)?;
    let mut encoders = vec![config::<ClipTextConfig>(family, "text_encoder")?];
    if family == Family::Sdxl {
        encoders.push(config(family, "text_encoder_2")?);
    }
    let encoders = encoders
        .iter()
        .map(|c| {
            Ok((
                ClipTextModel::new(random_vb(dtype, device), c)?,
                c.vocab_size,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let scheduler_config: SchedulerConfig = config(family, "scheduler")?;

    // Text encoders: the prompt and the negative prompt.
    let start = Instant::now();
    let mut states = Vec::new();
    let mut pooled = None;
    for (model, vocab) in &encoders {
        let ids: Vec<u32> = (0..2 * 77).map(|i| (i * 7919 % *vocab) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, 77), device)?;
        let out = model.forward(&ids)?;
        let pick = if family == Family::Sdxl {
            out.hidden_states[out.hidden_states.len() - 2].clone()
        } else {
            out.last_hidden_state
        };
        states.push(pick);
        pooled = out.text_embeds;
    }
    let context = Tensor::cat(&states, 2)?.to_dtype(dtype)?;
    let text_encode_seconds = seconds_since(start, device)?;
    let added = match (family, pooled) {
        (Family::Sdxl, Some(pooled)) => {
            let s = side as f32;
            let ids = Tensor::new(&[[s, s, 0.0, 0.0, s, s]], device)?;
            Some(AddedConditions {
                text_embeds: pooled.to_dtype(dtype)?,
                time_ids: ids.broadcast_as((2, 6))?.contiguous()?.to_dtype(dtype)?,
            })
        }
        _ => None,
    };

    let latent_shape = [vae_config.latent_channels, side / 8, side / 8];
    let mut noise = BatchNoise::from_seeds(&[0]);
    let latents = noise.randn(&latent_shape, device, dtype)?;

    // UNet steps per second: batch of two (classifier-free guidance), after two warm-up steps.
    let doubled = Tensor::cat(&[&latents, &latents], 0)?;
    for _ in 0..2 {
        unet.forward(&doubled, 500.0, &context, added.as_ref())?;
    }
    device.synchronize()?;
    let iters = args.unet_iters.max(1);
    let start = Instant::now();
    for i in 0..iters {
        unet.forward(&doubled, 999.0 - i as f64, &context, added.as_ref())?;
    }
    let unet_steps_per_second = iters as f64 / seconds_since(start, device)?;

    // End to end: encode, denoise with DPM++ 2M and guidance 7.5, decode.
    let spec = SchedulerSpec::parse("DPM++ 2M")?;
    let start = Instant::now();
    let mut scheduler = schedulers::build(&spec, &scheduler_config, args.steps)?;
    let mut latents = (latents * scheduler.init_noise_sigma())?;
    let timesteps = scheduler.timesteps().to_vec();
    for (index, &t) in timesteps.iter().enumerate() {
        let input = Tensor::cat(&[&latents, &latents], 0)?;
        let input = scheduler.scale_model_input(&input, index)?;
        let prediction = unet.forward(&input, t, &context, added.as_ref())?;
        let uncond = prediction.narrow(0, 0, 1)?;
        let text = prediction.narrow(0, 1, 1)?;
        let guided = (&uncond + ((text - &uncond)? * 7.5)?)?;
        latents = scheduler.step(&guided, index, &latents, &mut noise)?;
    }
    let denoise_seconds = seconds_since(start, device)?;
    let start = Instant::now();
    let decoded = vae.decode(&(latents.to_dtype(vae_dtype)? / vae_config.scaling_factor)?)?;
    decoded
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    let vae_decode_seconds = seconds_since(start, device)?;
    let image = decoded.clamp(-1f32, 1f32)?.to_dtype(vae_dtype)?;
    let start = Instant::now();
    vae.encode(&image)?
        .mean
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    let vae_encode_seconds = seconds_since(start, device)?;

    Ok(ArchReport {
        arch: arch.to_string(),
        width: side,
        height: side,
        dtype: format!("{dtype:?}"),
        steps: args.steps,
        unet_steps_per_second,
        text_encode_seconds,
        vae_decode_seconds,
        vae_encode_seconds,
        end_to_end_seconds_per_image: text_encode_seconds + denoise_seconds + vae_decode_seconds,
    })
}
