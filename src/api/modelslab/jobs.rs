//! The life of an admitted ModelsLab request: its integer id and job record, waiting for the
//! images up to `modelslab.wait_secs` (then answering "processing" while the job goes on in the
//! background), the record that `fetch` reads (also after a restart), and the webhook call.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde_json::{json, Value};

use super::{error_body, Family};
use crate::api::media::{self, ImageFormat};
use crate::api::output::{JobError, JobErrorKind, Produced, Running};
use crate::api::AppState;
use crate::store::{ImageId, JobRecord, JobStatus, StoreError, TEMP_LINK_TTL};

/// The `dialect` of this API's job records.
pub const DIALECT: &str = "modelslab";

/// Requests of this process that are still running, by store and id. A record left
/// "processing" by a server that stopped without finishing it is not in here.
static LIVE: Mutex<BTreeSet<(usize, u64)>> = Mutex::new(BTreeSet::new());

fn live_key(state: &AppState, id: u64) -> (usize, u64) {
    (Arc::as_ptr(state.store()) as usize, id)
}

fn set_live(state: &AppState, id: u64, live: bool) {
    let mut set = LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if live {
        set.insert(live_key(state, id));
    } else {
        set.remove(&live_key(state, id));
    }
}

fn is_live(state: &AppState, id: u64) -> bool {
    LIVE.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .contains(&live_key(state, id))
}

/// An admitted request and what its answer needs.
pub struct Job {
    pub state: AppState,
    pub id: u64,
    pub family: Family,
    /// The effective parameters; `meta.base64` decides how images are returned.
    pub meta: Value,
    pub webhook: Option<String>,
    pub track_id: Value,
    pub started: Instant,
}

/// Records a new request under a fresh integer id (random, below 2^31 so that every client's
/// integer type holds it) and returns the id.
pub async fn create(state: &AppState, meta: &Value, temp: bool) -> Result<u64, JobError> {
    use rand::Rng as _;
    let expires_at = temp.then(|| SystemTime::now() + TEMP_LINK_TTL);
    for _ in 0..8 {
        let id: u64 = rand::rng().random_range(1..=i32::MAX as u64);
        let mut record = JobRecord::new(id.to_string(), DIALECT, meta.clone(), expires_at);
        record.status = JobStatus::Processing;
        let store = state.store().clone();
        match tokio::task::spawn_blocking(move || store.insert_job(&record)).await {
            Ok(Ok(())) => {
                set_live(state, id, true);
                return Ok(id);
            }
            Ok(Err(StoreError::DuplicateJob(_))) => continue,
            Ok(Err(e)) => {
                tracing::error!("recording a ModelsLab request failed: {e}");
                return Err(JobError::new(
                    JobErrorKind::Failed,
                    format!("recording the request failed: {e}"),
                ));
            }
            Err(e) => {
                return Err(JobError::new(
                    JobErrorKind::Failed,
                    format!("recording the request failed: {e}"),
                ))
            }
        }
    }
    Err(JobError::new(
        JobErrorKind::Failed,
        "no free request id was found; try again",
    ))
}

type Work = Pin<Box<dyn Future<Output = Result<Value, JobError>> + Send>>;

/// A job's completion while its request waits for it. Dropped before it finished (the client
/// went away): with a webhook the job goes on in the background; without one it is cancelled
/// and recorded as such.
struct Pending {
    job: Arc<Job>,
    work: Option<Work>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let job = self.job.clone();
        if job.webhook.is_some() {
            job.state.clone().spawn_task(async move {
                let _ = work.await;
            });
        } else {
            drop(work);
            job.state.clone().spawn_task(async move {
                record_error(
                    &job,
                    "cancelled: the client disconnected before the images were ready",
                )
                .await;
            });
        }
    }
}

