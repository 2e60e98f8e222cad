//! WebSocket sessions that outlive their sockets, and the table of tasks still running.
//!
//! A session is created by an `authentication` task and named by its `connectionSessionUUID`.
//! Results of its tasks go to the socket attached to it; while none is (the connection dropped),
//! they wait in the session's buffer, each for the resume window (120 s by default), and are
//! delivered in order to the next socket that authenticates with that `connectionSessionUUID`.
//! Tasks keep running without a socket. A session with no socket, no running task and nothing
//! left to keep is removed by a sweeper that runs while any session is detached.
//!
//! The running-task table maps each `taskUUID` in flight to a signal that fires when its job
//! record is final: it refuses a second task with the same id, and lets `getResponse` wait for
//! a task that is about to finish.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Every Runware session and running task of the server. Cheap to clone.
#[derive(Clone)]
pub struct Sessions(Arc<Shared>);

struct Shared {
    buffer: Duration,
    sessions: Mutex<SessionTable>,
    running: Mutex<HashMap<String, watch::Receiver<()>>>,
    next_socket: AtomicU64,
}

#[derive(Default)]
struct SessionTable {
    by_id: HashMap<String, Arc<Session>>,
    sweeping: bool,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("buffer", &self.0.buffer)
            .field("sessions", &lock(&self.0.sessions).by_id.len())
            .field("running", &lock(&self.0.running).len())
            .finish()
    }
}

impl Sessions {
    /// Sessions whose undelivered results are kept for `resume_buffer`.
    pub fn new(resume_buffer: Duration) -> Self {
        Self(Arc::new(Shared {
            buffer: resume_buffer,
            sessions: Mutex::new(SessionTable::default()),
            running: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(1),
        }))
    }

    /// How long undelivered results are kept.
    pub fn buffer(&self) -> Duration {
        self.0.buffer
    }

    /// How many sessions exist (attached or waiting to be resumed).
    pub fn len(&self) -> usize {
        lock(&self.0.sessions).by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The session `resume` names if it is still kept, else a new one.
    pub(super) fn open(&self, resume: Option<&str>) -> Arc<Session> {
        let mut table = lock(&self.0.sessions);
        let now = Instant::now();
        table.by_id.retain(|_, s| !s.is_expired(now));
        if let Some(session) = resume.and_then(|id| table.by_id.get(id.trim())) {
            return session.clone();
        }
        let session = Arc::new(Session {
            id: uuid::Uuid::new_v4().to_string(),
            buffer: self.0.buffer,
            inner: Mutex::new(SessionInner {
                outlet: None,
                pending: VecDeque::new(),
                keep_until: now,
            }),
            running: watch::Sender::new(0),
        });
        table.by_id.insert(session.id.clone(), session.clone());
        session
    }

    /// A number naming one socket, to tell a socket's own detach from a later one's.
    pub(super) fn socket_id(&self) -> u64 {
        self.0.next_socket.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs the sweeper unless it runs already; it stops once every session has a socket.
    pub(super) fn sweep_later(&self) {
        let mut table = lock(&self.0.sessions);
        if table.sweeping {
            return;
        }
        table.sweeping = true;
        let shared = self.0.clone();
        let every = (shared.buffer / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let mut table = lock(&shared.sessions);
                let now = Instant::now();
                table.by_id.retain(|_, s| !s.is_expired(now));
                if table.by_id.values().all(|s| s.is_attached()) {
                    table.sweeping = false;
                    return;
                }
            }
        });
    }

    /// Marks `task_uuid` as running, or `None` when a task with that id runs already. The
    /// returned claim releases the id when dropped.
    pub(super) fn claim_task(&self, task_uuid: &str) -> Option<TaskClaim> {
        let mut running = lock(&self.0.running);
        if running.contains_key(task_uuid) {
            return None;
        }
        let (done, watcher) = watch::channel(());
        running.insert(task_uuid.to_string(), watcher);
        Some(TaskClaim {
            shared: self.0.clone(),
            task_uuid: task_uuid.to_string(),
            _done: done,
        })
    }

    /// Completes when the running task `task_uuid` has released its id (at once when none runs).
    pub(super) async fn wait_for_task(&self, task_uuid: &str) {
        let watcher = lock(&self.0.running).get(task_uuid).cloned();
        if let Some(mut watcher) = watcher {
            // Fails once the claim's sender is dropped: that is the signal.
            while watcher.changed().await.is_ok() {}
        }
    }

    /// Whether a task with this id is running.
    pub(super) fn is_running(&self, task_uuid: &str) -> bool {
        lock(&self.0.running).contains_key(task_uuid)
    }
}

/// A running task's hold on its `taskUUID`.
pub(super) struct TaskClaim {
    shared: Arc<Shared>,
    task_uuid: String,
    _done: watch::Sender<()>,
}

impl Drop for TaskClaim {
    fn drop(&mut self) {
        lock(&self.shared.running).remove(&self.task_uuid);
    }
}

/// One client's session: where its results go.
pub struct Session {
    id: String,
    buffer: Duration,
    inner: Mutex<SessionInner>,
    /// Tasks of this session still running.
    running: watch::Sender<usize>,
}

struct SessionInner {
    outlet: Option<Outlet>,
    /// Messages no socket took, oldest first, with when they were buffered.
    pending: VecDeque<(Instant, String)>,
    /// While detached: until when the session is worth keeping.
    keep_until: Instant,
}

/// The socket a session delivers to.
struct Outlet {
    socket: u64,
    sender: mpsc::UnboundedSender<String>,
}

