//! The engine: owns the devices and runs generation jobs for the API dialects.
//!
//! [`Engine::submit`] admits a job into a bounded queue or refuses it at once; one OS thread per
//! device takes jobs first in, first out, loads models into its own cache (LRU within a byte
//! budget) and streams [`JobEvent`]s back: started, each denoising step, each image as soon as
//! it is decoded, then finished or failed. A job whose [`JobHandle`] is dropped or cancelled is
//! skipped if it has not started and stopped between denoising steps if it has. Candle work is
//! blocking, so it never runs on the async runtime; the handle's receiver is the only async part.
//!
//! LoRAs stay merged into a cached model's weights between jobs: a job asking for another set
//! (ids and weights) takes the old one out exactly and merges the new one, then rebuilds the
//! adapted modules; a job asking for the same set runs at once. A job in LCM mode adds its model
//! family's LCM-LoRA to its set the same way.
//!
//! A job naming a registry VAE encodes and decodes with it instead of the model's own: each
//! worker keeps the last [`VAES_KEPT`] such VAEs loaded and sets the one a job asks for (or the
//! model's own) on the cached model before running it, which shares weights and copies nothing.
//!
//! Textual inversion embeddings change no weight: each job's embeddings are read (files kept
//! parsed per worker) and handed to the model for that job's prompts only.
//!
//! ControlNets a job names are loaded beside the models and kept (the most recently used few)
//! for the next jobs.

mod cache;
mod queue;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use tokio::sync::mpsc;

use crate::models::controlnet::ControlNetModel;
use crate::models::ip_adapter::IpAdapterModel;
use crate::pipeline::{
    images, request, Canvas, GenerationRequest, PromptEmbedding, StableDiffusion, Vae,
};
use crate::registry::{
    ControlNetEntry, EmbeddingEntry, IpAdapterEntry, LoraEntry, ModelEntry, Registry, VaeEntry,
};
use crate::weights::embeddings::TextualInversion;
use crate::weights::lora::{merge_loras, Lora, MergedLoras};
use crate::weights::{Family, PipelineFiles};
use crate::{Error, Result};

use cache::ModelCache;
pub use queue::EngineStats;
use queue::{JobQueue, Outcome, Queued, Refusal};

/// Per-job limits the engine enforces at admission, on top of the pipeline's own checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    pub max_images: usize,
    pub max_steps: usize,
    /// Largest `width * height` of one image.
    pub max_pixels: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_images: request::MAX_IMAGES,
            max_steps: request::MAX_STEPS,
            max_pixels: request::MAX_SIDE * request::MAX_SIDE,
        }
    }
}

impl JobLimits {
    fn check(&self, req: &GenerationRequest) -> Result<()> {
        if req.num_images > self.max_images {
            return Err(Error::invalid(format!(
                "`num_images` must be <= {}. Given: {}",
                self.max_images, req.num_images
            )));
        }
        if req.steps > self.max_steps {
            return Err(Error::invalid(format!(
                "`steps` must be <= {}. Given: {}",
                self.max_steps, req.steps
            )));
        }
        let pixels = req.width.saturating_mul(req.height);
        if pixels > self.max_pixels {
            return Err(Error::invalid(format!(
                "`width` x `height` must be <= {} pixels. Given: {}x{} = {pixels}",
                self.max_pixels, req.width, req.height
            )));
        }
        Ok(())
    }
}

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most jobs waiting or running at once; beyond it submissions are refused.
    pub queue_capacity: usize,
    /// One worker thread per device.
    pub devices: Vec<Device>,
    pub dtype: DType,
    /// Weight bytes each worker keeps loaded; least recently used models go first beyond it.
    pub model_cache_bytes: usize,
    pub limits: JobLimits,
}

impl EngineConfig {
    /// One worker per device, f16 on accelerators and f32 on the CPU, no cache limit.
    pub fn new(devices: Vec<Device>) -> Self {
        let dtype = if devices.iter().all(Device::is_cpu) {
            DType::F32
        } else {
            DType::F16
        };
        Self {
            queue_capacity: 32,
            devices,
            dtype,
            model_cache_bytes: usize::MAX,
            limits: JobLimits::default(),
        }
    }
}

/// A generation job: a registry id (or alias) and the canonical request.
#[derive(Debug, Clone)]
pub struct Job {
    pub model: String,
    pub request: GenerationRequest,
}

