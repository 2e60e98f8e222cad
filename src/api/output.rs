//! What every dialect does with a canonical request: admit it into the engine, then turn each
//! generated image into a stored file with a stable URL before the dialect reports it.
//!
//! [`AppState::submit`] admits at once or fails with a [`JobError`] (busy, shutting down, bad
//! request, unknown model); [`Running::next_image`] yields each image after it has been encoded
//! and written to the store. Dropping a [`Running`] cancels its job: an HTTP handler whose client
//! went away is dropped by the server, and the engine stops the job between denoising steps.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use image::DynamicImage;

use super::media::{encode_image, ImageFormat};
use super::AppState;
use crate::engine::{Job, JobEvent, JobHandle, SubmitError};
use crate::pipeline::GenerationRequest;
use crate::registry::ModelEntry;
use crate::store::ImageId;
use crate::Error;

/// Why a job did not produce its images, sorted so each dialect can pick its own code and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobErrorKind {
    /// The queue is full: try again later.
    Busy,
    /// The server is stopping and admits nothing new.
    ShuttingDown,
    /// A request value outside the limits (the message names the field and the limit).
    Invalid,
    /// A model id the registry does not know.
    UnknownModel,
    /// A parameter this server cannot honour yet; never silently ignored.
    NotSupported,
    /// The job was cancelled before it finished.
    Cancelled,
    /// The job failed on the server's side (model files, device, a bug); details are logged.
    Failed,
}

/// A dialect-neutral error with a message for the client and, where one field is to blame, its
/// name as the dialect spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub kind: JobErrorKind,
    pub message: String,
    pub parameter: Option<String>,
}

impl JobError {
    pub fn new(kind: JobErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            parameter: None,
        }
    }

    pub fn invalid(parameter: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: JobErrorKind::Invalid,
            message: message.into(),
            parameter: Some(parameter.into()),
        }
    }

    /// `parameter` asks for something the engine cannot do yet.
    pub fn not_supported(parameter: impl Into<String>, what: &str) -> Self {
        let parameter = parameter.into();
        Self {
            kind: JobErrorKind::NotSupported,
            message: format!("`{parameter}` is not supported yet by this server: {what}"),
            parameter: Some(parameter),
        }
    }

    pub fn with_parameter(mut self, parameter: impl Into<String>) -> Self {
        self.parameter = Some(parameter.into());
        self
    }

    /// An engine or pipeline error as the client should see it. Server-side faults are logged
    /// in full and reported without internals.
    pub fn from_engine(e: Error) -> Self {
        match e {
            Error::InvalidRequest(m) | Error::Scheduler(m) => Self::new(JobErrorKind::Invalid, m),
            Error::UnknownModel(m) => Self::new(JobErrorKind::UnknownModel, m),
            Error::Cancelled => Self::new(JobErrorKind::Cancelled, "the job was cancelled"),
            other => {
                tracing::error!("generation failed: {other}");
                Self::new(
                    JobErrorKind::Failed,
                    format!("generation failed on the server: {other}"),
                )
            }
        }
    }

    fn from_submit(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => Self::new(JobErrorKind::Busy, e.to_string()),
            SubmitError::ShuttingDown => Self::new(JobErrorKind::ShuttingDown, e.to_string()),
            SubmitError::Invalid(e) => Self::from_engine(e),
        }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobError {}

/// How generated images are written: format, quality, and how long they are kept (`None`:
/// until an operator removes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSpec {
    pub format: ImageFormat,
    /// JPEG quality 1..=100; PNG and WebP are lossless and ignore it.
    pub quality: Option<u8>,
    pub ttl: Option<Duration>,
}

impl Default for OutputSpec {
    fn default() -> Self {
        Self {
            format: ImageFormat::Png,
            quality: None,
            ttl: None,
        }
    }
}

/// One generated image, already stored.
#[derive(Debug, Clone)]
pub struct Produced {
    /// Position in the request, 0-based.
    pub index: usize,
    pub seed: u64,
    pub id: ImageId,
    pub format: ImageFormat,
    /// Stable link to the stored file.
    pub url: String,
    /// The encoded file, for dialects answering with bytes or base64.
    pub bytes: Arc<Vec<u8>>,
}

