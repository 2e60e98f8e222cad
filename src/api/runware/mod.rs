//! Placeholder: Runware task arrays.

use std::time::Duration;

use axum::Router;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
}

/// WebSocket sessions kept for resuming.
#[derive(Debug, Default)]
pub struct Sessions {
    buffer: Duration,
}

impl Sessions {
    pub fn new(buffer: Duration) -> Self {
        Self { buffer }
    }

    /// How long undelivered results are kept.
    pub fn buffer(&self) -> Duration {
        self.buffer
    }
}