/// What a job reports, in this order: `Started`, `Progress` after each denoising step, one
/// `Image` per image, then `Finished`; or `Failed` at any point (`Error::Cancelled` when it
/// was cancelled after it started).
#[derive(Debug)]
pub enum JobEvent {
    Started,
    Progress {
        step: usize,
        total: usize,
    },
    Image {
        index: usize,
        seed: u64,
        image: image::RgbImage,
    },
    Finished,
    Failed(Error),
}

/// Why a job was not admitted. Each dialect renders these as its own "busy" or "bad request".
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {capacity} jobs are waiting or running. Try again later")]
    QueueFull { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Invalid(Error),
}

/// A job in the queue, with the way back to its client.
struct QueuedJob {
    id: u64,
    model: String,
    request: GenerationRequest,
    events: mpsc::UnboundedSender<JobEvent>,
    cancel: Arc<AtomicBool>,
}

impl QueuedJob {
    fn is_wanted(&self) -> bool {
        !self.cancel.load(Ordering::SeqCst) && !self.events.is_closed()
    }

    fn send(&self, event: JobEvent) {
        // A client that went away is noticed through `is_wanted`; nothing to do here.
        let _ = self.events.send(event);
    }
}

impl Queued for QueuedJob {
    fn id(&self) -> u64 {
        self.id
    }
    fn is_cancelled(&self) -> bool {
        !self.is_wanted()
    }
}

/// What the engine and its workers share.
struct Shared {
    queue: JobQueue<QueuedJob>,
    /// Set when shutdown passes its deadline: running jobs stop at their next step.
    abort: AtomicBool,
    model_loads: AtomicU64,
    model_evictions: AtomicU64,
}

impl Shared {
    fn new(queue_capacity: usize) -> Self {
        Self {
            queue: JobQueue::new(queue_capacity),
            abort: AtomicBool::new(false),
            model_loads: AtomicU64::new(0),
            model_evictions: AtomicU64::new(0),
        }
    }
}

/// The client's side of an admitted job. Dropping it cancels the job.
pub struct JobHandle {
    id: u64,
    events: mpsc::UnboundedReceiver<JobEvent>,
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl JobHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the last one.
    pub async fn recv(&mut self) -> Option<JobEvent> {
        self.events.recv().await
    }

    /// Cancels the job: a waiting job leaves the queue at once (its handle receives
    /// `Failed(Cancelled)`); a running one stops after its current denoising step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(job) = self.shared.queue.remove(self.id) {
            job.send(JobEvent::Failed(Error::Cancelled));
        }
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id).finish()
    }
}

/// The job queue and its device workers.
pub struct Engine {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    limits: JobLimits,
    next_id: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    /// Starts one worker thread per device. Models load on first use.
    pub fn start(config: EngineConfig, registry: Arc<Registry>) -> Result<Engine> {
        if config.devices.is_empty() {
            return Err(Error::invalid("the engine needs at least one device"));
        }
        if config.queue_capacity == 0 {
            return Err(Error::invalid("`queue_capacity` must be at least 1"));
        }
        let shared = Arc::new(Shared::new(config.queue_capacity));
        let mut workers = Vec::with_capacity(config.devices.len());
        for (index, device) in config.devices.into_iter().enumerate() {
            let shared = shared.clone();
            let registry = registry.clone();
            let (dtype, budget) = (config.dtype, config.model_cache_bytes);
            let worker = std::thread::Builder::new()
                .name(format!("sd-worker-{index}"))
                .spawn(move || run_worker(&shared, &registry, &device, dtype, budget))?;
            workers.push(worker);
        }
        Ok(Engine {
            shared,
            registry,
            limits: config.limits,
            next_id: AtomicU64::new(1),
            workers: Mutex::new(workers),
        })
    }

