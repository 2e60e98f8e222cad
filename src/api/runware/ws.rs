//! `GET /v1` upgraded to a WebSocket: task arrays in, one message per result out.
//!
//! The first message must hold an `authentication` task; it is answered with
//! `{"data":[{"taskType":"authentication","connectionSessionUUID":...}]}` (no taskUUID: the
//! SDKs match this reply by its taskType), and a wrong or missing key is answered with the error
//! and a normal close. After that any number of tasks may be in flight: each runs on its own and
//! sends each image as soon as it is stored, as its own `data` message. Text and binary frames
//! are both read as JSON; protocol pings are answered by the WebSocket layer, and
//! `{"taskType":"ping"}` tasks with `pong: true`.
//!
//! With no message either way for the idle timeout (120 s by default) the socket is closed. A
//! socket that goes away leaves its session and tasks behind: results are buffered and delivered
//! when a client authenticates with the same `connectionSessionUUID` within the resume window.
//! On shutdown a socket refuses new tasks, delivers what its running tasks produce, then closes.

use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::error::{ErrorClass, RunwareError};
use super::http::check_key;
use super::run::{self, Outbox, Reply};
use super::session::Session;
use super::task::{self, Task, AUTHENTICATION};
use crate::api::AppState;

/// Close codes (RFC 6455): normal, and going away.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;

pub(super) async fn upgrade(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let error = RunwareError::new(
                "invalidRequest",
                format!(
                    "GET /v1 is the WebSocket endpoint ({}); over HTTP, POST a JSON array of \
                     tasks to /v1",
                    rejection.body_text()
                ),
            );
            let status = match rejection.status() {
                s if s.is_client_error() => s,
                _ => StatusCode::UPGRADE_REQUIRED,
            };
            return (status, Json(error.to_body())).into_response();
        }
    };
    let max = state.config().limits.max_body_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // Shutdown waits for sockets that still deliver results.
            let tracker = state.tasks().clone();
            tracker.track_future(Connection::new(socket, state).serve())
        })
}

/// Why the loop stopped.
enum End {
    /// The client closed or the connection broke; `unsent` is a message that failed to go.
    Dropped { unsent: Option<String> },
    /// We close: idle, failed authentication, shutdown.
    Close { code: u16, reason: &'static str },
}

struct Connection {
    socket: WebSocket,
    state: AppState,
    socket_id: u64,
    session: Option<Arc<Session>>,
    sender: mpsc::UnboundedSender<String>,
    queued: mpsc::UnboundedReceiver<String>,
    deadline: Instant,
    draining: bool,
}

impl Connection {
    fn new(socket: WebSocket, state: AppState) -> Self {
        let (sender, queued) = mpsc::unbounded_channel();
        let idle = state.config().runware.idle_timeout();
        Connection {
            socket,
            socket_id: state.runware_sessions().socket_id(),
            state,
            session: None,
            sender,
            queued,
            deadline: Instant::now() + idle,
            draining: false,
        }
    }

    fn touch(&mut self) {
        self.deadline = Instant::now() + self.state.config().runware.idle_timeout();
    }

    async fn serve(mut self) {
        let end = self.run().await;
        match end {
            End::Close { code, reason } => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                let _ = self.socket.send(Message::Close(Some(frame))).await;
                self.leave(None);
            }
            End::Dropped { unsent } => self.leave(unsent),
        }
    }

    /// Hands what this socket did not write back to its session.
    fn leave(&mut self, unsent: Option<String>) {
        if let Some(session) = self.session.take() {
            session.detach(self.socket_id, unsent, &mut self.queued);
            self.state.runware_sessions().sweep_later();
        }
    }

    async fn run(&mut self) -> End {
        let shutdown = self.state.shutdown_token().clone();
        loop {
            let session = self.session.clone();
            let draining = self.draining;
            let finished = async move {
                match session {
                    Some(session) if draining => session.tasks_finished().await,
                    None if draining => {}
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(message) = self.queued.recv() => {
                    if self.socket.send(Message::text(message.clone())).await.is_err() {
                        return End::Dropped { unsent: Some(message) };
                    }
                    self.touch();
                }
                incoming = self.socket.recv() => {
                    self.touch();
                    let bytes = match incoming {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                            return End::Dropped { unsent: None };
                        }
                        Some(Ok(Message::Text(text))) => {
                            axum::body::Bytes::copy_from_slice(text.as_str().as_bytes())
                        }
                        Some(Ok(Message::Binary(bytes))) => bytes,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    };
                    if let Some(end) = self.handle(&bytes).await {
                        return end;
                    }
                }
                () = shutdown.cancelled(), if !self.draining => {
                    self.draining = true;
                }
                () = finished => {
                    while let Ok(message) = self.queued.try_recv() {
                        if self.socket.send(Message::text(message.clone())).await.is_err() {
                            return End::Dropped { unsent: Some(message) };
                        }
                    }
                    return End::Close { code: CLOSE_GOING_AWAY, reason: "server shutting down" };
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    return End::Close { code: CLOSE_NORMAL, reason: "idle timeout" };
                }
            }
        }
    }

