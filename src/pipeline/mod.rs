//! The generation pipeline: prompt encoding, latent preparation, the denoising loop with
//! classifier-free guidance, decoding. txt2img and img2img are one loop with different starts.

pub mod conditioning;
pub mod controlnet;
pub mod images;
pub mod inpaint;
pub mod ip_adapter;
pub mod noise;
pub mod prompt;
pub mod request;
pub mod textual_inversion;
pub mod weighting;

use candle_core::{DType, Device, Tensor};

use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::controlnet::ControlNetModel;
use crate::models::ip_adapter::IpAdapterModel;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKl, AutoencoderKlConfig};
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerSpec};
use crate::weights::{Component, Family, PipelineFiles, TokenizerFiles};
use crate::{Error, Result};

use conditioning::{PromptEmbeddings, TextEncoder};
pub use controlnet::{ControlCondition, ControlMode, ControlNetUnit};
pub use inpaint::{Canvas, MaskImage, Outpaint};
pub use ip_adapter::IpAdapterUnit;
use noise::BatchNoise;
use prompt::ClipTokenizer;
pub use request::{GenerationRequest, InitImage, Refiner};
pub use textual_inversion::PromptEmbedding;
use textual_inversion::RequestEncoders;
pub use weighting::PromptWeighting;

/// What the denoising loop reports after each step; returning `false` cancels the job.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

/// A loaded Stable Diffusion model: text encoder(s), UNet, VAE and the scheduler defaults.
pub struct StableDiffusion {
    pub family: Family,
    device: Device,
    dtype: DType,
    text_encoder: TextEncoder,
    text_encoder_2: Option<TextEncoder>,
    unet: UNet2DConditionModel,
    vae: AutoencoderKl,
    vae_config: AutoencoderKlConfig,
    /// The VAE's dtype: f32 for an SDXL VAE that must not run in f16 (see [`vae_dtype`]).
    vae_dtype: DType,
    /// The model's own VAE while another one encodes and decodes (see [`Self::set_vae`]).
    own_vae: Option<Vae>,
    scheduler_config: SchedulerConfig,
    /// The scheduler a request without one gets, or why there is none.
    default_scheduler: std::result::Result<SchedulerSpec, String>,
    /// SDXL: no negative prompt means zero embeddings rather than the encoded empty prompt.
    force_zeros_for_empty_prompt: bool,
    /// The text encoders with the textual inversion embeddings of the next requests, if any
    /// (see [`Self::set_embeddings`]).
    embeddings: Option<RequestEncoders>,
}

/// A VAE ready to run: the module, its config and the dtype it runs in. A model's own VAE is one;
/// a VAE named by a request (a registry `[[vae]]`) is another, set with
/// [`StableDiffusion::set_vae`]. Cloning shares the weights.
#[derive(Debug, Clone)]
pub struct Vae {
    model: AutoencoderKl,
    config: AutoencoderKlConfig,
    dtype: DType,
}

impl Vae {
    /// Builds the VAE of `component` for a `family` pipeline running in `dtype`; the VAE itself
    /// runs in [`vae_dtype`].
    pub fn load(
        component: &Component,
        family: Family,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let config = AutoencoderKlConfig::from_json(&component.config)?;
        let dtype = vae_dtype(family, dtype, &config);
        let model = AutoencoderKl::new(component.weights.var_builder(dtype, device), &config)?;
        Ok(Self {
            model,
            config,
            dtype,
        })
    }

    pub fn config(&self) -> &AutoencoderKlConfig {
        &self.config
    }