    /// Admits a job or refuses it at once; never waits for room.
    pub fn submit(&self, job: Job) -> std::result::Result<JobHandle, SubmitError> {
        if let Err(e) = self
            .limits
            .check(&job.request)
            .and_then(|()| job.request.validate())
            .and_then(|()| self.check_loras(&job))
            .and_then(|()| self.check_vae_and_lcm(&job))
            .and_then(|()| self.check_embeddings(&job))
            .and_then(|()| self.check_controlnets(&job))
            .and_then(|()| self.check_ip_adapters(&job))
            .and_then(|()| self.check_refiner(&job))
        {
            self.shared.queue.count_invalid();
            return Err(SubmitError::Invalid(e));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let queued = QueuedJob {
            id,
            model: job.model,
            request: job.request,
            events,
            cancel: cancel.clone(),
        };
        match self.shared.queue.push(queued) {
            Ok(()) => Ok(JobHandle {
                id,
                events: receiver,
                cancel,
                shared: self.shared.clone(),
            }),
            Err(Refusal::Full) => Err(SubmitError::QueueFull {
                capacity: self.shared.queue.capacity(),
            }),
            Err(Refusal::Closed) => Err(SubmitError::ShuttingDown),
        }
    }

    /// Every LoRA of the job is registered and, where the model's family is declared, fits it.
    fn check_loras(&self, job: &Job) -> Result<()> {
        if job.request.loras.is_empty() {
            return Ok(());
        }
        let family = self.registry.get(&job.model).and_then(|e| e.family);
        for (id, _) in &job.request.loras {
            let lora = self.registry.resolve_lora(id)?;
            if let Some(family) = family {
                check_lora_family(&lora, &job.model, family)?;
            }
        }
        Ok(())
    }

    /// The job's VAE is registered, and where the model's family is declared, the VAE fits it
    /// and an LCM job has an LCM-LoRA for it.
    fn check_vae_and_lcm(&self, job: &Job) -> Result<()> {
        let family = self.registry.get(&job.model).and_then(|e| e.family);
        if let Some(name) = &job.request.vae {
            let vae = self.registry.resolve_vae(name)?;
            if let Some(family) = family {
                check_vae_family(&vae, &job.model, family)?;
            }
        }
        if let (true, Some(family)) = (job.request.lcm_lora, family) {
            lcm_lora(&self.registry, &job.model, family)?;
        }
        Ok(())
    }

    /// Every embedding of the job is registered and, where the model's family is declared, fits
    /// it.
    fn check_embeddings(&self, job: &Job) -> Result<()> {
        let family = self.registry.get(&job.model).and_then(|e| e.family);
        for (id, _) in &job.request.embeddings {
            let embedding = self.registry.resolve_embedding(id)?;
            if let Some(family) = family {
                check_embedding_family(&embedding, &job.model, family)?;
            }
        }
        Ok(())
    }

    /// Every ControlNet of the job is registered and, where the model's family is declared,
    /// fits it.
    fn check_controlnets(&self, job: &Job) -> Result<()> {
        let family = self.registry.get(&job.model).and_then(|e| e.family);
        for unit in &job.request.controlnets {
            let entry = self.registry.resolve_controlnet(&unit.model)?;
            if let Some(family) = family {
                check_controlnet_family(&entry, &job.model, family)?;
            }
        }
        Ok(())
    }

    /// Every IP-Adapter of the job is registered and, where the model's family is declared,
    /// fits it.
    fn check_ip_adapters(&self, job: &Job) -> Result<()> {
        let family = self.registry.get(&job.model).and_then(|e| e.family);
        for unit in &job.request.ip_adapters {
            let entry = self.registry.resolve_ip_adapter(&unit.model)?;
            if let Some(family) = family {
                check_ip_adapter_family(&entry, &job.model, family)?;
            }
        }
        Ok(())
    }

    /// A refiner is never the job's model. A job's refiner is a registered model; where
    /// families are declared, an `sdxl-refiner` (or `sdxl`) one, and the job's model SDXL.
    /// Undeclared families are checked when loaded.
    fn check_refiner(&self, job: &Job) -> Result<()> {
        let declared = self.registry.get(&job.model).and_then(|e| e.family);
        if declared == Some(Family::SdxlRefiner) {
            return Err(Error::invalid(format!(
                "model `{}` is an SDXL refiner: it finishes an SDXL model's denoising (name it as \
                 the request's refiner) and does not generate alone",
                job.model
            )));
        }
        let Some(refiner) = &job.request.refiner else {
            return Ok(());
        };
        let entry = self.registry.resolve_id(&refiner.model)?;
        if let Some(family) = entry.family {
            if !matches!(family, Family::SdxlRefiner | Family::Sdxl) {
                return Err(Error::invalid(format!(
                    "refiner `{}` is {family}: a refiner must be an sdxl-refiner (or sdxl) model",
                    entry.id
                )));
            }
        }
        if let Some(family) = declared {
            if family != Family::Sdxl {
                return Err(Error::invalid(format!(
                    "a refiner works only with SDXL models; model `{}` is {family}",
                    job.model
                )));
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            model_loads: self.shared.model_loads.load(Ordering::Relaxed),
            model_evictions: self.shared.model_evictions.load(Ordering::Relaxed),
            ..self.shared.queue.stats()
        }
    }

    /// Stops admitting jobs, lets waiting and running ones finish within `grace`, cancels the
    /// rest (running ones stop after their current step) and joins the workers. Blocking: from
    /// async code call it on a blocking thread. Returns true when every job finished in time.
    pub fn shutdown(&self, grace: Duration) -> bool {
        self.shared.queue.close();
        let finished = self.shared.queue.wait_idle(Instant::now() + grace);
        if !finished {
            self.shared.abort.store(true, Ordering::SeqCst);
            for job in self.shared.queue.drain() {
                job.send(JobEvent::Failed(Error::Cancelled));
            }
        }
        let workers: Vec<_> = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("an engine worker thread panicked outside a job");
            }
        }
        finished
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let running = !self
            .workers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if running {
            self.shutdown(Duration::ZERO);
        }
    }
}