/// Waits up to `wait` for the images: the success (or error) body, else the "processing" body
/// while the job finishes in the background.
pub async fn respond(job: Arc<Job>, running: Running, wait: Duration) -> Value {
    let mut pending = Pending {
        job: job.clone(),
        work: Some(Box::pin(complete(job.clone(), running))),
    };
    let finished = {
        let work = pending.work.as_mut().expect("set above; this is a bug");
        tokio::select! {
            biased;
            out = work => Some(out),
            () = tokio::time::sleep(wait) => None,
        }
    };
    match finished {
        Some(out) => {
            pending.work = None;
            out.unwrap_or_else(|e| job_error_body(job.id, &e.message))
        }
        None => {
            let work = pending.work.take().expect("not finished; this is a bug");
            job.state.spawn_task(async move {
                let _ = work.await;
            });
            let eta = job.started.elapsed().as_secs_f64().max(1.0);
            processing_body(
                &job.state,
                job.family,
                job.id,
                &job.meta,
                eta,
                "Try to fetch request after given estimated time",
            )
        }
    }
}

/// Collects the images, records the result, calls the webhook; the body for the client.
async fn complete(job: Arc<Job>, running: Running) -> Result<Value, JobError> {
    let outcome = running.collect().await;
    let result = match outcome {
        Ok(images) => {
            let files: Vec<String> = images.iter().map(|p| p.id.file_name(p.format)).collect();
            let urls: Vec<String> = images.iter().map(|p| p.url.clone()).collect();
            let record = json!({
                "status": "success",
                "generationTime": job.started.elapsed().as_secs_f64(),
                "id": job.id,
                "output": urls,
                "proxy_links": urls,
                "nsfw_content_detected": false,
                "meta": job.meta,
                "image_files": files,
            });
            let store = job.state.store().clone();
            let key = job.id.to_string();
            let saved = record.clone();
            match tokio::task::spawn_blocking(move || store.update_job_result(&key, &saved)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!("recording ModelsLab result {}: {e}", job.id),
                Err(e) => tracing::error!("recording ModelsLab result {}: {e}", job.id),
            }
            set_live(&job.state, job.id, false);
            render_success(&job.state, &record, Some(&images)).await
        }
        Err(e) => {
            record_error(&job, &e.message).await;
            Err(e)
        }
    };
    if let Some(url) = &job.webhook {
        let body = match &result {
            Ok(body) => body.clone(),
            Err(e) => job_error_body(job.id, &e.message),
        };
        call_webhook(&job.state, url.clone(), body, job.track_id.clone());
    }
    result
}

async fn record_error(job: &Job, message: &str) {
    let store = job.state.store().clone();
    let key = job.id.to_string();
    let text = message.to_string();
    match tokio::task::spawn_blocking(move || store.update_job_error(&key, &text)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("recording ModelsLab error {}: {e}", job.id),
        Err(e) => tracing::error!("recording ModelsLab error {}: {e}", job.id),
    }
    set_live(&job.state, job.id, false);
}

/// POSTs the final body, with `track_id`, to the client's webhook in the background; a failure
/// is logged.
fn call_webhook(state: &AppState, url: String, mut body: Value, track_id: Value) {
    if let Some(map) = body.as_object_mut() {
        map.insert("track_id".into(), track_id);
    }
    let payload = body.to_string().into_bytes();
    let task_state = state.clone();
    state.spawn_task(async move {
        let sent = media::send(
            reqwest::Method::POST,
            &url,
            "application/json",
            payload,
            task_state.media(),
        )
        .await;
        match sent {
            Ok(status) => tracing::debug!("webhook {url} answered {status}"),
            Err(e) => tracing::warn!("webhook {url} failed: {e}"),
        }
    });
}