    /// The dtype the VAE computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// The images of one request as floats `[N, H, W, 3]` in 0..1, with the seed of each.
#[derive(Debug)]
pub struct GenerationOutput {
    pub images: Tensor,
    pub seeds: Vec<u64>,
}

impl GenerationOutput {
    pub fn to_rgb(&self) -> Result<Vec<image::RgbImage>> {
        images::unit_to_rgb(&self.images)
    }
}

fn build_text_model(component: &Component, dtype: DType, device: &Device) -> Result<ClipTextModel> {
    let config = ClipTextConfig::from_json(&component.config)?;
    ClipTextModel::new(component.weights.var_builder(dtype, device), &config)
}

fn build_unet(
    component: &Component,
    dtype: DType,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    let config: UNet2DConditionConfig = serde_json::from_value(component.config.clone())
        .map_err(|e| Error::model(format!("unet config.json: {e}")))?;
    UNet2DConditionModel::new(component.weights.var_builder(dtype, device), &config)
}

/// The dtype the VAE runs in for a pipeline in `dtype`. SDXL's original VAE overflows f16 (its
/// decoder activations pass 65504 and come out as NaN), so, as diffusers' SDXL pipelines do, an
/// f16 SDXL pipeline keeps its VAE in f32 unless the VAE's config says `force_upcast: false`
/// (the fp16-fix VAE). SD 1.x/2.x VAEs are fine in f16 and diffusers never upcasts them; bf16
/// has f32's range.
pub fn vae_dtype(family: Family, dtype: DType, vae_config: &AutoencoderKlConfig) -> DType {
    let sdxl_vae = matches!(family, Family::Sdxl | Family::SdxlRefiner);
    if sdxl_vae && dtype == DType::F16 && vae_config.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

fn load_text_encoder(
    component: &Component,
    tokenizer: &TokenizerFiles,
    dtype: DType,
    device: &Device,
) -> Result<TextEncoder> {
    let model = build_text_model(component, dtype, device)?;
    let tokenizer = ClipTokenizer::new(
        &tokenizer.tokenizer_json,
        &tokenizer.pad_token,
        tokenizer.model_max_length,
    )?;
    Ok(TextEncoder { tokenizer, model })
}

impl StableDiffusion {
    pub fn load(files: &PipelineFiles, device: &Device, dtype: DType) -> Result<Self> {
        let text_encoder = load_text_encoder(&files.text_encoder, &files.tokenizer, dtype, device)?;
        let text_encoder_2 = match (&files.text_encoder_2, &files.tokenizer_2) {
            (Some(c), Some(t)) => Some(load_text_encoder(c, t, dtype, device)?),
            (None, None) => None,
            _ => {
                return Err(Error::model(
                    "text_encoder_2 and tokenizer_2 must come together",
                ))
            }
        };
        if (files.family == Family::Sdxl) != text_encoder_2.is_some() {
            return Err(Error::model(
                "SDXL models have two text encoders, SD1/SD2 models one",
            ));
        }
        if files.family == Family::SdxlRefiner {
            check_refiner_files(files)?;
        }
        let unet = build_unet(&files.unet, dtype, device)?;
        let Vae {
            model: vae,
            config: vae_config,
            dtype: vae_dtype,
        } = Vae::load(&files.vae, files.family, device, dtype)?;
        let scheduler_config = SchedulerConfig::from_json(&files.scheduler_config)?;
        // The model's own scheduler class; one sd-serve does not run (or a config without
        // `_class_name`) leaves the model usable with an explicit scheduler in each request.
        let default_scheduler = match scheduler_config.class_name.as_deref() {
            Some(name) => SchedulerSpec::parse(name).map_err(|e| {
                tracing::warn!("model scheduler {name} is not available: {e}");
                format!("the model's scheduler {name} is not available: name one with `scheduler`")
            }),
            None => Err(
                "the model's scheduler config names no scheduler class: name one with `scheduler`"
                    .to_string(),
            ),
        };
        let force_zeros_for_empty_prompt = files.force_zeros_for_empty_prompt;
        Ok(Self {
            family: files.family,
            device: device.clone(),
            dtype,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            vae_config,
            vae_dtype,
            own_vae: None,
            scheduler_config,
            default_scheduler,
            force_zeros_for_empty_prompt,
            embeddings: None,
        })
    }

    /// Makes `vae` the VAE that encodes seed images and decodes results from now on; `None` puts
    /// the model's own back. The VAE must read and write latents of the UNet's shape (its
    /// family is the caller's to check).
    pub fn set_vae(&mut self, vae: Option<&Vae>) -> Result<()> {
        let Some(vae) = vae else {
            if let Some(own) = self.own_vae.take() {
                self.vae = own.model;
                self.vae_config = own.config;
                self.vae_dtype = own.dtype;
            }
            return Ok(());
        };
        let own_channels = self
            .own_vae
            .as_ref()
            .map_or(self.vae_config.latent_channels, |own| {
                own.config.latent_channels
            });
        if vae.config.latent_channels != own_channels {
            return Err(Error::invalid(format!(
                "the VAE has {} latent channels; this model's latents have {own_channels}",
                vae.config.latent_channels
            )));
        }
        let current = Vae {
            model: std::mem::replace(&mut self.vae, vae.model.clone()),
            config: std::mem::replace(&mut self.vae_config, vae.config.clone()),
            dtype: std::mem::replace(&mut self.vae_dtype, vae.dtype),
        };
        if self.own_vae.is_none() {
            self.own_vae = Some(current);
        }
        Ok(())
    }

    /// Uses `embeddings` (textual inversion) in the prompts of the requests run from now on,
    /// until the next call; the empty list runs the plain model. Costs no copy of the model:
    /// see [`textual_inversion`] for how the embeddings apply. Vectors that do not fit the text
    /// encoders, and two embeddings with one token, are refused, leaving the previous set.
    pub fn set_embeddings(&mut self, embeddings: &[PromptEmbedding]) -> Result<()> {
        self.embeddings =
            RequestEncoders::new(&self.text_encoder, self.text_encoder_2.as_ref(), embeddings)?;
        Ok(())
    }

    /// Rebuilds the UNet and the text encoders from `files` after their weights changed (a LoRA
    /// merged or unmerged, see [`crate::weights::lora`]); tokenizers, VAE and scheduler are kept.
    /// No weight is copied: the modules share the stores' tensors.
    pub fn rebuild_adapted(&mut self, files: &PipelineFiles) -> Result<()> {
        if files.family != self.family
            || files.text_encoder_2.is_some() != self.text_encoder_2.is_some()
        {
            return Err(Error::model(
                "rebuild_adapted needs the files this model was loaded from",
            ));
        }
        let unet = build_unet(&files.unet, self.dtype, &self.device)?;
        let text_model = build_text_model(&files.text_encoder, self.dtype, &self.device)?;
        let text_model_2 = match &files.text_encoder_2 {
            Some(c) => Some(build_text_model(c, self.dtype, &self.device)?),
            None => None,
        };
        self.unet = unet;
        self.text_encoder.model = text_model;
        if let (Some(encoder), Some(model)) = (self.text_encoder_2.as_mut(), text_model_2) {
            encoder.model = model;
        }
        // The embeddings' encoders hold the previous text models: set embeddings again.
        self.embeddings = None;
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the VAE runs in: [`Self::dtype`], or f32 for an upcast SDXL VAE.
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    pub fn default_scheduler(&self) -> Option<&SchedulerSpec> {
        self.default_scheduler.as_ref().ok()
    }

    /// The text encoders requests use now: the model's own, or with the embeddings set.
    pub fn text_encoders(&self) -> (&TextEncoder, Option<&TextEncoder>) {
        match &self.embeddings {
            Some(e) => (&e.first, e.second.as_ref()),
            None => (&self.text_encoder, self.text_encoder_2.as_ref()),
        }
    }

    fn encode_prompt(&self, prompt: &str, clip_skip: Option<usize>) -> Result<PromptEmbeddings> {
        match self.text_encoders() {
            (first, None) => conditioning::encode_single(first, prompt, clip_skip, &self.device),
            (first, Some(second)) => {
                conditioning::encode_dual(first, second, prompt, clip_skip, &self.device)
            }
        }
    }

    /// The prompt and negative prompt of `req`, each embedding's token appended where neither
    /// writes it (see [`textual_inversion`]).
    fn prompts(&self, req: &GenerationRequest) -> Result<(String, Option<String>)> {
        match &self.embeddings {
            Some(e) => e.place_tokens(&req.prompt, req.negative_prompt.as_deref()),
            None => Ok((req.prompt.clone(), req.negative_prompt.clone())),
        }
    }

    /// The prompt's embeddings and, when guidance is on, the negative prompt's, as the request's
    /// `prompt_weighting` reads them, with the request's textual inversion embeddings applied;
    /// both have the same length.
    pub fn prompt_embeddings(
        &self,
        req: &GenerationRequest,
        guided: bool,
    ) -> Result<(PromptEmbeddings, Option<PromptEmbeddings>)> {
        let syntax = req.prompt_weighting;
        let (prompt, negative_prompt) = self.prompts(req)?;
        if syntax == PromptWeighting::None {
            let cond = self.encode_prompt(&prompt, req.clip_skip)?;
            let uncond = if !guided {
                None
            } else if negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
                Some(cond.zeros_like()?)
            } else {
                let negative = negative_prompt.as_deref().unwrap_or("");
                // diffusers applies `clip_skip` to the prompt only; the negative prompt keeps the
                // encoder's default layer. Same seed, same image means following it here.
                Some(self.encode_prompt(negative, None)?)
            };
            return Ok((cond, uncond));
        }
        let (first, second) = self.text_encoders();
        let mut list = vec![first];
        list.extend(second);
        let encoders = weighting::Encoders {
            layer: conditioning::EmbeddingLayer::for_encoders(list.len() > 1, req.clip_skip),
            encoders: list,
            device: &self.device,
        };
        let cond = encoders.encode(syntax, &prompt)?;
        if !guided {
            return Ok((cond, None));
        }
        let negative = negative_prompt.as_deref().unwrap_or("");
        let uncond = match syntax {
            // diffusers, given compel's prompt embeddings and no negative ones, zeroes them.
            PromptWeighting::Compel
                if negative_prompt.is_none() && self.force_zeros_for_empty_prompt =>
            {
                let zeros = cond.zeros_like()?;
                return Ok((cond, Some(zeros)));
            }
            // A1111's SDXL zeroes an empty negative prompt (one chunk), whatever the model's
            // config says.
            PromptWeighting::A1111 if negative.is_empty() && second.is_some() => {
                encoders.empty()?.zeros_like()?
            }
            _ => encoders.encode(syntax, negative)?,
        };
        if cond.hidden.dims() == uncond.hidden.dims() {
            return Ok((cond, Some(uncond)));
        }
        let (cond, uncond) = weighting::pad_pair(cond, uncond, &encoders.empty()?)?;
        Ok((cond, Some(uncond)))
    }

    /// Prompt embeddings for `[uncond; cond]` (when guidance is on) of `n` images.
    fn conditioning(
        &self,
        req: &GenerationRequest,
        guided: bool,
    ) -> Result<conditioning::BatchConditioning> {
        if self.family == Family::SdxlRefiner {
            return self.refiner_conditioning(req, guided);
        }
        let (cond, uncond) = self.prompt_embeddings(req, guided)?;
        conditioning::batch_conditioning(
            &cond,
            uncond.as_ref(),
            req.num_images,
            (req.height, req.width),
            self.dtype,
        )
    }

    /// The SDXL refiner's conditioning: its one encoder (no `clip_skip`: diffusers' refiner
    /// call takes the default layer), the negative prompt encoded (zeros only where the
    /// model says `force_zeros_for_empty_prompt`), and aesthetic-score time ids.
    fn refiner_conditioning(
        &self,
        req: &GenerationRequest,
        guided: bool,
    ) -> Result<conditioning::BatchConditioning> {
        let encode =
            |text: &str| conditioning::encode_refiner(&self.text_encoder, text, &self.device);
        let cond = encode(&req.prompt)?;
        let uncond = if !guided {
            None
        } else if req.negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
            Some(cond.zeros_like()?)
        } else {
            Some(encode(req.negative_prompt.as_deref().unwrap_or(""))?)
        };
        let size = (req.height, req.width);
        let mut batch = conditioning::batch_conditioning(
            &cond,
            uncond.as_ref(),
            req.num_images,
            size,
            self.dtype,
        )?;
        if let Some(added) = batch.added.as_mut() {
            added.time_ids = conditioning::aesthetic_time_ids(
                req.num_images,
                guided,
                size,
                self.dtype,
                &self.device,
            )?;
        }
        Ok(batch)
    }

    /// Runs a request to float images. `progress(step, total)` is called after every denoising
    /// step; when it returns false the job stops with `Error::Cancelled`.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        progress: Progress,
    ) -> Result<GenerationOutput> {
        self.generate_controlled(req, &[], progress)
    }