/// A device's worker: jobs from the queue, models from its own cache.
fn run_worker(
    shared: &Shared,
    registry: &Registry,
    device: &Device,
    dtype: DType,
    cache_budget: usize,
) {
    // The cache holds base models and refiners alike, one entry per registry id, each with its
    // own weights (a refiner shares no tensor with its base). A refined job needs its base,
    // then its refiner, never both at once: when the budget fits only one, loading the refiner
    // evicts the base, whose share of the job is done by then.
    let mut cache = ModelCache::new(cache_budget);
    let mut lora_files = Recent::new(LORA_FILES_KEPT);
    let mut vaes = Recent::new(VAES_KEPT);
    let mut embedding_files = Recent::new(EMBEDDING_FILES_KEPT);
    let mut controlnets = Recent::new(CONTROLNETS_KEPT);
    let mut ip_adapters = Recent::new(IP_ADAPTERS_KEPT);
    worker_loop(shared, |job| {
        let entry = registry.resolve_id(&job.model)?;
        let loras = job
            .request
            .loras
            .iter()
            .map(|(id, weight)| Ok((registry.resolve_lora(id)?, *weight)))
            .collect::<Result<Vec<_>>>()?;
        let model = ready_model(
            shared,
            &mut cache,
            registry,
            &entry,
            &loras,
            job.request.lcm_lora,
            &mut lora_files,
            device,
            dtype,
        )?;
        let family = model.files.family;
        let vae = match &job.request.vae {
            Some(name) => {
                let vae = registry.resolve_vae(name)?;
                check_vae_family(&vae, &entry.id, family)?;
                Some(vaes.get_or_load(&vae.id, || {
                    Vae::load(&vae.load(device, dtype)?, vae.family, device, dtype)
                })?)
            }
            None => None,
        };
        model.model.set_vae(vae.as_deref())?;
        let embeddings = job
            .request
            .embeddings
            .iter()
            .map(|(id, weight)| {
                let found = registry.resolve_embedding(id)?;
                check_embedding_family(&found, &entry.id, family)?;
                let embedding = embedding_files.get_or_load(&found.id, || {
                    TextualInversion::load(&found.local_path()?, device)
                })?;
                Ok(PromptEmbedding {
                    id: found.id,
                    token: found.token,
                    embedding,
                    weight: *weight,
                    negative: found.negative,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        model.model.set_embeddings(&embeddings)?;
        let nets = job
            .request
            .controlnets
            .iter()
            .map(|unit| {
                let net = registry.resolve_controlnet(&unit.model)?;
                check_controlnet_family(&net, &entry.id, family)?;
                controlnets.get_or_load(&net.id, || {
                    let loaded = ControlNetModel::load_entry(&net, device, dtype)?;
                    tracing::info!(controlnet = net.id, "ControlNet loaded");
                    Ok(loaded)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let adapters = job
            .request
            .ip_adapters
            .iter()
            .map(|unit| {
                let found = registry.resolve_ip_adapter(&unit.model)?;
                check_ip_adapter_family(&found, &entry.id, family)?;
                ip_adapters.get_or_load(&found.id, || {
                    let (file, encoder) = found.local_paths()?;
                    let adapter = IpAdapterModel::load(&file, &encoder, device, dtype)?;
                    tracing::info!(ip_adapter = found.id, "IP-Adapter loaded");
                    Ok(adapter)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(refiner) = &job.request.refiner else {
            return run_job(&model.model, &nets, &adapters, job, &shared.abort);
        };
        // The base's share stops where the refiner starts (it refuses non-SDXL models).
        let latents = denoise_job(&model.model, &nets, &adapters, job, &shared.abort, None)?;
        let refiner_entry = registry.resolve_id(&refiner.model)?;
        // The refiner runs without LoRAs (an SDXL base used as refiner may have some merged),
        // embeddings or ControlNets, and decodes with its own VAE, or the request's when it
        // names one.
        let refiner = ready_model(
            shared,
            &mut cache,
            registry,
            &refiner_entry,
            &[],
            false,
            &mut lora_files,
            device,
            dtype,
        )?;
        refiner.model.set_embeddings(&[])?;
        refiner.model.set_vae(vae.as_deref())?;
        let latents = denoise_job(&refiner.model, &[], &[], job, &shared.abort, Some(&latents))?;
        send_images(&refiner.model, &latents, job, &shared.abort)
    });
}

/// The model of `entry` from the worker's cache (loaded on a miss) with the LoRA set `loras`
/// merged, and with `lcm` the family's LCM-LoRA at weight 1 after them; the load and eviction
/// counters updated.
#[allow(clippy::too_many_arguments)]
fn ready_model<'c>(
    shared: &Shared,
    cache: &'c mut ModelCache<LoadedModel>,
    registry: &Registry,
    entry: &ModelEntry,
    loras: &[(LoraEntry, f64)],
    lcm: bool,
    lora_files: &mut Recent<Lora>,
    device: &Device,
    dtype: DType,
) -> Result<&'c mut LoadedModel> {
    let (loads, evictions) = (cache.loads(), cache.evictions());
    let loaded = cached_model(cache, entry, device, dtype).map(|_| ());
    let counts = [
        (&shared.model_loads, cache.loads() - loads),
        (&shared.model_evictions, cache.evictions() - evictions),
    ];
    for (counter, n) in counts {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    loaded?;
    // Cached now: the model just loaded is never evicted.
    let model = cached_model(cache, entry, device, dtype)?;
    let family = model.files.family;
    for (lora, _) in loras {
        check_lora_family(lora, &entry.id, family)?;
    }
    let mut wanted = loras.to_vec();
    if lcm {
        wanted.push((lcm_lora(registry, &entry.id, family)?.clone(), 1.0));
    }
    let switched = model.set_loras(&wanted, lora_files, device);
    // The originals a merge keeps count against the budget like the weights do.
    let bytes = model.bytes();
    let evictions = cache.evictions();
    cache.resize(&entry.id, bytes);
    let evicted = cache.evictions() - evictions;
    shared.model_evictions.fetch_add(evicted, Ordering::Relaxed);
    switched?;
    cached_model(cache, entry, device, dtype)
}

/// ControlNets a worker keeps loaded, so a run of jobs with the same control loads it once.
const CONTROLNETS_KEPT: usize = 4;
/// IP-Adapters (with their image encoders) a worker keeps loaded.
const IP_ADAPTERS_KEPT: usize = 2;

/// An IP-Adapter trained with one family asked of a model of another is the client's mistake.
fn check_ip_adapter_family(adapter: &IpAdapterEntry, model: &str, family: Family) -> Result<()> {
    if adapter.family == family {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "IP-Adapter `{}` is for {} models, but model `{model}` is {family}",
        adapter.id, adapter.family
    )))
}

/// A ControlNet trained with one family asked of a model of another is the client's mistake.
fn check_controlnet_family(net: &ControlNetEntry, model: &str, family: Family) -> Result<()> {
    if net.family == family {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "ControlNet `{}` is for {} models, but model `{model}` is {family}",
        net.id, net.family
    )))
}

/// LoRA files a worker keeps parsed, so switching back to a recent LoRA reads no file.
const LORA_FILES_KEPT: usize = 16;
/// Embedding files a worker keeps parsed (a few kilobytes each).
const EMBEDDING_FILES_KEPT: usize = 64;

/// An embedding made for one family asked of a model of another is the client's mistake.
fn check_embedding_family(embedding: &EmbeddingEntry, model: &str, family: Family) -> Result<()> {
    if embedding.family == family {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "embedding `{}` is for {} models, but model `{model}` is {family}",
        embedding.id, embedding.family
    )))
}

/// Registry VAEs a worker keeps loaded beside its models (an SD VAE is 84M parameters: 160 MB
/// in f16, 330 MB for an upcast SDXL one), so jobs alternating between a few VAEs load none.
pub const VAES_KEPT: usize = 4;

/// A VAE made for one latent space asked of a model of another is the client's mistake.
fn check_vae_family(vae: &VaeEntry, model: &str, family: Family) -> Result<()> {
    if vae.fits(family) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "VAE `{}` is for {} models, but model `{model}` is {family}",
        vae.id, vae.family
    )))
}

/// The LCM-LoRA registered for `family`, or why LCM sampling is not available for `model`.
fn lcm_lora<'r>(registry: &'r Registry, model: &str, family: Family) -> Result<&'r LoraEntry> {
    registry.lcm_lora(family).ok_or_else(|| {
        Error::invalid(format!(
            "LCM sampling needs an LCM-LoRA for {family} models (model `{model}`), and none is \
             configured: add a [[lora]] entry with `family = \"{family}\"` and `lcm = true` to \
             models.toml"
        ))
    })
}

