//! Running tasks: image inference, image upload and getResponse. Both transports use these;
//! results go to an [`Outbox`] (an HTTP response being collected, or a WebSocket session).
//!
//! Every task is recorded as a job under its `taskUUID` (dialect `runware`), which makes a
//! reused id a `conflictTaskUUID` and lets `getResponse` answer after the socket that started
//! the task is gone, or after a restart. Records keep image ids and links; base64 outputs are
//! rebuilt from the stored files when fetched.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use image::RgbImage;
use serde_json::{json, Map, Value};

use super::control::IMAGE_CONTROLNET_PREPROCESS;
use super::error::{ErrorClass, RunwareError};
use super::session::{Session, TaskClaim};
use super::task::{
    Delivery, GetResponseTask, InferenceTask, OutputType, PreProcessOutput, Task, UploadTask,
    GET_RESPONSE, IMAGE_INFERENCE, IMAGE_UPLOAD,
};
use crate::api::media::{self, ImageFormat, ImageInput, MediaError};
use crate::api::output::{JobError, JobErrorKind, OutputSpec, Produced, Running};
use crate::api::AppState;
use crate::pipeline::request::InitImage;
use crate::pipeline::{ControlNetUnit, GenerationRequest, IpAdapterUnit, MaskImage, Outpaint};
use crate::store::{ImageId, JobRecord, JobStatus, StoreError};

/// The dialect name of Runware job records.
pub const DIALECT: &str = "runware";

/// How long `getResponse` waits for a running task to finish before answering "processing".
pub const GET_RESPONSE_WAIT: Duration = Duration::from_secs(20);

/// What a task answers: result items, or an error.
#[derive(Debug, Clone)]
pub enum Reply {
    Data(Vec<Value>),
    Error(RunwareError),
}

impl Reply {
    /// The message as sent on a WebSocket: `{"data": [...]}` or `{"errors": [...]}`.
    pub fn to_message(&self) -> String {
        match self {
            Reply::Data(items) => json!({ "data": items }).to_string(),
            Reply::Error(e) => e.to_body().to_string(),
        }
    }
}

/// Where a task's replies go.
pub trait Outbox: Send + Sync {
    fn send(&self, reply: Reply);
}

/// Collects replies for one HTTP response.
#[derive(Default)]
pub struct Collect(Mutex<Vec<Reply>>);

impl Collect {
    pub fn take(&self) -> Vec<Reply> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Outbox for Collect {
    fn send(&self, reply: Reply) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(reply);
    }
}

/// Drops replies: results of `async` tasks are fetched with getResponse.
struct Discard;

impl Outbox for Discard {
    fn send(&self, _: Reply) {}
}

impl Outbox for Session {
    fn send(&self, reply: Reply) {
        self.deliver(reply.to_message());
    }
}

/// Runs an imageInference, imageUpload or getResponse task to its end, sending its replies to
/// `outbox`. (Authentication and ping belong to the transport.)
pub async fn run(state: &AppState, task: Task, outbox: Arc<dyn Outbox>) {
    match task {
        Task::ImageInference(task) => inference(state, *task, outbox).await,
        Task::ImageUpload(task) => {
            let uuid = task.task_uuid.clone();
            match upload(state, task).await {
                Ok(item) => outbox.send(Reply::Data(vec![item])),
                Err(e) => outbox.send(Reply::Error(e.task(Some(IMAGE_UPLOAD), Some(&uuid)))),
            }
        }
        Task::GetResponse(task) => outbox.send(get_response(state, &task).await),
        Task::ControlNetPreProcess(task) => {
            let uuid = task.task.task_uuid.clone();
            match preprocess(state, task).await {
                Ok(item) => outbox.send(Reply::Data(vec![item])),
                Err(e) => outbox.send(Reply::Error(
                    e.task(Some(IMAGE_CONTROLNET_PREPROCESS), Some(&uuid)),
                )),
            }
        }
        Task::Authentication(_) | Task::Ping(_) => {}
    }
}

/// The acknowledgement of an `async` task, and the answer of getResponse while it runs.
fn processing(task_type: &str, task_uuid: &str) -> Value {
    json!({ "taskType": task_type, "taskUUID": task_uuid, "status": "processing" })
}