    /// [`Self::generate`] with the loaded ControlNets of `req.controlnets`, in the same order.
    pub fn generate_controlled(
        &self,
        req: &GenerationRequest,
        controlnets: &[&ControlNetModel],
        progress: Progress,
    ) -> Result<GenerationOutput> {
        self.generate_adapted(req, controlnets, &[], progress)
    }

    /// [`Self::generate_controlled`] with the loaded IP-Adapters of `req.ip_adapters`, in the
    /// same order.
    pub fn generate_adapted(
        &self,
        req: &GenerationRequest,
        controlnets: &[&ControlNetModel],
        ip_adapters: &[&IpAdapterModel],
        progress: Progress,
    ) -> Result<GenerationOutput> {
        if req.refiner.is_some() {
            return Err(Error::invalid(
                "a request with a refiner runs through `generate_refined`, with the refiner model",
            ));
        }
        let latents = self.denoise_latents_adapted(req, controlnets, ip_adapters, progress)?;
        let mut images = self.decode(&latents)?;
        if let Some(canvas) = inpaint::Canvas::for_request(req)?.filter(|c| c.pastes_back()) {
            let finished: Vec<_> = images::unit_to_rgb(&images)?
                .into_iter()
                .map(|image| canvas.finish(image))
                .collect();
            images = images::rgb_to_unit(&finished, &self.device)?;
        }
        Ok(GenerationOutput {
            images,
            seeds: req.seeds(),
        })
    }