/// A LoRA made for one family asked of a model of another is the client's mistake.
fn check_lora_family(lora: &LoraEntry, model: &str, family: Family) -> Result<()> {
    if lora.family == family {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "LoRA `{}` is for {} models, but model `{model}` is {family}",
        lora.id, lora.family
    )))
}

/// A model in a worker's cache: its modules, the files they were built from, and the LoRAs
/// merged into those files now.
struct LoadedModel {
    model: StableDiffusion,
    files: PipelineFiles,
    /// Size of the loaded weights.
    weight_bytes: usize,
    /// The merged set (registry id, weight) in request order, and how to take it out again.
    merged: Option<(Vec<(String, f64)>, MergedLoras)>,
}

impl LoadedModel {
    /// The weights and the originals kept for taking the merged LoRAs out.
    fn bytes(&self) -> usize {
        let kept = self.merged.as_ref().map_or(0, |(_, m)| m.backup_bytes());
        self.weight_bytes + kept
    }

    /// Makes `wanted` the merged LoRA set: nothing to do when it already is; otherwise the old
    /// set is taken out, the new one merged and the adapted modules rebuilt. A LoRA file that
    /// cannot be read changes nothing; a merge that fails leaves the plain model.
    fn set_loras(
        &mut self,
        wanted: &[(LoraEntry, f64)],
        files: &mut Recent<Lora>,
        device: &Device,
    ) -> Result<()> {
        let key: Vec<(String, f64)> = wanted.iter().map(|(e, w)| (e.id.clone(), *w)).collect();
        let current = self.merged.as_ref().map_or(&[][..], |(k, _)| k.as_slice());
        if current == key.as_slice() {
            return Ok(());
        }
        // Read the new files before touching the weights, so a missing file changes nothing.
        let loras = wanted
            .iter()
            .map(|(entry, _)| {
                files.get_or_load(&entry.id, || Lora::load(&entry.local_path()?, device))
            })
            .collect::<Result<Vec<_>>>()?;
        let started = Instant::now();
        if let Some((_, merged)) = self.merged.take() {
            merged.unmerge(&mut self.files);
        }
        let result = if key.is_empty() {
            Ok(())
        } else {
            let pairs: Vec<(&Lora, f64)> = loras
                .iter()
                .zip(&key)
                .map(|(lora, (_, weight))| (lora.as_ref(), *weight))
                .collect();
            merge_loras(&mut self.files, &pairs).map(|merged| {
                self.merged = Some((key.clone(), merged));
            })
        };
        // Rebuilt on failure too: the modules must not keep the set just taken out.
        self.model.rebuild_adapted(&self.files)?;
        tracing::info!(loras = ?key, secs = started.elapsed().as_secs_f64(), "LoRAs switched");
        result
    }
}

