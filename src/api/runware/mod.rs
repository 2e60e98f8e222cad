//! Runware task arrays: `POST /v1` over HTTP and `GET /v1` upgraded to a WebSocket.
//!
//! A payload is a JSON array of task objects, each with a `taskType`: `authentication`, `ping`,
//! `imageInference` (with `controlNet` and `ipAdapters`), `imageUpload`, `getResponse` and
//! `imageControlNetPreProcess` (Canny) are served. Results are `data` items, one
//! per image; failures are `errors` items naming the task (`taskType`, `taskUUID`), the
//! parameter and the limit. `task` parses and validates, `run` executes (shared by both
//! transports), `http` and `ws` speak the transports, `session` keeps WebSocket sessions
//! resumable.

mod control;
mod error;
mod http;
mod ip_adapter;
mod run;
mod session;
mod task;
mod ws;

use axum::routing::get;
use axum::Router;

use super::AppState;

pub use error::{ErrorBody, ErrorClass, RunwareError};
pub use session::{Session, Sessions};

/// `POST /v1` (HTTP) and `GET /v1` (WebSocket).
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1", get(ws::upgrade).post(http::post))
}