/// An admitted job. Dropping it cancels the job.
#[derive(Debug)]
pub struct Running {
    handle: JobHandle,
    state: AppState,
    output: OutputSpec,
    expected: usize,
    produced: usize,
    finished: bool,
}

impl AppState {
    /// The registry entry for a model id or alias as a client names it (never a path).
    pub fn model_entry(&self, model: &str) -> Result<ModelEntry, JobError> {
        self.registry().resolve_id(model).map_err(|_| {
            let known: Vec<&str> = self.registry().models().map(|m| m.id.as_str()).collect();
            JobError::new(
                JobErrorKind::UnknownModel,
                format!(
                    "model `{model}` is not available on this server. Available: {}",
                    known.join(", ")
                ),
            )
        })
    }

    /// The LoRAs a client named for `model`, as (registry id, weight) pairs: each a registered id
    /// or alias (never a path), of the model's family; `None` takes the LoRA's default weight.
    /// Errors name `field`.
    pub fn lora_set(
        &self,
        field: &str,
        model: &ModelEntry,
        requested: &[(String, Option<f64>)],
    ) -> Result<Vec<(String, f64)>, JobError> {
        requested
            .iter()
            .map(|(name, weight)| {
                let lora = self
                    .registry()
                    .resolve_lora(name)
                    .map_err(|e| JobError::invalid(field, format!("`{field}`: {e}")))?;
                if let Some(family) = model.family.filter(|f| *f != lora.family) {
                    return Err(JobError::invalid(
                        field,
                        format!(
                            "`{field}`: LoRA `{name}` is for {} models, but model `{}` is {family}",
                            lora.family, model.id
                        ),
                    ));
                }
                Ok((lora.id, weight.unwrap_or(lora.default_weight)))
            })
            .collect()
    }

    /// The registry id of the VAE a client named for `model`: a registered id or alias (never a
    /// path) for the model's latent space (see [`crate::registry::VaeEntry::fits`]). Errors
    /// name `field`.
    pub fn vae_for(&self, field: &str, model: &ModelEntry, name: &str) -> Result<String, JobError> {
        let vae = self
            .registry()
            .resolve_vae(name)
            .map_err(|e| JobError::invalid(field, format!("`{field}`: {e}")))?;
        if let Some(family) = model.family.filter(|f| !vae.fits(*f)) {
            return Err(JobError::invalid(
                field,
                format!(
                    "`{field}`: VAE `{name}` is for {} models, but model `{}` is {family}",
                    vae.family, model.id
                ),
            ));
        }
        Ok(vae.id)
    }

    /// The registry id of the IP-Adapter a client named for `model`: a registered id or alias
    /// (never a path) of the model's family. Errors name `field`.
    pub fn ip_adapter_for(
        &self,
        field: &str,
        model: &ModelEntry,
        name: &str,
    ) -> Result<String, JobError> {
        let entry = self
            .registry()
            .resolve_ip_adapter(name)
            .map_err(|e| JobError::invalid(field, format!("`{field}`: {e}")))?;
        if let Some(family) = model.family.filter(|f| *f != entry.family) {
            return Err(JobError::invalid(
                field,
                format!(
                    "`{field}`: IP-Adapter `{name}` is for {} models, but model `{}` is {family}",
                    entry.family, model.id
                ),
            ));
        }
        Ok(entry.id)
    }

    /// Resolves requested embeddings (registry id or alias, optional weight) for `model`: unknown
    /// ones and ones of another family are refused naming `field`; a missing weight is the
    /// embedding's `default_weight`.
    pub fn embedding_set(
        &self,
        field: &str,
        model: &ModelEntry,
        requested: &[(String, Option<f64>)],
    ) -> Result<Vec<(String, f64)>, JobError> {
        let mut out: Vec<(String, f64)> = Vec::with_capacity(requested.len());
        for (name, weight) in requested {
            let embedding = self
                .registry()
                .resolve_embedding(name)
                .map_err(|e| JobError::invalid(field, format!("`{field}`: {e}")))?;
            if let Some(family) = model.family.filter(|f| *f != embedding.family) {
                return Err(JobError::invalid(
                    field,
                    format!(
                        "`{field}`: embedding `{name}` is for {} models, but model `{}` is {family}",
                        embedding.family, model.id
                    ),
                ));
            }
            if out.iter().any(|(id, _)| *id == embedding.id) {
                return Err(JobError::invalid(
                    field,
                    format!("`{field}`: embedding `{name}` is listed twice"),
                ));
            }
            out.push((embedding.id, weight.unwrap_or(embedding.default_weight)));
        }
        Ok(out)
    }