/// Loaded things (parsed LoRA and embedding files, VAEs, ControlNets, IP-Adapters) by registry
/// id, the least recently used dropped beyond `capacity`.
struct Recent<T> {
    capacity: usize,
    /// Oldest first.
    entries: Vec<(String, Arc<T>)>,
}

impl<T> Recent<T> {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Vec::new(),
        }
    }

    /// The kept `id`, else what `load` returns (a failed load keeps nothing).
    fn get_or_load(&mut self, id: &str, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        if let Some(at) = self.entries.iter().position(|(kept, _)| kept == id) {
            let hit = self.entries.remove(at);
            let value = hit.1.clone();
            self.entries.push(hit);
            return Ok(value);
        }
        let value = Arc::new(load()?);
        if self.entries.len() >= self.capacity.max(1) {
            self.entries.remove(0);
        }
        self.entries.push((id.to_string(), value.clone()));
        Ok(value)
    }
}

/// Takes jobs until the queue is closed and empty. `run` does the work; a panic inside it fails
/// that job, not the worker.
fn worker_loop(shared: &Shared, mut run: impl FnMut(&QueuedJob) -> Result<()>) {
    while let Some(job) = shared.queue.pop() {
        job.send(JobEvent::Started);
        let result = catch_unwind(AssertUnwindSafe(|| run(&job)));
        let (outcome, last) = match result {
            Ok(Ok(())) => (Outcome::Completed, JobEvent::Finished),
            Ok(Err(Error::Cancelled)) => (Outcome::Cancelled, JobEvent::Failed(Error::Cancelled)),
            Ok(Err(e)) => {
                tracing::warn!(job = job.id, model = job.model, "job failed: {e}");
                (Outcome::Failed, JobEvent::Failed(e))
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_string());
                tracing::error!(job = job.id, model = job.model, "job panicked: {what}");
                let e = Error::Internal(format!("the job failed unexpectedly: {what}"));
                (Outcome::Failed, JobEvent::Failed(e))
            }
        };
        // Counted before the client hears of it, so stats read after the last event agree.
        shared.queue.finish(outcome);
        job.send(last);
    }
}