impl Session {
    /// The `connectionSessionUUID`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Makes `socket` the receiver of this session's messages, first those buffered. A socket
    /// attached before is replaced.
    pub(super) fn attach(&self, socket: u64, sender: mpsc::UnboundedSender<String>) {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        let buffer = self.buffer;
        inner.pending.retain(|(at, _)| *at + buffer > now);
        while let Some((at, message)) = inner.pending.pop_front() {
            if let Err(mpsc::error::SendError(message)) = sender.send(message) {
                inner.pending.push_front((at, message));
                return;
            }
        }
        inner.outlet = Some(Outlet { socket, sender });
    }

    /// Sends `message` to the attached socket, or keeps it for the next one.
    pub(super) fn deliver(&self, message: String) {
        let mut inner = lock(&self.inner);
        let message = match &inner.outlet {
            Some(outlet) => match outlet.sender.send(message) {
                Ok(()) => return,
                Err(mpsc::error::SendError(message)) => {
                    inner.outlet = None;
                    message
                }
            },
            None => message,
        };
        let now = Instant::now();
        inner.pending.push_back((now, message));
        inner.keep_until = now + self.buffer;
    }

    /// Called by a socket that is going away: messages it had not written (`unsent`, then
    /// those still queued for it) go back to the buffer, ahead of anything newer. When the
    /// session has moved to another socket meanwhile, they are passed on to it.
    pub(super) fn detach(
        &self,
        socket: u64,
        unsent: Option<String>,
        queued: &mut mpsc::UnboundedReceiver<String>,
    ) {
        let mut inner = lock(&self.inner);
        let mine = inner.outlet.as_ref().is_some_and(|o| o.socket == socket);
        if mine {
            inner.outlet = None;
        }
        let mut left: Vec<String> = unsent.into_iter().collect();
        while let Ok(message) = queued.try_recv() {
            left.push(message);
        }
        let now = Instant::now();
        match &inner.outlet {
            Some(outlet) if !mine => {
                for message in left {
                    // The new socket's receiver lives while it is attached; a failure means
                    // it is going too, and its own detach will buffer what it has.
                    let _ = outlet.sender.send(message);
                }
            }
            _ => {
                for message in left.into_iter().rev() {
                    inner.pending.push_front((now, message));
                }
            }
        }
        inner.keep_until = now + self.buffer;
    }

    pub(super) fn is_attached(&self) -> bool {
        lock(&self.inner).outlet.is_some()
    }

    /// Counts a task of this session as running until the guard is dropped.
    pub(super) fn task_started(self: &Arc<Self>) -> SessionTask {
        self.running.send_modify(|n| *n += 1);
        SessionTask {
            session: self.clone(),
        }
    }

    /// Completes when no task of this session is running.
    pub(super) async fn tasks_finished(&self) {
        let mut watcher = self.running.subscribe();
        let _ = watcher.wait_for(|n| *n == 0).await;
    }

    fn is_expired(&self, now: Instant) -> bool {
        if *self.running.borrow() > 0 {
            return false;
        }
        let inner = lock(&self.inner);
        inner.outlet.is_none() && inner.keep_until <= now
    }
}

/// A running task of a session; dropping it counts the task as finished.
pub(super) struct SessionTask {
    session: Arc<Session>,
}

impl SessionTask {
    pub(super) fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

impl Drop for SessionTask {
    fn drop(&mut self) {
        let mut inner = lock(&self.session.inner);
        inner.keep_until = inner.keep_until.max(Instant::now() + self.session.buffer);
        drop(inner);
        self.session
            .running
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a few plain assignments).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn undelivered_messages_wait_for_the_next_socket_in_order() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let session = sessions.open(None);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let first = sessions.socket_id();
        session.attach(first, tx);
        session.deliver("a".into());
        session.deliver("b".into());
        // The socket wrote "a" and failed on "b"; "c" arrives after it went.
        assert_eq!(rx.recv().await.as_deref(), Some("a"));
        let failed = rx.recv().await;
        session.detach(first, failed, &mut rx);
        session.deliver("c".into());
        assert!(!session.is_attached());

        let resumed = sessions.open(Some(session.id()));
        assert!(Arc::ptr_eq(&resumed, &session));
        let (tx, mut rx) = mpsc::unbounded_channel();
        resumed.attach(sessions.socket_id(), tx);
        assert_eq!(rx.recv().await.as_deref(), Some("b"));
        assert_eq!(rx.recv().await.as_deref(), Some("c"));
        resumed.deliver("d".into());
        assert_eq!(rx.recv().await.as_deref(), Some("d"));
    }

    #[tokio::test]
    async fn expired_sessions_are_not_resumed_unless_a_task_runs() {
        let sessions = Sessions::new(Duration::from_millis(20));
        let idle = sessions.open(None);
        let busy = sessions.open(None);
        let task = busy.task_started();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let other = sessions.open(Some(idle.id()));
        assert_ne!(other.id(), idle.id());
        assert!(Arc::ptr_eq(&sessions.open(Some(busy.id())), &busy));
        drop(task);
        busy.tasks_finished().await;
    }

    #[tokio::test]
    async fn task_ids_are_claimed_once() {
        let sessions = Sessions::new(Duration::from_secs(1));
        let id = "39d7207a-87ef-4c93-8082-1431f9c1dc97";
        let claim = sessions.claim_task(id).unwrap();
        assert!(sessions.claim_task(id).is_none());
        assert!(sessions.is_running(id));
        let waiting = {
            let sessions = sessions.clone();
            tokio::spawn(async move { sessions.wait_for_task(id).await })
        };
        drop(claim);
        waiting.await.unwrap();
        assert!(!sessions.is_running(id));
        assert!(sessions.claim_task(id).is_some());
    }
}