async fn inference(state: &AppState, task: InferenceTask, outbox: Arc<dyn Outbox>) {
    let uuid = task.task_uuid.clone();
    let delivery = task.delivery;
    let admitted = match Admitted::admit(state, task).await {
        Ok(admitted) => admitted,
        Err(e) => {
            outbox.send(Reply::Error(e.task(Some(IMAGE_INFERENCE), Some(&uuid))));
            return;
        }
    };
    match delivery {
        Delivery::Sync => admitted.finish(outbox).await,
        Delivery::Async => {
            outbox.send(Reply::Data(vec![processing(IMAGE_INFERENCE, &uuid)]));
            state.spawn_task(admitted.finish(Arc::new(Discard)));
        }
    }
}

/// An inference task in the engine, recorded under its `taskUUID`.
struct Admitted {
    state: AppState,
    running: Running,
    record: RecordGuard,
    task_uuid: String,
    output_types: Vec<OutputType>,
    upload_endpoint: Option<String>,
    /// Cost of one image, when the client asked for it.
    cost: Option<f64>,
    // Released last: the record is final by then.
    _claim: TaskClaim,
}

impl Admitted {
    async fn admit(state: &AppState, task: InferenceTask) -> Result<Self, RunwareError> {
        let claim = claim(state, &task.task_uuid).await?;
        let lcm = task.is_lcm();
        let mut request = task.request;
        if let Some(seed_image) = &task.seed_image {
            let image = load_image(state, "seedImage", seed_image).await?.to_rgb8();
            let mask = match &task.mask_image {
                Some(given) => Some(load_image(state, "maskImage", given).await?.to_luma8()),
                None => None,
            };
            let inputs = SeedInputs {
                image,
                mask,
                strength: task.strength,
                mask_margin: task.mask_margin,
                outpainting: task.outpainting,
            };
            fit_seed_image(&mut request, inputs).await?;
        }
        for spec in &task.controlnets {
            let image = load_image(state, "controlNet", &spec.guide_image)
                .await?
                .to_rgb8();
            request.controlnets.push(ControlNetUnit {
                scale: spec.weight,
                start: spec.start,
                end: spec.end,
                mode: spec.mode,
                condition: spec.condition,
                ..ControlNetUnit::new(spec.model.clone(), image)
            });
        }
        for spec in &task.ip_adapters {
            let image = load_image(state, "ipAdapters", &spec.guide_image)
                .await?
                .to_rgb8();
            request.ip_adapters.push(IpAdapterUnit {
                model: spec.model.clone(),
                image,
                weight: spec.weight,
            });
        }
        let cost = task.include_cost.then(|| {
            state.config().pricing.cost(
                &task.model.id,
                1,
                request.width,
                request.height,
                request.steps,
                lcm,
            )
        });
        let output = OutputSpec {
            format: task.output_format,
            quality: Some(task.output_quality),
            ttl: None,
        };
        let running = state
            .submit(&task.model.id, request, output)
            .map_err(RunwareError::from_job)?;
        let mut record = JobRecord::new(&task.task_uuid, DIALECT, task.record, None);
        record.status = JobStatus::Processing;
        let record = insert_record(state, record).await?;
        Ok(Admitted {
            state: state.clone(),
            running,
            record,
            task_uuid: task.task_uuid,
            output_types: task.output_types,
            upload_endpoint: task.upload_endpoint,
            cost,
            _claim: claim,
        })
    }

    /// Streams each image to `outbox` as soon as it is stored, then records the outcome.
    async fn finish(mut self, outbox: Arc<dyn Outbox>) {
        let mut items = Vec::new();
        let outcome = loop {
            match self.running.next_image().await {
                Ok(Some(image)) => {
                    if let Err(e) = self.upload(&image).await {
                        break Err(e);
                    }
                    let item = self.item(&image);
                    let sent = render(
                        item.clone(),
                        &self.output_types,
                        &image.url,
                        image.format,
                        &image.bytes,
                    );
                    outbox.send(Reply::Data(vec![sent]));
                    items.push(item);
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(RunwareError::from_job(e)),
            }
        };
        match outcome {
            Ok(()) => {
                let types: Vec<&str> = self.output_types.iter().map(|t| t.name()).collect();
                let result = json!({ "outputType": types, "items": items });
                self.record.succeed(result).await;
            }
            Err(e) => {
                let e = e.task(Some(IMAGE_INFERENCE), Some(&self.task_uuid));
                self.record.fail(&e).await;
                outbox.send(Reply::Error(e));
            }
        }
    }

    /// PUTs the image to `uploadEndpoint`, when one was given.
    async fn upload(&self, image: &Produced) -> Result<(), RunwareError> {
        let Some(url) = &self.upload_endpoint else {
            return Ok(());
        };
        media::send(
            reqwest::Method::PUT,
            url,
            image.format.content_type(),
            image.bytes.to_vec(),
            self.state.media(),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            RunwareError::new(
                "uploadFailed",
                format!(
                    "uploading image {} to `uploadEndpoint` failed: {e}",
                    image.id
                ),
            )
            .parameter("uploadEndpoint")
        })
    }