/// The model of `entry` from the worker's cache, loaded on a miss.
fn cached_model<'c>(
    cache: &'c mut ModelCache<LoadedModel>,
    entry: &ModelEntry,
    device: &Device,
    dtype: DType,
) -> Result<&'c mut LoadedModel> {
    cache.get_or_load(&entry.id, || {
        let files = entry.load(device, dtype)?;
        let bytes = [
            Some(&files.unet),
            Some(&files.vae),
            Some(&files.text_encoder),
            files.text_encoder_2.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|c| c.weights.size_in_bytes())
        .sum();
        let model = StableDiffusion::load(&files, device, dtype)?;
        let loaded = LoadedModel {
            model,
            files,
            weight_bytes: bytes,
            merged: None,
        };
        Ok((loaded, bytes))
    })
}

/// Denoises the job's images together, then decodes and sends them one by one.
fn run_job(
    model: &StableDiffusion,
    controlnets: &[Arc<ControlNetModel>],
    ip_adapters: &[Arc<IpAdapterModel>],
    job: &QueuedJob,
    abort: &AtomicBool,
) -> Result<()> {
    let latents = denoise_job(model, controlnets, ip_adapters, job, abort, None)?;
    send_images(model, &latents, job, abort)
}

/// The job's latents from `model`: the whole denoising (guided by `controlnets`), or with a
/// refiner the base's share (`refine_from` `None`) or the refiner's (continuing from
/// `refine_from`). Each share reports its own steps.
fn denoise_job(
    model: &StableDiffusion,
    controlnets: &[Arc<ControlNetModel>],
    ip_adapters: &[Arc<IpAdapterModel>],
    job: &QueuedJob,
    abort: &AtomicBool,
    refine_from: Option<&candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    let keep_going = || job.is_wanted() && !abort.load(Ordering::SeqCst);
    if !keep_going() {
        return Err(Error::Cancelled);
    }
    let mut progress = |step, total| {
        if !keep_going() {
            return false;
        }
        job.send(JobEvent::Progress { step, total });
        true
    };
    match refine_from {
        None => {
            let nets: Vec<&ControlNetModel> = controlnets.iter().map(Arc::as_ref).collect();
            let adapters: Vec<&IpAdapterModel> = ip_adapters.iter().map(Arc::as_ref).collect();
            model.denoise_latents_adapted(&job.request, &nets, &adapters, &mut progress)
        }
        Some(latents) => model.refine_latents(&job.request, latents, &mut progress),
    }
}