    /// The denoising part of [`Self::generate`]: the final latents, before decoding.
    /// With `req.refiner` this is the base model's share: it stops where the refiner starts.
    pub fn denoise_latents(&self, req: &GenerationRequest, progress: Progress) -> Result<Tensor> {
        self.denoise_latents_controlled(req, &[], progress)
    }

    /// [`Self::denoise_latents`] with the loaded ControlNets of `req.controlnets`.
    pub fn denoise_latents_controlled(
        &self,
        req: &GenerationRequest,
        controlnets: &[&ControlNetModel],
        progress: Progress,
    ) -> Result<Tensor> {
        self.denoise_latents_adapted(req, controlnets, &[], progress)
    }

    /// [`Self::denoise_latents_controlled`] with the loaded IP-Adapters of `req.ip_adapters`.
    pub fn denoise_latents_adapted(
        &self,
        req: &GenerationRequest,
        controlnets: &[&ControlNetModel],
        ip_adapters: &[&IpAdapterModel],
        progress: Progress,
    ) -> Result<Tensor> {
        // Before the scheduler is built, so that a bad field is refused by its name.
        req.validate()?;
        let scheduler = self.scheduler_for(req)?;
        self.denoise(req, scheduler, controlnets, ip_adapters, None, progress)
    }

    /// The request's scheduler (or the model's own) for `req.steps` steps.
    fn scheduler_for(&self, req: &GenerationRequest) -> Result<Box<dyn Scheduler>> {
        let spec = match (&req.scheduler, &self.default_scheduler) {
            (Some(spec), _) | (None, Ok(spec)) => spec,
            (None, Err(why)) => return Err(Error::Scheduler(why.clone())),
        };
        schedulers::build(spec, &self.scheduler_config, req.steps)
    }