/// The success body from a recorded result: links rebuilt on this server's base URL, or the
/// images as base64 when the request asked for it (from `produced`, else read from the store).
async fn render_success(
    state: &AppState,
    record: &Value,
    produced: Option<&[Produced]>,
) -> Result<Value, JobError> {
    let files: Vec<(ImageId, ImageFormat)> = record["image_files"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().and_then(ImageId::parse_file_name))
                .collect()
        })
        .unwrap_or_default();
    let urls: Vec<Value> = files
        .iter()
        .map(|&(id, format)| Value::String(state.image_url(id, format)))
        .collect();
    let output = if record["meta"]["base64"] == "yes" {
        let engine = base64::engine::general_purpose::STANDARD;
        match produced {
            Some(images) => images
                .iter()
                .map(|p| Value::String(engine.encode(p.bytes.as_slice())))
                .collect(),
            None => {
                let mut encoded = Vec::with_capacity(files.len());
                for &(id, _) in &files {
                    encoded.push(Value::String(engine.encode(read_image(state, id).await?)));
                }
                encoded
            }
        }
    } else {
        urls.clone()
    };
    let mut body = record.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("image_files");
        map.insert("status".into(), json!("success"));
        map.insert("output".into(), Value::Array(output));
        map.insert("proxy_links".into(), Value::Array(urls));
    }
    Ok(body)
}

async fn read_image(state: &AppState, id: ImageId) -> Result<Vec<u8>, JobError> {
    let expired = || {
        JobError::new(
            JobErrorKind::Failed,
            "the images of this request are no longer stored",
        )
    };
    let store = state.store().clone();
    let stored = tokio::task::spawn_blocking(move || store.image_by_id(id))
        .await
        .map_err(|e| JobError::new(JobErrorKind::Failed, format!("reading an image: {e}")))?
        .map_err(|e| JobError::new(JobErrorKind::Failed, format!("reading an image: {e}")))?
        .ok_or_else(expired)?;
    tokio::fs::read(&stored.path).await.map_err(|_| expired())
}

/// `status: "processing"`: where and when to fetch the result.
fn processing_body(
    state: &AppState,
    family: Family,
    id: u64,
    meta: &Value,
    eta: f64,
    message: &str,
) -> Value {
    let fetch = family.fetch_url(state, id);
    json!({
        "status": "processing",
        "tip": format!("Your request is processing in the background; fetch the result from {fetch}"),
        "eta": eta,
        "messege": message,
        "message": message,
        "fetch_result": fetch,
        "id": id,
        "output": [],
        "future_links": [],
        "meta": meta,
    })
}

/// A request that was admitted and then failed.
fn job_error_body(id: u64, message: &str) -> Value {
    let mut body = error_body(message);
    if let Some(map) = body.as_object_mut() {
        map.insert("id".into(), json!(id));
        map.insert("output".into(), json!([]));
    }
    body
}

/// The body `fetch` answers for request `id`.
pub async fn fetch(state: &AppState, family: Family, id: &str) -> Value {
    let not_found = || error_body(&format!("Request not found: no request with id {id:?}"));
    let Ok(num) = id.trim().parse::<u64>() else {
        return not_found();
    };
    let store = state.store().clone();
    let key = num.to_string();
    let record = match tokio::task::spawn_blocking(move || store.get_job(&key)).await {
        Ok(Ok(record)) => record,
        Ok(Err(e)) => {
            tracing::error!("looking up ModelsLab request {num}: {e}");
            return error_body("looking up the request failed on the server");
        }
        Err(e) => {
            tracing::error!("looking up ModelsLab request {num}: {e}");
            return error_body("looking up the request failed on the server");
        }
    };
    let Some(record) = record.filter(|r| r.dialect == DIALECT) else {
        return not_found();
    };
    match record.status {
        JobStatus::Success => match &record.result_json {
            Some(result) => render_success(state, result, None)
                .await
                .unwrap_or_else(|e| job_error_body(num, &e.message)),
            None => job_error_body(num, "the result of this request was not recorded"),
        },
        JobStatus::Error => {
            job_error_body(num, record.error.as_deref().unwrap_or("the request failed"))
        }
        JobStatus::Queued | JobStatus::Processing if is_live(state, num) => {
            let eta = SystemTime::now()
                .duration_since(record.created_at)
                .map_or(1.0, |d| d.as_secs_f64().max(1.0));
            processing_body(
                state,
                family,
                num,
                &record.request_json,
                eta,
                "Request is still processing; try again after the estimated time",
            )
        }
        JobStatus::Queued | JobStatus::Processing => job_error_body(
            num,
            "the request was interrupted when the server restarted; send it again",
        ),
    }
}