/// Decodes the job's latents with `model`'s VAE and sends the images one by one.
fn send_images(
    model: &StableDiffusion,
    latents: &candle_core::Tensor,
    job: &QueuedJob,
    abort: &AtomicBool,
) -> Result<()> {
    let keep_going = || job.is_wanted() && !abort.load(Ordering::SeqCst);
    // Outpainting and `maskMargin` blend each generated picture back into the seed image.
    let canvas = Canvas::for_request(&job.request)?.filter(Canvas::pastes_back);
    for (index, seed) in job.request.seeds().into_iter().enumerate() {
        if !keep_going() {
            return Err(Error::Cancelled);
        }
        let pixels = model.decode(&latents.narrow(0, index, 1)?)?;
        let image = images::unit_to_rgb(&pixels)?
            .pop()
            .expect("one latent decodes to one image; this is a bug");
        let image = match &canvas {
            Some(canvas) => canvas.finish(image),
            None => image,
        };
        job.send(JobEvent::Image { index, seed, image });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(capacity: usize) -> Arc<Shared> {
        Arc::new(Shared::new(capacity))
    }

    fn queued(id: u64) -> (QueuedJob, mpsc::UnboundedReceiver<JobEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let job = QueuedJob {
            id,
            model: "m".into(),
            request: GenerationRequest::new("p"),
            events,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        (job, rx)
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<JobEvent>) -> Vec<JobEvent> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn a_panicking_job_fails_and_the_worker_goes_on() {
        let shared = shared(4);
        let (panics, mut rx1) = queued(1);
        let (fine, mut rx2) = queued(2);
        shared.queue.push(panics).unwrap();
        shared.queue.push(fine).unwrap();
        shared.queue.close();
        worker_loop(&shared, |job| {
            if job.id == 1 {
                panic!("boom");
            }
            Ok(())
        });
        let first = drain(&mut rx1);
        assert!(matches!(first[0], JobEvent::Started));
        match &first[1] {
            JobEvent::Failed(Error::Internal(msg)) => assert!(msg.contains("boom"), "{msg}"),
            other => panic!("expected an internal failure, got {other:?}"),
        }
        let second = drain(&mut rx2);
        assert!(matches!(second.last(), Some(JobEvent::Finished)));
        let s = shared.queue.stats();
        assert_eq!((s.failed, s.completed, s.running), (1, 1, 0));
    }

    #[test]
    fn outcomes_are_counted_by_kind() {
        let shared = shared(4);
        let mut receivers = Vec::new();
        for id in 1..=3 {
            let (job, rx) = queued(id);
            shared.queue.push(job).unwrap();
            receivers.push(rx);
        }
        shared.queue.close();
        worker_loop(&shared, |job| match job.id {
            1 => Ok(()),
            2 => Err(Error::Cancelled),
            _ => Err(Error::model("missing")),
        });
        let s = shared.queue.stats();
        assert_eq!((s.completed, s.cancelled, s.failed), (1, 1, 1));
        let last = drain(&mut receivers[2]).pop();
        assert!(matches!(last, Some(JobEvent::Failed(Error::Model(_)))));
    }

    #[test]
    fn a_job_whose_receiver_is_gone_is_skipped() {
        let shared = shared(4);
        let (gone, rx) = queued(1);
        drop(rx);
        shared.queue.push(gone).unwrap();
        shared.queue.close();
        let mut ran = 0;
        worker_loop(&shared, |_| {
            ran += 1;
            Ok(())
        });
        assert_eq!(ran, 0);
        assert_eq!(shared.queue.stats().cancelled, 1);
    }

    #[test]
    fn limits_name_the_field() {
        let limits = JobLimits {
            max_images: 4,
            max_steps: 50,
            max_pixels: 512 * 512,
        };
        let mut req = GenerationRequest::new("p");
        assert!(limits.check(&req).is_ok());
        req.num_images = 5;
        let e = limits.check(&req).unwrap_err().to_string();
        assert!(e.contains("`num_images` must be <= 4. Given: 5"), "{e}");
        req.num_images = 1;
        req.width = 1024;
        let e = limits.check(&req).unwrap_err().to_string();
        assert!(e.contains("1024x512"), "{e}");
    }
}