    /// The refiner's share of a request with `req.refiner`: this model (an `sdxl-refiner`, or
    /// an SDXL base used as refiner) continues from the base model's final `latents` (from
    /// [`Self::denoise_latents`], not decoded) at the first timestep below the cut-off, with
    /// its own conditioning, scheduler config and per-image noise generators seeded afresh
    /// with `seed + i` (as a diffusers refiner call given its own seeded generators).
    pub fn refine_latents(
        &self,
        req: &GenerationRequest,
        latents: &Tensor,
        progress: Progress,
    ) -> Result<Tensor> {
        req.validate()?;
        if req.refiner.is_none() {
            return Err(Error::invalid(
                "refine_latents needs a request with a refiner",
            ));
        }
        if !matches!(self.family, Family::Sdxl | Family::SdxlRefiner) {
            return Err(Error::invalid(format!(
                "a refiner must be an sdxl-refiner (or sdxl) model; this one is {}",
                self.family
            )));
        }
        let want = [
            req.num_images,
            self.vae_config.latent_channels,
            req.height / request::VAE_SCALE_FACTOR,
            req.width / request::VAE_SCALE_FACTOR,
        ];
        if latents.dims() != want {
            return Err(Error::invalid(format!(
                "the refiner takes latents shaped {want:?}. Given: {:?}",
                latents.dims()
            )));
        }
        let scheduler = self.scheduler_for(req)?;
        self.denoise(req, scheduler, &[], &[], Some(latents), progress)
    }

    /// A request with a refiner, start to finish: this (SDXL base) model denoises up to the
    /// refiner's start, `refiner` does the rest and decodes with its VAE.
    pub fn generate_refined(
        &self,
        refiner: &StableDiffusion,
        req: &GenerationRequest,
        progress: Progress,
    ) -> Result<GenerationOutput> {
        let latents = self.denoise_latents(req, &mut *progress)?;
        let latents = refiner.refine_latents(req, &latents, progress)?;
        Ok(GenerationOutput {
            images: refiner.decode(&latents)?,
            seeds: req.seeds(),
        })
    }

    /// The model's own scheduler config (`scheduler_config.json`), which request options override.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// [`Self::denoise_latents`] with a scheduler built by the caller for `req.steps` steps
    /// (`req.scheduler` is then not read), e.g. one with its own noise source.
    pub fn denoise_latents_with(
        &self,
        req: &GenerationRequest,
        scheduler: Box<dyn Scheduler>,
        progress: Progress,
    ) -> Result<Tensor> {
        self.denoise_latents_with_controls(req, scheduler, &[], progress)
    }

    /// [`Self::denoise_latents_with`] with the loaded ControlNets of `req.controlnets`, in order.
    pub fn denoise_latents_with_controls(
        &self,
        req: &GenerationRequest,
        scheduler: Box<dyn Scheduler>,
        controlnets: &[&ControlNetModel],
        progress: Progress,
    ) -> Result<Tensor> {
        self.denoise(req, scheduler, controlnets, &[], None, progress)
    }