    /// Admits a job for `model` (an id or alias) or refuses it at once.
    pub fn submit(
        &self,
        model: &str,
        request: GenerationRequest,
        output: OutputSpec,
    ) -> Result<Running, JobError> {
        let entry = self.model_entry(model)?;
        let expected = request.num_images;
        let handle = self
            .engine()
            .submit(Job {
                model: entry.id,
                request,
            })
            .map_err(JobError::from_submit)?;
        Ok(Running {
            handle,
            state: self.clone(),
            output,
            expected,
            produced: 0,
            finished: false,
        })
    }

    /// The stable link of a stored image.
    pub fn image_url(&self, id: ImageId, format: ImageFormat) -> String {
        format!("{}/images/{}", self.base_url(), id.file_name(format))
    }

    /// Encodes and stores an image (off the async runtime); the returned image is durable.
    pub async fn store_image(
        &self,
        image: DynamicImage,
        output: OutputSpec,
    ) -> Result<(ImageId, Arc<Vec<u8>>), JobError> {
        let store = self.store().clone();
        tokio::task::spawn_blocking(move || {
            let bytes = encode_image(&image, output.format, output.quality)
                .map_err(|e| JobError::new(JobErrorKind::Failed, e.to_string()))?;
            let expires_at = output.ttl.map(|ttl| SystemTime::now() + ttl);
            let id = store
                .put_image(&bytes, output.format, expires_at)
                .map_err(|e| {
                    tracing::error!("storing an image failed: {e}");
                    JobError::new(
                        JobErrorKind::Failed,
                        format!("storing the image failed: {e}"),
                    )
                })?;
            Ok((id, Arc::new(bytes)))
        })
        .await
        .map_err(|e| JobError::new(JobErrorKind::Failed, format!("storing the image: {e}")))?
    }
}

impl Running {
    /// The engine's id of this job.
    pub fn id(&self) -> u64 {
        self.handle.id()
    }

    /// How many images the job makes.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// The next image, stored; `Ok(None)` once all images are out.
    pub async fn next_image(&mut self) -> Result<Option<Produced>, JobError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            let event = self.handle.recv().await;
            match event {
                Some(JobEvent::Started) | Some(JobEvent::Progress { .. }) => continue,
                Some(JobEvent::Image { index, seed, image }) => {
                    let (id, bytes) = self
                        .state
                        .store_image(DynamicImage::ImageRgb8(image), self.output)
                        .await?;
                    self.produced += 1;
                    return Ok(Some(Produced {
                        index,
                        seed,
                        id,
                        format: self.output.format,
                        url: self.state.image_url(id, self.output.format),
                        bytes,
                    }));
                }
                Some(JobEvent::Finished) => {
                    self.finished = true;
                    if self.produced != self.expected {
                        return Err(JobError::new(
                            JobErrorKind::Failed,
                            format!(
                                "the job finished with {} of {} images",
                                self.produced, self.expected
                            ),
                        ));
                    }
                    return Ok(None);
                }
                Some(JobEvent::Failed(e)) => {
                    self.finished = true;
                    return Err(JobError::from_engine(e));
                }
                None => {
                    self.finished = true;
                    return Err(JobError::new(
                        JobErrorKind::Failed,
                        "the engine stopped before the job finished",
                    ));
                }
            }
        }
    }

    /// Every image of the job, in order.
    pub async fn collect(mut self) -> Result<Vec<Produced>, JobError> {
        let mut all = Vec::with_capacity(self.expected);
        while let Some(image) = self.next_image().await? {
            all.push(image);
        }
        all.sort_by_key(|p| p.index);
        Ok(all)
    }
}
