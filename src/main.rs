//! `sd-serve`: the command line. `serve` runs the API server, `generate` writes images, `models` lists the registry,
//! `bench` measures full-size architectures on a device.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};

use sd_serve::pipeline::{
    GenerationRequest, InitImage, PromptEmbedding, Refiner, StableDiffusion, Vae,
};
use sd_serve::registry::{
    ControlNetSource, Location, LoraSource, ModelSource, Registry, VaeSource,
};
use sd_serve::schedulers::SchedulerSpec;
use sd_serve::weights::embeddings::TextualInversion;
use sd_serve::weights::lora::{merge_loras, Lora};
use sd_serve::weights::Family;

#[derive(Parser)]
#[command(
    name = "sd-serve",
    version,
    about = "Stable Diffusion 1.x/2.x/SDXL on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct DeviceArgs {
    /// `cpu`, `cuda`, `cuda:N` or `metal`; default: the first GPU when built with one, else cpu.
    #[arg(long)]
    device: Option<String>,
    /// `f32`, `f16` or `bf16`; default: f16 on a GPU, f32 on the CPU.
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the four hosted image APIs over HTTP and WebSocket.
    Serve(Box<ServeArgs>),
    /// Generate images from a prompt and write them as PNG.
    Generate(Box<GenerateArgs>),
    /// List the models of the registry.
    Models {
        /// A models.toml to use instead of the built-in registry.
        #[arg(long)]
        models: Option<PathBuf>,
    },
    /// Time full-size SD1.5 / SDXL architectures with random weights; prints JSON.
    Bench(sd_serve::bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML config file (every field optional; see the README). Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7860.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The models.toml registry; default: the built-in one.
    #[arg(long)]
    models: Option<PathBuf>,
    /// An accepted API key; repeat for several. None at all: every request is accepted.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Base of image links in responses, e.g. https://img.example.com. Default: http://<listen>.
    #[arg(long)]
    public_url: Option<String>,
    /// Where images and job records are kept.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N` or `metal`; repeat for one worker per device.
    #[arg(long = "device")]
    devices: Vec<String>,
    /// `f32`, `f16` or `bf16`; default: f16 on a GPU, f32 on the CPU.
    #[arg(long)]
    dtype: Option<String>,
    /// Most jobs waiting or running at once; beyond it requests are refused as busy.
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Let image URLs, webhooks and upload endpoints reach private and loopback addresses.
    #[arg(long)]
    allow_private_urls: bool,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A model id or alias from the registry, a diffusers folder, or a single .safetensors file.
    #[arg(long)]
    model: String,
    /// A models.toml to use instead of the built-in registry.
    #[arg(long)]
    models: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; <= 1 turns guidance off.
    #[arg(long)]
    guidance: Option<f64>,
    /// Scheduler name, e.g. "DPM++ 2M Karras", "Euler a", "DDIM", "EulerDiscreteScheduler".
    #[arg(long)]
    scheduler: Option<String>,
    /// Seed of the first image; image i uses seed + i. Default: random.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Skip this many final CLIP layers (1 = penultimate layer).
    #[arg(long)]
    clip_skip: Option<usize>,
    /// Prompt syntax: none (plain text, 75 tokens), a1111 (`(word:1.2)`, BREAK) or compel
    /// (`word++`, `.blend()`); the weighted syntaxes also take prompts past 75 tokens.
    #[arg(long, default_value = "none", value_parser = ["none", "a1111", "compel"])]
    prompt_weighting: String,
    /// Start from this image (img2img); see --strength.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: fraction of the schedule to run on the init image (0 < strength <= 1).
    #[arg(long, requires = "init_image")]
    strength: Option<f64>,
    /// Initial noise: a safetensors file with an f32 tensor `latents` [N, C, H/8, W/8].
    #[arg(long)]
    latents: Option<PathBuf>,
    /// A LoRA of the registry, `ID` (its default weight) or `ID:WEIGHT`; repeat for several.
    #[arg(long = "lora")]
    loras: Vec<String>,
    /// A VAE of the registry (id or alias) to encode and decode with instead of the model's.
    #[arg(long)]
    vae: Option<String>,
    /// A textual inversion embedding of the registry, `ID` (its default weight) or `ID:WEIGHT`;
    /// repeat for several. Its token is used where the prompts write it, else appended.
    #[arg(long = "embedding")]
    embeddings: Vec<String>,
    /// An SDXL refiner of the registry (id or alias) for the last steps; see --refiner-start.
    #[arg(long)]
    refiner: Option<String>,
    /// The step (1..=steps) at which the refiner takes over: the base runs up to it.
    #[arg(long, requires = "refiner")]
    refiner_start: Option<usize>,
    /// Output PNG; with several images, `NAME-<i>.png` beside it.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Generate(args) => generate(*args),
        Command::Models { models } => list_models(models.as_deref()),
        Command::Bench(args) => {
            let report = sd_serve::bench::run(&args)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => sd_serve::config::ServerConfig::from_file(path)?,
        None => sd_serve::config::ServerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(models) = args.models {
        config.models = Some(models);
    }
    if !args.api_keys.is_empty() {
        config.api_keys = args.api_keys;
    }
    if let Some(url) = args.public_url {
        config.public_url = Some(url);
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if !args.devices.is_empty() {
        config.devices = args.devices;
    }
    if let Some(dtype) = args.dtype {
        config.dtype = Some(dtype);
    }
    if let Some(n) = args.queue_capacity {
        config.queue_capacity = n;
    }
    if args.allow_private_urls {
        config.media.allow_private_urls = true;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let signal = sd_serve::api::shutdown_signal()?;
        let server = sd_serve::api::Server::bind(config).await?;
        tracing::info!(
            "listening on {} (image links: {})",
            server.local_addr(),
            server.state().base_url()
        );
        // Tests and scripts read the bound port (for `--listen 127.0.0.1:0`) from this line.
        println!("sd-serve listening on {}", server.local_addr());
        server.run(signal).await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

fn registry(models: Option<&Path>) -> anyhow::Result<Registry> {
    Ok(match models {
        Some(path) => Registry::from_file(path)
            .with_context(|| format!("reading the model registry {}", path.display()))?,
        None => Registry::builtin(),
    })
}

fn list_models(models: Option<&Path>) -> anyhow::Result<()> {
    let registry = registry(models)?;
    for entry in registry.models() {
        let family = entry.family.map_or("auto".to_string(), |f| f.to_string());
        let source = match &entry.source {
            ModelSource::Hub { repo, revision, .. } => format!("hf:{repo}@{revision}"),
            ModelSource::Folder(path) => path.display().to_string(),
            ModelSource::SingleFile { location, file, .. } => match location {
                // A local single file's `file` is already its whole path.
                Location::Local(_) => file.display().to_string(),
                Location::Hub { repo, revision } => {
                    format!("hf:{repo}@{revision}/{}", file.display())
                }
            },
        };
        let aliases = aliases_column(&entry.aliases);
        println!("{}\t{family}\t{source}{aliases}", entry.id);
    }
    for embedding in registry.embeddings() {
        let source = file_source(&embedding.source);
        let aliases = aliases_column(&embedding.aliases);
        let negative = if embedding.negative {
            " (negative)"
        } else {
            ""
        };
        println!(
            "{}\tembedding {}\t{source}\ttoken {}{negative}\tweight {}{aliases}",
            embedding.id, embedding.family, embedding.token, embedding.default_weight
        );
    }
    for lora in registry.loras() {
        let source = file_source(&lora.source);
        let aliases = aliases_column(&lora.aliases);
        println!(
            "{}\tlora {}\t{source}\tweight {}{aliases}",
            lora.id, lora.family, lora.default_weight
        );
    }
    for vae in registry.vaes() {
        let source = match &vae.source {
            VaeSource::Folder(path) => path.display().to_string(),
            VaeSource::Hub { repo, revision } => format!("hf:{repo}@{revision}"),
            VaeSource::SingleFile { location, file, .. } => match location {
                Location::Local(_) => file.display().to_string(),
                Location::Hub { repo, revision } => {
                    format!("hf:{repo}@{revision}/{}", file.display())
                }
            },
        };
        let aliases = aliases_column(&vae.aliases);
        println!("{}\tvae {}\t{source}{aliases}", vae.id, vae.family);
    }
    for net in registry.controlnets() {
        let source = match &net.source {
            ControlNetSource::Folder(path) => path.display().to_string(),
            ControlNetSource::Hub { repo, revision } => format!("hf:{repo}@{revision}"),
            ControlNetSource::File { path, .. } => path.display().to_string(),
        };
        let aliases = aliases_column(&net.aliases);
        let preprocessor = net.preprocessor.as_deref().unwrap_or("-");
        println!(
            "{}\tcontrolnet {}\t{source}\tpreprocessor {preprocessor}{aliases}",
            net.id, net.family
        );
    }
    for pre in registry.preprocessors() {
        let source = file_source(&pre.source);
        println!("{}\tpreprocessor {}\t{source}", pre.id, pre.kind);
    }
    Ok(())
}

/// `ID` or `ID:WEIGHT` (the id may itself hold colons, as AIR ids do: the weight is the part
/// after the last one when it is a number and `arg` is not itself a known name).
fn split_weight(arg: &str, known: impl Fn(&str) -> bool) -> (&str, Option<f64>) {
    match arg.rsplit_once(':') {
        Some((name, w)) if !known(arg) => match w.parse::<f64>() {
            Ok(w) => (name, Some(w)),
            Err(_) => (arg, None),
        },
        _ => (arg, None),
    }
}

/// `--lora ID` or `--lora ID:WEIGHT`.
fn parse_lora_arg(
    registry: &Registry,
    arg: &str,
    device: &Device,
) -> anyhow::Result<(Lora, f64, String)> {
    let (name, weight) = split_weight(arg, |a| registry.lora(a).is_some());
    let entry = registry.resolve_lora(name)?;
    let lora = Lora::load(&entry.local_path()?, device)?;
    let weight = weight.unwrap_or(entry.default_weight);
    Ok((lora, weight, entry.id))
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (device, dtype) = sd_serve::bench::select_device(
        args.device.device.as_deref(),
        args.device.dtype.as_deref(),
    )?;
    let registry = registry(args.models.as_deref())?;
    let entry = registry.resolve(&args.model)?;
    let defaults = &entry.defaults;

    let mut req = GenerationRequest::new(args.prompt);
    req.negative_prompt = args
        .negative_prompt
        .or_else(|| defaults.negative_prompt.clone());
    // The resolution each family was trained at, when neither the request nor the model says.
    let default_side = if matches!(entry.family, Some(Family::Sdxl | Family::SdxlRefiner)) {
        1024
    } else {
        512
    };
    let or_default = |v: Option<u32>| v.map(|v| v as usize);
    req.width = args
        .width
        .or(or_default(defaults.width))
        .unwrap_or(default_side);
    req.height = args
        .height
        .or(or_default(defaults.height))
        .unwrap_or(default_side);
    req.steps = args.steps.or(or_default(defaults.steps)).unwrap_or(30);
    req.guidance_scale = args.guidance.or(defaults.guidance).unwrap_or(7.5);
    req.scheduler = match args.scheduler.as_deref().or(defaults.scheduler.as_deref()) {
        Some(name) => Some(SchedulerSpec::parse(name)?),
        None => None,
    };
    req.seed = args.seed.unwrap_or_else(|| rand::random::<u32>().into());
    req.num_images = args.num_images;
    req.clip_skip = args.clip_skip.or(or_default(defaults.clip_skip));
    req.prompt_weighting = match args.prompt_weighting.as_str() {
        "a1111" => sd_serve::pipeline::PromptWeighting::A1111,
        "compel" => sd_serve::pipeline::PromptWeighting::Compel,
        _ => sd_serve::pipeline::PromptWeighting::None,
    };
    if let Some(path) = &args.init_image {
        let image = image::open(path)
            .with_context(|| format!("reading --init-image {}", path.display()))?
            .to_rgb8();
        req.init_image = Some(InitImage {
            image,
            strength: args.strength.unwrap_or(0.8),
        });
    }
    if let Some(path) = &args.latents {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading --latents {}", path.display()))?;
        let Some(latents) = tensors.remove("latents") else {
            bail!("--latents {}: no tensor named `latents`", path.display());
        };
        req.latents = Some(latents.to_dtype(DType::F32)?);
    }
    req.embeddings = args
        .embeddings
        .iter()
        .map(|arg| {
            let (name, weight) = split_weight(arg, |a| registry.embedding(a).is_some());
            let entry = registry.resolve_embedding(name)?;
            Ok((entry.id, weight.unwrap_or(entry.default_weight)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(model) = &args.refiner {
        let Some(step) = args.refiner_start else {
            bail!("--refiner needs --refiner-start (the step at which the refiner takes over)");
        };
        if step == 0 || step > req.steps {
            bail!(
                "--refiner-start must be between 1 and --steps ({}). Given: {step}",
                req.steps
            );
        }
        req.refiner = Some(Refiner {
            model: model.clone(),
            start: step as f64 / req.steps as f64,
        });
    }
    req.validate()?;

    let loras = args
        .loras
        .iter()
        .map(|arg| parse_lora_arg(&registry, arg, &device))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let started = Instant::now();
    let mut files = entry.load(&device, dtype)?;
    if entry.family.is_none() && files.family == Family::Sdxl {
        // Detected only now: SDXL's own resolution unless the request or the model gave one.
        if args.width.is_none() && defaults.width.is_none() {
            req.width = 1024;
        }
        if args.height.is_none() && defaults.height.is_none() {
            req.height = 1024;
        }
    }
    for (_, _, id) in &loras {
        let lora = registry.resolve_lora(id)?;
        if lora.family != files.family {
            bail!(
                "LoRA `{id}` is for {} models, but model `{}` is {}",
                lora.family,
                entry.id,
                files.family
            );
        }
    }
    // The files serve this one run: the merge is never taken out.
    let _merged = if loras.is_empty() {
        None
    } else {
        let pairs: Vec<(&Lora, f64)> = loras.iter().map(|(l, w, _)| (l, *w)).collect();
        Some(merge_loras(&mut files, &pairs)?)
    };
    let mut model = StableDiffusion::load(&files, &device, dtype)?;
    if let Some(name) = &args.vae {
        let vae = registry.resolve_vae(name)?;
        if !vae.fits(files.family) {
            bail!(
                "VAE `{}` is for {} models, but model `{}` is {}",
                vae.id,
                vae.family,
                entry.id,
                files.family
            );
        }
        let loaded = Vae::load(&vae.load(&device, dtype)?, vae.family, &device, dtype)?;
        model.set_vae(Some(&loaded))?;
    }
    let embeddings = req
        .embeddings
        .iter()
        .map(|(id, weight)| {
            let found = registry.resolve_embedding(id)?;
            if found.family != files.family {
                bail!(
                    "embedding `{id}` is for {} models, but model `{}` is {}",
                    found.family,
                    entry.id,
                    files.family
                );
            }
            let embedding = TextualInversion::load(&found.local_path()?, &device)?;
            Ok(PromptEmbedding {
                id: found.id,
                token: found.token,
                embedding: std::sync::Arc::new(embedding),
                weight: *weight,
                negative: found.negative,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    model.set_embeddings(&embeddings)?;
    tracing::info!(model = %entry.id, seconds = started.elapsed().as_secs_f64(), "model loaded");

    let refiner = match &req.refiner {
        Some(r) => {
            let refiner_entry = registry.resolve(&r.model)?;
            let files = refiner_entry.load(&device, dtype)?;
            Some(StableDiffusion::load(&files, &device, dtype)?)
        }
        None => None,
    };

    let started = Instant::now();
    let mut progress = |step, total| {
        tracing::debug!(step, total, "denoising");
        true
    };
    let output = match &refiner {
        Some(refiner) => model.generate_refined(refiner, &req, &mut progress)?,
        None => model.generate(&req, &mut progress)?,
    };
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        images = req.num_images,
        "generated"
    );

    let images = output.to_rgb()?;
    for (i, (image, seed)) in images.iter().zip(&output.seeds).enumerate() {
        let path = output_path(&args.output, i, images.len());
        image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{} seed={seed}", path.display());
    }
    Ok(())
}

fn output_path(base: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = base.extension().and_then(|s| s.to_str()).unwrap_or("png");
    base.with_file_name(format!("{stem}-{index}.{ext}"))
}

/// The aliases column of `sd-serve models` (empty when there are none).
fn aliases_column(aliases: &[String]) -> String {
    if aliases.is_empty() {
        String::new()
    } else {
        format!("\taliases: {}", aliases.join(", "))
    }
}

/// Where a LoRA, embedding or preprocessor file is, as `sd-serve models` prints it.
fn file_source(source: &LoraSource) -> String {
    match source {
        LoraSource::File(path) => path.display().to_string(),
        LoraSource::Hub {
            repo,
            revision,
            file,
        } => format!("hf:{repo}@{revision}/{file}"),
    }
}