    /// The denoising loop. `refine_from`: this model is the refiner, continuing from these
    /// latents; otherwise, with `req.refiner`, the loop stops where the refiner starts.
    fn denoise(
        &self,
        req: &GenerationRequest,
        mut scheduler: Box<dyn Scheduler>,
        controlnets: &[&ControlNetModel],
        ip_adapters: &[&IpAdapterModel],
        refine_from: Option<&Tensor>,
        progress: Progress,
    ) -> Result<Tensor> {
        req.validate()?;
        if refine_from.is_none() && self.family == Family::SdxlRefiner {
            // Trained on the last, least noisy timesteps only: from noise it makes no image.
            return Err(Error::invalid(
                "this model is an SDXL refiner: it finishes an SDXL model's denoising (name it \
                 as the request's refiner) and does not generate alone",
            ));
        }
        if refine_from.is_none() && req.refiner.is_some() && self.family != Family::Sdxl {
            return Err(Error::invalid(format!(
                "a refiner works only with SDXL base models; this model is {}",
                self.family
            )));
        }
        // The refiner's share runs without ControlNets, as diffusers' refiner pipeline does.
        let units = match refine_from {
            Some(_) => &[][..],
            None => &req.controlnets[..],
        };
        let canvas = inpaint::Canvas::for_request(req)?;
        let controls = controlnet::prepare(
            units,
            controlnets,
            req.width,
            req.height,
            self.unet.needs_added_conditions(),
            canvas.as_ref(),
        )?;
        // diffusers turns guidance off at scale <= 1 (one UNet pass instead of two).
        let guided = req.guidance_scale > 1.0;
        let cond = self.conditioning(req, guided)?;
        // The refiner's share runs without IP-Adapters too (they are made for the base UNet).
        let image_prompt = match refine_from {
            Some(_) => Vec::new(),
            None => ip_adapter::prepare(
                &req.ip_adapters,
                ip_adapters,
                &self.unet,
                guided,
                req.num_images,
            )?,
        };

        let seeds = req.seeds();
        let mut noise = BatchNoise::from_seeds(&seeds);
        let latent_channels = self.vae_config.latent_channels;
        let latent_shape = [
            latent_channels,
            req.height / request::VAE_SCALE_FACTOR,
            req.width / request::VAE_SCALE_FACTOR,
        ];

        let timesteps = scheduler.timesteps().to_vec();
        let train_timesteps = self.scheduler_config.num_train_timesteps.unwrap_or(1000);
        let end = match (&req.refiner, refine_from) {
            (Some(refiner), None) => base_steps(&timesteps, refiner.start, train_timesteps),
            _ => timesteps.len(),
        };
        if let Some(latents) = &req.latents {
            if latents.dim(1)? != latent_channels {
                return Err(Error::invalid(format!(
                    "`latents` must have {latent_channels} channels for this model. Given: {:?}",
                    latents.dims()
                )));
            }
        }
        let unet_channels = self.unet.in_channels();
        // An inpainting UNet also reads the mask and the masked image's latents.
        let inpainting_unet = unet_channels == 2 * latent_channels + 1;
        if !inpainting_unet && unet_channels != latent_channels {
            return Err(Error::model(format!(
                "the UNet takes {unet_channels} input channels: expected {latent_channels} \
                 (latents) or {} (latents, mask, masked image)",
                2 * latent_channels + 1
            )));
        }
        if inpainting_unet && canvas.is_none() {
            return Err(Error::invalid(
                "this is an inpainting model: it needs a seed image and a mask (or outpainting)",
            ));
        }
        // Whether each step puts the known region back (inpainting with an ordinary UNet): the
        // seed latents, the noise they are brought to each level with, and the latent mask.
        let mut known: Option<(Tensor, Tensor, Tensor)> = None;
        // What an inpainting UNet reads beside the latents, `[mask; masked image latents]`.
        let mut unet_extra: Option<Tensor> = None;
        let initial_noise = |noise: &mut BatchNoise| -> Result<Tensor> {
            match &req.latents {
                Some(l) => Ok(l.to_device(&self.device)?.to_dtype(DType::F32)?),
                None => noise.randn(&latent_shape, &self.device, DType::F32),
            }
        };
        let (start, mut latents) = match (&req.init_image, &canvas) {
            // The refiner continues from the base model's latents as they are.
            _ if refine_from.is_some() => {
                let from = refine_from.expect("checked by the guard; this is a bug");
                let start = req.refiner.as_ref().map_or(0, |r| {
                    refiner_start(&timesteps, r.start, train_timesteps, scheduler.order())
                });
                (start, from.to_dtype(DType::F32)?)
            }
            (None, _) => {
                let initial = initial_noise(&mut noise)?;
                (0, (initial * scheduler.init_noise_sigma())?)
            }
            (Some(init), None) => {
                let start = Self::start_index(req.steps, init.strength, scheduler.as_ref());
                let pixels =
                    images::image_to_tensor(&init.image, req.width, req.height, &self.device)?;
                let encoded = self.encode_sampled(&pixels, &latent_shape, &mut noise)?;
                let initial = initial_noise(&mut noise)?;
                (start, scheduler.add_noise(&encoded, &initial, start)?)
            }
            (Some(init), Some(canvas)) => {
                let start = Self::start_index(req.steps, init.strength, scheduler.as_ref());
                // diffusers starts from pure noise at strength 1 (the seed's latents are not
                // mixed in at all), otherwise from the seed's latents noised to the first step.
                let full_strength = init.strength >= 1.0;
                let pixels =
                    images::image_to_tensor(&canvas.image, req.width, req.height, &self.device)?;
                // Each image's generator draws, in diffusers' order: the seed's latent sample
                // (when used), the starting noise, the masked image's latent sample.
                let encoded = if !inpainting_unet || !full_strength {
                    Some(self.encode_sampled(&pixels, &latent_shape, &mut noise)?)
                } else {
                    None
                };
                let eps = initial_noise(&mut noise)?;
                let latents = match (&encoded, full_strength || req.latents.is_some()) {
                    (Some(encoded), false) => scheduler.add_noise(encoded, &eps, start)?,
                    _ => (&eps * scheduler.init_noise_sigma())?,
                };
                let latent_mask = canvas.latent_mask(&self.device)?;
                if inpainting_unet {
                    let mask = canvas.mask_tensor(&self.device)?;
                    let masked_pixels = pixels.broadcast_mul(&(1.0 - &mask)?)?;
                    let masked = self.encode_sampled(&masked_pixels, &latent_shape, &mut noise)?;
                    let rows = if guided { 2 } else { 1 } * req.num_images;
                    let (lh, lw) = (latent_shape[1], latent_shape[2]);
                    let mask_rows = latent_mask.broadcast_as((rows, 1, lh, lw))?;
                    let masked_rows = Tensor::cat(&vec![&masked; rows / req.num_images], 0)?;
                    unet_extra = Some(
                        Tensor::cat(&[&mask_rows.contiguous()?, &masked_rows], 1)?
                            .to_dtype(self.dtype)?,
                    );
                } else {
                    // diffusers samples the masked image's latents here too, unused by an
                    // ordinary UNet: the same draw keeps each generator where diffusers' is
                    // (Euler a and other stochastic steps go on from it), without the encoding.
                    noise.randn(&latent_shape, &self.device, DType::F32)?;
                    let encoded = encoded
                        .expect("an ordinary UNet inpaints from the seed's latents; this is a bug");
                    known = Some((
                        encoded.to_dtype(self.dtype)?,
                        eps.to_dtype(self.dtype)?,
                        latent_mask.to_dtype(self.dtype)?,
                    ));
                }
                (start, latents)
            }
        };
        latents = latents.to_dtype(self.dtype)?;

        if timesteps.len() <= start && refine_from.is_none() {
            return Err(Error::invalid(format!(
                "`strength` leaves no denoising step of the {} scheduled",
                timesteps.len()
            )));
        }
        let total = end.saturating_sub(start);
        for (index, &t) in timesteps.iter().enumerate().take(end).skip(start) {
            let model_input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let mut model_input = scheduler.scale_model_input(&model_input, index)?;
            let control = controlnet::residuals(
                &controls,
                index - start,
                total,
                &model_input,
                t,
                &cond.hidden,
                cond.added.as_ref(),
                guided,
                req.num_images,
            )?;
            if let Some(extra) = &unet_extra {
                model_input = Tensor::cat(&[&model_input, extra], 1)?;
            }
            let prediction = self.unet.forward_with_image_prompt(
                &model_input,
                t,
                &cond.hidden,
                cond.added.as_ref(),
                control.as_ref().map(|c| c.down.as_slice()),
                control.as_ref().map(|c| &c.mid),
                &image_prompt,
            )?;
            let prediction = if guided {
                let n = req.num_images;
                let uncond = prediction.narrow(0, 0, n)?;
                let text = prediction.narrow(0, n, n)?;
                (&uncond + ((text - &uncond)? * req.guidance_scale)?)?
            } else {
                prediction
            };
            latents = scheduler.step(&prediction, index, &latents, &mut noise)?;
            if let Some((encoded, eps, mask)) = &known {
                // The known region is the seed's latents at the next step's noise level (clean
                // after the last step); only the masked region keeps what was denoised.
                let reference = if index + 1 < timesteps.len() {
                    scheduler.add_noise(encoded, eps, index + 1)?
                } else {
                    encoded.clone()
                };
                let kept = (1.0 - mask)?;
                latents = (reference.broadcast_mul(&kept)? + latents.broadcast_mul(mask)?)?;
            }
            if !progress(index - start + 1, total) {
                return Err(Error::Cancelled);
            }
        }

        Ok(latents)
    }

