//! `POST /v1`: a task array over HTTP, answered once every task has finished.
//!
//! The key comes from an `authentication` task at the head of the array or from an
//! `Authorization: Bearer` header. The other tasks run concurrently; the answer holds every
//! result item under `data` and every failed task under `errors` (both when some tasks failed
//! and others did not). The status is 200 when anything succeeded, else that of the first error:
//! 400 for bad input, 401 for the key, 404 for getResponse of an unknown task, 409 for a reused
//! taskUUID, 429 when the queue is full,
//! 503 while shutting down, 500 for a server fault. A client that disconnects cancels its
//! inference tasks (except `deliveryMethod: "async"` ones, which run on).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use serde_json::{Map, Value};

use super::error::RunwareError;
use super::run::{self, Collect, Reply};
use super::task::{self, Task, AUTHENTICATION};
use crate::api::auth::bearer_token;
use crate::api::AppState;

pub(super) async fn post(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let error = RunwareError::invalid_json(format!(
                "the request body could not be read: {}",
                rejection.body_text()
            ));
            return (status, Json(error.to_body())).into_response();
        }
    };
    let tasks = match task::parse_payload(&body) {
        Ok(tasks) => tasks,
        Err(e) => return respond(vec![Reply::Error(e)]),
    };

    let leading_auth = tasks
        .first()
        .is_some_and(|t| task::task_ids(t).0 == Some(AUTHENTICATION));
    let key = if leading_auth {
        tasks[0].get("apiKey").and_then(Value::as_str)
    } else {
        bearer_token(&headers)
    };
    if let Err(e) = check_key(&state, key) {
        return respond(vec![Reply::Error(e)]);
    }

    let runs = tasks
        .iter()
        .skip(usize::from(leading_auth))
        .map(|value| run_one(&state, value));
    let replies = join_all(runs).await.into_iter().flatten().collect();
    respond(replies)
}

/// Accepts `key` or says why not (`missingApiKey`, `invalidApiKey`).
pub(super) fn check_key(state: &AppState, key: Option<&str>) -> Result<(), RunwareError> {
    match key {
        None if !state.keys().is_open() => Err(RunwareError::missing_api_key()),
        Some(key) if !state.keys().check(key) => Err(RunwareError::invalid_api_key()),
        _ => Ok(()),
    }
}

async fn run_one(state: &AppState, value: &Value) -> Vec<Reply> {
    match task::parse_task(value, state) {
        Err(e) => vec![Reply::Error(e)],
        // Over HTTP an authentication task only checks its key.
        Ok(Task::Authentication(auth)) => match check_key(state, auth.api_key.as_deref()) {
            Ok(()) => Vec::new(),
            Err(e) => vec![Reply::Error(e)],
        },
        Ok(Task::Ping(ping)) => vec![Reply::Data(vec![run::pong(ping.task_uuid.as_deref())])],
        Ok(task) => {
            let collect = Arc::new(Collect::default());
            run::run(state, task, collect.clone()).await;
            collect.take()
        }
    }
}

fn respond(replies: Vec<Reply>) -> Response {
    let mut data = Vec::new();
    let mut errors = Vec::new();
    for reply in replies {
        match reply {
            Reply::Data(items) => data.extend(items),
            Reply::Error(e) => errors.push(e),
        }
    }
    let status = match errors.first() {
        Some(first) if data.is_empty() => first.class.status(),
        _ => StatusCode::OK,
    };
    let mut body = Map::new();
    if !data.is_empty() || errors.is_empty() {
        body.insert("data".into(), Value::Array(data));
    }
    if !errors.is_empty() {
        let errors = errors
            .iter()
            .map(|e| serde_json::to_value(e).unwrap_or_default())
            .collect();
        body.insert("errors".into(), Value::Array(errors));
    }
    (status, Json(Value::Object(body))).into_response()
}