    /// The result item as recorded: the image's id, no link or data (those are rendered when
    /// the item is sent, so a link follows the server's current address).
    fn item(&self, image: &Produced) -> Value {
        let mut item = json!({
            "taskType": IMAGE_INFERENCE,
            "taskUUID": self.task_uuid,
            "imageUUID": image.id.to_string(),
            "seed": image.seed,
        });
        if let Some(cost) = self.cost {
            item["cost"] = json!(cost);
        }
        item
    }
}

impl OutputType {
    pub fn name(self) -> &'static str {
        match self {
            OutputType::Url => "URL",
            OutputType::Base64Data => "base64Data",
            OutputType::DataUri => "dataURI",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "URL" => Some(OutputType::Url),
            "base64Data" => Some(OutputType::Base64Data),
            "dataURI" => Some(OutputType::DataUri),
            _ => None,
        }
    }
}

/// Whether any output type carries the image's bytes.
fn wants_data(types: &[OutputType]) -> bool {
    types
        .iter()
        .any(|t| matches!(t, OutputType::Base64Data | OutputType::DataUri))
}

/// Adds `imageURL`, `imageBase64Data` and `imageDataURI` as the output types ask.
fn render(
    mut item: Value,
    types: &[OutputType],
    url: &str,
    format: ImageFormat,
    bytes: &[u8],
) -> Value {
    if types.contains(&OutputType::Url) {
        item["imageURL"] = json!(url);
    }
    if !wants_data(types) {
        return item;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    if types.contains(&OutputType::DataUri) {
        item["imageDataURI"] = json!(format!("data:{};base64,{encoded}", format.content_type()));
    }
    if types.contains(&OutputType::Base64Data) {
        item["imageBase64Data"] = json!(encoded);
    }
    item
}

/// Holds `task_uuid` for this task: refused when it runs already or was recorded before.
async fn claim(state: &AppState, task_uuid: &str) -> Result<TaskClaim, RunwareError> {
    let claim = state
        .runware_sessions()
        .claim_task(task_uuid)
        .ok_or_else(|| RunwareError::conflict(task_uuid))?;
    if find_record(state, task_uuid).await?.is_some() {
        return Err(RunwareError::conflict(task_uuid));
    }
    Ok(claim)
}

/// The job record of `task_uuid`, if a Runware task made one.
async fn find_record(state: &AppState, task_uuid: &str) -> Result<Option<JobRecord>, RunwareError> {
    let store = state.store().clone();
    let id = task_uuid.to_string();
    let found = tokio::task::spawn_blocking(move || store.get_job(&id))
        .await
        .map_err(|e| store_failed(&e.to_string()))?
        .map_err(|e| store_failed(&e.to_string()))?;
    // Ids are unique across dialects: another dialect's job still takes the id.
    Ok(found)
}

async fn insert_record(state: &AppState, record: JobRecord) -> Result<RecordGuard, RunwareError> {
    let store = state.store().clone();
    let id = record.id.clone();
    let inserted = tokio::task::spawn_blocking(move || store.insert_job(&record))
        .await
        .map_err(|e| store_failed(&e.to_string()))?;
    match inserted {
        Ok(()) => Ok(RecordGuard {
            state: state.clone(),
            id,
            settled: false,
        }),
        Err(StoreError::DuplicateJob(_)) => Err(RunwareError::conflict(&id)),
        Err(e) => Err(store_failed(&e.to_string())),
    }
}

fn store_failed(detail: &str) -> RunwareError {
    tracing::error!("runware job store: {detail}");
    RunwareError::from_job(JobError::new(
        JobErrorKind::Failed,
        format!("recording the task failed on the server: {detail}"),
    ))
}

/// A job record in progress. Dropped before it is settled (an HTTP client went away, and the
/// task with it), it records the task as cancelled.
struct RecordGuard {
    state: AppState,
    id: String,
    settled: bool,
}

impl RecordGuard {
    async fn succeed(&mut self, result: Value) {
        self.settled = true;
        let store = self.state.store().clone();
        let id = self.id.clone();
        let written =
            tokio::task::spawn_blocking(move || store.update_job_result(&id, &result)).await;
        if !matches!(written, Ok(Ok(true))) {
            tracing::error!(
                "recording the result of task {} failed: {written:?}",
                self.id
            );
        }
    }

    async fn fail(&mut self, error: &RunwareError) {
        self.settled = true;
        let store = self.state.store().clone();
        let id = self.id.clone();
        let text = serde_json::to_string(error).unwrap_or_else(|_| error.message.clone());
        let written = tokio::task::spawn_blocking(move || store.update_job_error(&id, &text)).await;
        if !matches!(written, Ok(Ok(true))) {
            tracing::error!(
                "recording the failure of task {} failed: {written:?}",
                self.id
            );
        }
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let error = RunwareError::from_job(JobError::new(
            JobErrorKind::Cancelled,
            "the task was cancelled: its HTTP client disconnected before the images were made",
        ))
        .task(Some(IMAGE_INFERENCE), Some(&self.id));
        let text = serde_json::to_string(&error).unwrap_or_default();
        let store = self.state.store().clone();
        let id = std::mem::take(&mut self.id);
        let write = move || {
            if let Err(e) = store.update_job_error(&id, &text) {
                tracing::error!("recording the cancellation of task {id} failed: {e}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(write);
            }
            Err(_) => write(),
        }
    }
}

/// An image a task names: a stored image's UUID, a data URI, base64 data or a URL.
async fn load_image(
    state: &AppState,
    field: &str,
    given: &str,
) -> Result<image::DynamicImage, RunwareError> {
    let image = if uuid::Uuid::parse_str(given.trim()).is_ok() {
        let store = state.store().clone();
        let id = given.trim().to_string();
        let found = tokio::task::spawn_blocking(move || store.image(&id))
            .await
            .map_err(|e| store_failed(&e.to_string()))?
            .map_err(|e| store_failed(&e.to_string()))?;
        let Some(stored) = found else {
            return Err(RunwareError::invalid(
                field,
                format!(
                    "`{field}` {given} is not the UUID of an uploaded or generated image on \
                     this server"
                ),
            ));
        };
        let bytes = tokio::fs::read(&stored.path)
            .await
            .map_err(|e| store_failed(&format!("reading {}: {e}", stored.path.display())))?;
        let limits = state.media().clone();
        tokio::task::spawn_blocking(move || media::decode_bytes(&bytes, &limits))
            .await
            .map_err(|e| store_failed(&e.to_string()))?
    } else {
        media::load_image(ImageInput::from_client_string(given), state.media()).await
    };
    image.map_err(|e| media_error(field, e))
}

/// The images and settings an image-conditioned task brings.
struct SeedInputs {
    image: RgbImage,
    mask: Option<image::GrayImage>,
    strength: f64,
    mask_margin: Option<u32>,
    outpainting: Option<Outpaint>,
}

/// Puts the seed image (and mask) on the request. img2img and inpainting resize the seed image
/// to `width` x `height` (the pipeline resizes the mask with it); outpainting keeps it as it is,
/// so its size plus the extension must be `width` x `height`. A mask must have the seed image's
/// size: Runware masks are drawn on the seed image, so another size is a client mistake.
async fn fit_seed_image(
    request: &mut GenerationRequest,
    inputs: SeedInputs,
) -> Result<(), RunwareError> {
    let SeedInputs {
        image,
        mask,
        strength,
        mask_margin,
        outpainting,
    } = inputs;
    let (iw, ih) = image.dimensions();
    if let Some(mask) = &mask {
        let (mw, mh) = mask.dimensions();
        if (mw, mh) != (iw, ih) {
            return Err(RunwareError::invalid(
                "maskImage",
                format!(
                    "`maskImage` must be the size of `seedImage` ({iw}x{ih}). Given: {mw}x{mh}"
                ),
            ));
        }
    }
    let (w, h) = (request.width as u32, request.height as u32);
    if let Some(outpaint) = &outpainting {
        let (ow, oh) = outpaint.output_size(iw, ih);
        if (ow, oh) != (w, h) {
            return Err(RunwareError::invalid(
                "outpainting",
                format!(
                    "`width` and `height` must be the `seedImage` size ({iw}x{ih}) plus the \
                     `outpainting` extension: {ow}x{oh}. Given: {w}x{h}"
                ),
            ));
        }
        if outpaint.blur > iw.min(ih) / 2 {
            return Err(RunwareError::invalid(
                "outpainting",
                format!(
                    "`outpainting.blur` must be at most half the `seedImage`'s smaller side ({}). \
                     Given: {}",
                    iw.min(ih) / 2,
                    outpaint.blur
                ),
            ));
        }
    }
    let image = if outpainting.is_some() || mask.is_some() {
        image
    } else {
        tokio::task::spawn_blocking(move || {
            if image.dimensions() == (w, h) {
                image
            } else {
                image::imageops::resize(&image, w, h, image::imageops::FilterType::Lanczos3)
            }
        })
        .await
        .map_err(|e| store_failed(&e.to_string()))?
    };
    request.init_image = Some(InitImage { image, strength });
    request.mask = mask.map(|image| MaskImage {
        image,
        margin: mask_margin,
    });
    request.outpaint = outpainting;
    Ok(())
}

fn media_error(field: &str, e: MediaError) -> RunwareError {
    RunwareError::invalid(field, format!("`{field}` could not be used: {e}"))
}

/// Stores an uploaded image (as PNG) and records the upload under its `taskUUID`.
async fn upload(state: &AppState, task: UploadTask) -> Result<Value, RunwareError> {
    let _claim = claim(state, &task.task_uuid).await?;
    let image = media::load_image(ImageInput::from_client_string(task.image), state.media())
        .await
        .map_err(|e| media_error("image", e))?;
    let (id, _) = state
        .store_image(image, OutputSpec::default())
        .await
        .map_err(RunwareError::from_job)?;
    let item = json!({
        "taskType": IMAGE_UPLOAD,
        "taskUUID": task.task_uuid,
        "imageUUID": id.to_string(),
    });
    let mut record = JobRecord::new(
        &task.task_uuid,
        DIALECT,
        json!({ "taskType": IMAGE_UPLOAD, "taskUUID": task.task_uuid }),
        None,
    );
    record.status = JobStatus::Success;
    record.result_json = Some(json!({ "outputType": ["URL"], "items": [item] }));
    let mut guard = insert_record(state, record).await?;
    guard.settled = true;
    let url = state.image_url(id, ImageFormat::Png);
    Ok(render(
        item,
        &[OutputType::Url],
        &url,
        ImageFormat::Png,
        &[],
    ))
}

/// Runs an `imageControlNetPreProcess` task: the input image's guide image (Canny edges),
/// stored like an upload so its `guideImageUUID` can be a later `controlNet.guideImage`.
async fn preprocess(state: &AppState, task: PreProcessOutput) -> Result<Value, RunwareError> {
    let PreProcessOutput {
        task,
        output_types,
        output_format,
    } = task;
    let _claim = claim(state, &task.task_uuid).await?;
    let input = load_image(state, "inputImage", &task.input_image)
        .await?
        .to_rgb8();
    let input = match task.size {
        Some((w, h)) if input.dimensions() != (w, h) => tokio::task::spawn_blocking(move || {
            image::imageops::resize(&input, w, h, image::imageops::FilterType::Lanczos3)
        })
        .await
        .map_err(|e| store_failed(&e.to_string()))?,
        _ => input,
    };
    let guide = state
        .run_preprocessor("preProcessorType", task.preprocessor, input)
        .await
        .map_err(RunwareError::from_job)?;
    let output = OutputSpec {
        format: output_format,
        ..OutputSpec::default()
    };
    let (id, bytes) = state
        .store_image(image::DynamicImage::ImageRgb8(guide), output)
        .await
        .map_err(RunwareError::from_job)?;
    let mut item = json!({
        "taskType": IMAGE_CONTROLNET_PREPROCESS,
        "taskUUID": task.task_uuid,
        "guideImageUUID": id.to_string(),
    });
    if uuid::Uuid::parse_str(task.input_image.trim()).is_ok() {
        item["inputImageUUID"] = json!(task.input_image.trim());
    }
    let mut record = JobRecord::new(
        &task.task_uuid,
        DIALECT,
        json!({ "taskType": IMAGE_CONTROLNET_PREPROCESS, "taskUUID": task.task_uuid }),
        None,
    );
    record.status = JobStatus::Success;
    record.result_json = Some(json!({ "outputType": ["URL"], "items": [item.clone()] }));
    let mut guard = insert_record(state, record).await?;
    guard.settled = true;
    let url = state.image_url(id, output_format);
    // The image fields of a guide image carry a `guide` prefix (`guideImageURL`, ...).
    let rendered = render(item, &output_types, &url, output_format, &bytes);
    let renamed = match rendered {
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("image") {
                Some(rest) => (format!("guideImage{rest}"), v),
                None => (k, v),
            })
            .collect::<Map<String, Value>>(),
        other => return Ok(other),
    };
    Ok(Value::Object(renamed))
}

/// The results of an earlier task: its items with `status: "success"`, its error, or (while it
/// still runs after a short wait) one `status: "processing"` item.
async fn get_response(state: &AppState, task: &GetResponseTask) -> Reply {
    let uuid = task.task_uuid.as_str();
    let sessions = state.runware_sessions();
    if sessions.is_running(uuid) {
        let _ = tokio::time::timeout(GET_RESPONSE_WAIT, sessions.wait_for_task(uuid)).await;
    }
    let scope = |e: RunwareError| Reply::Error(e.task(Some(GET_RESPONSE), Some(uuid)));
    let record = match find_record(state, uuid).await {
        Ok(Some(record)) if record.dialect == DIALECT => record,
        Ok(_) if sessions.is_running(uuid) => {
            return Reply::Data(vec![processing(IMAGE_INFERENCE, uuid)])
        }
        Ok(_) => {
            return scope(
                RunwareError::new(
                    "taskNotFound",
                    format!("no task with taskUUID {uuid} was run on this server"),
                )
                .parameter("taskUUID")
                .class(ErrorClass::NotFound),
            )
        }
        Err(e) => return scope(e),
    };
    let task_type = record
        .request_json
        .get("taskType")
        .and_then(Value::as_str)
        .unwrap_or(IMAGE_INFERENCE)
        .to_string();
    match record.status {
        JobStatus::Success => {
            let result = record.result_json.unwrap_or(Value::Null);
            let types: Vec<OutputType> = result["outputType"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().and_then(OutputType::parse))
                        .collect()
                })
                .unwrap_or_default();
            let mut items = Vec::new();
            for item in result["items"].as_array().cloned().unwrap_or_default() {
                match with_stored_data(state, item, &types).await {
                    Ok(mut item) => {
                        item["status"] = json!("success");
                        items.push(item);
                    }
                    Err(e) => return scope(e),
                }
            }
            Reply::Data(items)
        }
        JobStatus::Error => {
            let text = record.error.unwrap_or_default();
            let error = serde_json::from_str::<RunwareError>(&text).unwrap_or_else(|_| {
                RunwareError::new("internalError", text).class(ErrorClass::Server)
            });
            Reply::Error(error.task(Some(&task_type), Some(uuid)))
        }
        JobStatus::Queued | JobStatus::Processing if sessions.is_running(uuid) => {
            Reply::Data(vec![processing(&task_type, uuid)])
        }
        JobStatus::Queued | JobStatus::Processing => Reply::Error(
            RunwareError::new(
                "taskCancelled",
                format!(
                    "task {uuid} did not finish: it was cancelled, or the server stopped, \
                     before its images were made"
                ),
            )
            .class(ErrorClass::Server)
            .task(Some(&task_type), Some(uuid)),
        ),
    }
}