    /// Where img2img and inpainting start in the scheduler's timesteps: diffusers runs the last
    /// `int(steps * strength)` steps.
    fn start_index(steps: usize, strength: f64, scheduler: &dyn Scheduler) -> usize {
        let run = ((steps as f64 * strength) as usize).min(steps);
        (steps - run) * scheduler.order()
    }

    /// Pixels `[1, 3, H, W]` to scaled latents `[N, C, H/8, W/8]`: one encoding, sampled once
    /// per image with that image's own generator (diffusers' `latent_dist.sample`).
    fn encode_sampled(
        &self,
        pixels: &Tensor,
        latent_shape: &[usize],
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let dist = self.vae.encode(&pixels.to_dtype(self.vae_dtype)?)?;
        let mean = dist.mean.to_dtype(DType::F32)?;
        let std = dist.std.to_dtype(DType::F32)?;
        let eps = noise.randn(latent_shape, &self.device, DType::F32)?;
        let sampled = eps.broadcast_mul(&std)?.broadcast_add(&mean)?;
        let mut encoded = (sampled * self.vae_config.scaling_factor)?;
        if let Some(shift) = self.vae_config.shift_factor {
            encoded = (encoded - shift * self.vae_config.scaling_factor)?;
        }
        Ok(encoded)
    }