    /// Handles one message; `Some` ends the connection.
    async fn handle(&mut self, bytes: &[u8]) -> Option<End> {
        let tasks = match task::parse_payload(bytes) {
            Ok(tasks) => tasks,
            Err(e) if self.session.is_none() => return self.refuse(e).await,
            Err(e) => {
                self.reply(Reply::Error(e));
                return None;
            }
        };
        let mut tasks = tasks.into_iter();
        if self.session.is_none() {
            let Some(first) = tasks.next() else {
                return self.refuse(RunwareError::missing_api_key()).await;
            };
            if let Some(end) = self.authenticate(&first).await {
                return Some(end);
            }
        }
        for value in tasks {
            self.dispatch(&value);
        }
        None
    }

    /// The first task: it must authenticate. Starts or resumes the session.
    async fn authenticate(&mut self, first: &Value) -> Option<End> {
        let (task_type, _) = task::task_ids(first);
        if task_type != Some(AUTHENTICATION) {
            let error = RunwareError::missing_api_key();
            let message = format!(
                "the first message on a connection must be an authentication task with \
                 `apiKey`. {}",
                error.message
            );
            let error = error.message(message);
            return self.refuse(error).await;
        }
        let auth = match task::parse_task(first, &self.state) {
            Ok(Task::Authentication(auth)) => auth,
            Ok(_) => return self.refuse(RunwareError::missing_api_key()).await,
            Err(e) => return self.refuse(e).await,
        };
        if let Err(e) = check_key(&self.state, auth.api_key.as_deref()) {
            return self.refuse(e).await;
        }
        let session = self.state.runware_sessions().open(auth.session.as_deref());
        // The reply goes first, ahead of any result buffered for a resumed session.
        let reply = json!({ "data": [auth_item(&session)] }).to_string();
        if self.socket.send(Message::text(reply)).await.is_err() {
            return Some(End::Dropped { unsent: None });
        }
        session.attach(self.socket_id, self.sender.clone());
        self.session = Some(session);
        None
    }

    /// Answers with an error and closes: the connection never authenticated.
    async fn refuse(&mut self, error: RunwareError) -> Option<End> {
        let error = error.task(Some(AUTHENTICATION), None);
        let _ = self
            .socket
            .send(Message::text(error.to_body().to_string()))
            .await;
        Some(End::Close {
            code: CLOSE_NORMAL,
            reason: "authentication failed",
        })
    }

    /// Sends a reply through the session, so that it is buffered if the socket goes.
    fn reply(&self, reply: Reply) {
        if let Some(session) = &self.session {
            session.send(reply);
        }
    }

    /// Runs one task of an authenticated connection.
    fn dispatch(&self, value: &Value) {
        let Some(session) = &self.session else {
            return;
        };
        let task = match task::parse_task(value, &self.state) {
            Ok(task) => task,
            Err(e) => return self.reply(Reply::Error(e)),
        };
        match task {
            Task::Authentication(_) => self.reply(Reply::Data(vec![auth_item(session)])),
            Task::Ping(ping) => self.reply(Reply::Data(vec![run::pong(ping.task_uuid.as_deref())])),
            _ if self.draining || self.state.shutdown_token().is_cancelled() => {
                let (task_type, task_uuid) = task::task_ids(value);
                let error = RunwareError::new(
                    "serverShuttingDown",
                    "the server is shutting down and takes no new tasks; reconnect and send \
                     the task again shortly",
                )
                .class(ErrorClass::Unavailable)
                .task(task_type, task_uuid);
                self.reply(Reply::Error(error));
            }
            task => {
                let running = session.task_started();
                let state = self.state.clone();
                self.state.spawn_task(async move {
                    let outbox: Arc<dyn Outbox> = running.session().clone();
                    run::run(&state, task, outbox).await;
                    drop(running);
                });
            }
        }
    }
}

fn auth_item(session: &Session) -> Value {
    json!({ "taskType": AUTHENTICATION, "connectionSessionUUID": session.id() })
}