/// A recorded item rendered for its output types from the stored image.
async fn with_stored_data(
    state: &AppState,
    item: Value,
    types: &[OutputType],
) -> Result<Value, RunwareError> {
    let Some(id) = item
        .get("imageUUID")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Ok(item);
    };
    let store = state.store().clone();
    let found = tokio::task::spawn_blocking(move || store.image(&id))
        .await
        .map_err(|e| store_failed(&e.to_string()))?
        .map_err(|e| store_failed(&e.to_string()))?;
    let Some(stored) = found else {
        return Err(RunwareError::new(
            "imageExpired",
            "the task's images are no longer stored on this server",
        ));
    };
    let bytes = if wants_data(types) {
        tokio::fs::read(&stored.path)
            .await
            .map_err(|e| store_failed(&format!("reading {}: {e}", stored.path.display())))?
    } else {
        Vec::new()
    };
    let url = match item
        .get("imageUUID")
        .and_then(Value::as_str)
        .and_then(ImageId::parse)
    {
        Some(id) => state.image_url(id, stored.format),
        None => String::new(),
    };
    Ok(render(item, types, &url, stored.format, &bytes))
}

/// `{taskType: "ping", pong: true}`, with the ping's taskUUID when it had one.
pub fn pong(task_uuid: Option<&str>) -> Value {
    let mut item = Map::new();
    item.insert("taskType".into(), json!("ping"));
    if let Some(uuid) = task_uuid {
        item.insert("taskUUID".into(), json!(uuid));
    }
    item.insert("pong".into(), json!(true));
    Value::Object(item)
}