    /// Latents to float images `[N, H, W, 3]` in 0..1.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut latents = (latents.to_dtype(self.vae_dtype)? / self.vae_config.scaling_factor)?;
        if let Some(shift) = self.vae_config.shift_factor {
            latents = (latents + shift)?;
        }
        // One image at a time keeps the decoder's activation peak at one image's worth.
        let mut out = Vec::with_capacity(latents.dim(0)?);
        for i in 0..latents.dim(0)? {
            let decoded = self.vae.decode(&latents.narrow(0, i, 1)?)?;
            out.push(images::decoded_to_unit(&decoded)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// diffusers' discrete cut-off between base and refiner: `round(T - start * T)` for `T`
/// training timesteps.
fn refiner_cutoff(start: f64, train_timesteps: usize) -> f64 {
    let t = train_timesteps as f64;
    (t - start * t).round()
}

/// How many of `timesteps` the base model runs when the refiner starts at `start`: those at or
/// above the cut-off (diffusers' SDXL `denoising_end`). `start` = 1 keeps them all.
fn base_steps(timesteps: &[f64], start: f64, train_timesteps: usize) -> usize {
    if start >= 1.0 {
        return timesteps.len();
    }
    let cutoff = refiner_cutoff(start, train_timesteps);
    timesteps.iter().filter(|&&t| t >= cutoff).count()
}

/// Where the refiner starts in its `timesteps` (diffusers' SDXL img2img `denoising_start`): it
/// runs those below the cut-off, one more for a second-order scheduler whose count is even (so
/// it does not begin between the two evaluations of a step).
fn refiner_start(timesteps: &[f64], start: f64, train_timesteps: usize, order: usize) -> usize {
    let cutoff = refiner_cutoff(start, train_timesteps);
    let mut run = timesteps.iter().filter(|&&t| t < cutoff).count();
    if order == 2 && run % 2 == 0 {
        run += 1;
    }
    timesteps.len().saturating_sub(run)
}

/// An SDXL refiner's UNet reads 5 time ids (original size, crop, aesthetic score) beside the
/// pooled embedding; a config that adds up otherwise would fail at the first step.
fn check_refiner_files(files: &PipelineFiles) -> Result<()> {
    if files.text_encoder_2.is_some() {
        return Err(Error::model(
            "an SDXL refiner has one text encoder (SDXL's second); these files have two",
        ));
    }
    let get = |v: &serde_json::Value, key: &str| v.get(key).and_then(serde_json::Value::as_u64);
    let unet = &files.unet.config;
    let (Some(per_id), Some(total), Some(pooled)) = (
        get(unet, "addition_time_embed_dim"),
        get(unet, "projection_class_embeddings_input_dim"),
        get(&files.text_encoder.config, "projection_dim"),
    ) else {
        return Err(Error::model(
            "an SDXL refiner needs `addition_time_embed_dim` and \
             `projection_class_embeddings_input_dim` in its UNet config and `projection_dim` in \
             its text encoder config",
        ));
    };
    if total != 5 * per_id + pooled {
        return Err(Error::model(format!(
            "the refiner UNet's `projection_class_embeddings_input_dim` is {total}; with 5 time \
             ids (size, crop, aesthetic score) of {per_id} and a pooled embedding of {pooled} it \
             must be {}",
            5 * per_id + pooled
        )));
    }
    Ok(())
}

#[cfg(test)]
mod refiner_tests {
    use super::*;

    #[test]
    fn split_follows_diffusers_cutoffs() {
        // SDXL "leading" schedule, 4 steps: 751, 501, 251, 1; start 0.5 cuts at 500.
        let ts = [751.0, 501.0, 251.0, 1.0];
        assert_eq!(base_steps(&ts, 0.5, 1000), 2);
        assert_eq!(refiner_start(&ts, 0.5, 1000, 1), 2);
        // 7 leading steps, start 3/7: cut-off 571 leaves the base 2 steps, the refiner 5.
        let ts7 = [853.0, 711.0, 569.0, 427.0, 285.0, 143.0, 1.0];
        assert_eq!(base_steps(&ts7, 3.0 / 7.0, 1000), 2);
        assert_eq!(refiner_start(&ts7, 3.0 / 7.0, 1000, 1), 2);
        // start 1: the base runs everything, the refiner nothing.
        assert_eq!(base_steps(&ts, 1.0, 1000), 4);
        assert_eq!(refiner_start(&ts, 1.0, 1000, 1), 4);
        // Second order (Heun, 3 steps: 1 + 2 + 2 listed): an even count below the cut-off
        // grows by one so the refiner starts on a whole step.
        let heun = [667.0, 334.0, 334.0, 1.0, 1.0];
        assert_eq!(refiner_start(&heun, 0.5, 1000, 2), 0);
        assert_eq!(refiner_start(&heun, 0.8, 1000, 2), 2);
    }
}
