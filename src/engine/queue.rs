//! The engine's bounded job queue: admission against a fixed capacity (waiting plus running
//! jobs), first-in first-out hand-out to worker threads, removal of cancelled jobs, and the job
//! counters behind [`EngineStats`].
//!
//! One mutex guards everything, so admission, hand-out and the counters always agree; no work
//! happens while it is held.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// What the queue needs to know about a job.
pub(crate) trait Queued {
    fn id(&self) -> u64;
    /// True once the job's client cancelled it or went away: it is skipped, never started.
    fn is_cancelled(&self) -> bool;
}

/// Job counts: current `queued` and `running`, totals since start for the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    /// Admitted jobs waiting for a worker.
    pub queued: usize,
    /// Jobs a worker is running now.
    pub running: usize,
    pub completed: u64,
    pub failed: u64,
    /// Jobs cancelled by their client (or by shutdown), whether waiting or running.
    pub cancelled: u64,
    /// Submissions refused because the queue was full or the engine was shutting down.
    pub refused: u64,
    /// Submissions refused because the request exceeded the engine's limits.
    pub invalid: u64,
    /// Model loads and evictions over all workers' caches.
    pub model_loads: u64,
    pub model_evictions: u64,
}

/// How a job a worker took ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

/// Why a job was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Full,
    Closed,
}

struct State<T> {
    pending: VecDeque<T>,
    closed: bool,
    stats: EngineStats,
}

pub(crate) struct JobQueue<T> {
    capacity: usize,
    state: Mutex<State<T>>,
    /// Signalled on every change: workers wait for jobs, shutdown waits for idleness.
    changed: Condvar,
}

impl<T: Queued> JobQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::new(State {
                pending: VecDeque::new(),
                closed: false,
                stats: EngineStats::default(),
            }),
            changed: Condvar::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The state stays consistent under every operation, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits `item` unless the queue is closed or `capacity` jobs are waiting or running.
    /// Never blocks beyond the lock.
    pub fn push(&self, item: T) -> Result<(), Refusal> {
        let mut state = self.lock();
        let refusal = if state.closed {
            Some(Refusal::Closed)
        } else if state.pending.len() + state.stats.running >= self.capacity {
            Some(Refusal::Full)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            state.stats.refused += 1;
            return Err(refusal);
        }
        state.pending.push_back(item);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// The oldest job not cancelled, counted as running; waits for one. `None` once the queue
    /// is closed and empty: the worker then exits.
    pub fn pop(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            while let Some(item) = state.pending.pop_front() {
                if item.is_cancelled() {
                    state.stats.cancelled += 1;
                    continue;
                }
                state.stats.running += 1;
                drop(state);
                self.changed.notify_all();
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Records the end of a job [`Self::pop`] handed out.
    pub fn finish(&self, outcome: Outcome) {
        let mut state = self.lock();
        state.stats.running = state
            .stats
            .running
            .checked_sub(1)
            .expect("a job finishes only after it was popped; this is a bug");
        match outcome {
            Outcome::Completed => state.stats.completed += 1,
            Outcome::Failed => state.stats.failed += 1,
            Outcome::Cancelled => state.stats.cancelled += 1,
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Takes a waiting job out (its client cancelled it), counted as cancelled. `None` when it
    /// is not waiting (already running, finished or unknown).
    pub fn remove(&self, id: u64) -> Option<T> {
        let mut state = self.lock();
        let at = state.pending.iter().position(|j| j.id() == id)?;
        let item = state.pending.remove(at);
        state.stats.cancelled += 1;
        drop(state);
        self.changed.notify_all();
        item
    }

    /// Refuses new jobs from now on; waiting jobs still run.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Takes every waiting job out, counted as cancelled (shutdown past its deadline).
    pub fn drain(&self) -> Vec<T> {
        let mut state = self.lock();
        let items: Vec<T> = state.pending.drain(..).collect();
        state.stats.cancelled += items.len() as u64;
        drop(state);
        self.changed.notify_all();
        items
    }

    /// Waits until no job is waiting or running, or `deadline` passes; true when idle.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        loop {
            if state.pending.is_empty() && state.stats.running == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub fn count_invalid(&self) {
        self.lock().stats.invalid += 1;
    }

    pub fn stats(&self) -> EngineStats {
        let state = self.lock();
        EngineStats {
            queued: state.pending.len(),
            ..state.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    struct Item {
        id: u64,
        cancelled: Arc<AtomicBool>,
    }

    impl Item {
        fn new(id: u64) -> Self {
            Self {
                id,
                cancelled: Arc::new(AtomicBool::new(false)),
            }
        }
    }

    impl Queued for Item {
        fn id(&self) -> u64 {
            self.id
        }
        fn is_cancelled(&self) -> bool {
            self.cancelled.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn fifo_order() {
        let q = JobQueue::new(3);
        for id in 0..3 {
            q.push(Item::new(id)).unwrap();
        }
        let order: Vec<u64> = (0..3).map(|_| q.pop().unwrap().id).collect();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(q.stats().running, 3);
        assert_eq!(q.stats().queued, 0);
    }

    #[test]
    fn capacity_counts_waiting_and_running() {
        let q = JobQueue::new(2);
        q.push(Item::new(0)).unwrap();
        q.push(Item::new(1)).unwrap();
        assert_eq!(q.push(Item::new(2)).unwrap_err(), Refusal::Full);
        // Taking a job to run does not free its slot; finishing it does.
        let _running = q.pop().unwrap();
        assert_eq!(q.push(Item::new(3)).unwrap_err(), Refusal::Full);
        q.finish(Outcome::Completed);
        q.push(Item::new(4)).unwrap();
        let s = q.stats();
        assert_eq!((s.queued, s.running, s.completed, s.refused), (2, 0, 1, 2));
    }

    #[test]
    fn zero_capacity_refuses_everything() {
        let q: JobQueue<Item> = JobQueue::new(0);
        assert_eq!(q.push(Item::new(0)).unwrap_err(), Refusal::Full);
        assert_eq!(q.stats().refused, 1);
    }

    #[test]
    fn closed_queue_refuses_but_hands_out_what_waits() {
        let q = JobQueue::new(4);
        q.push(Item::new(0)).unwrap();
        q.close();
        assert_eq!(q.push(Item::new(1)).unwrap_err(), Refusal::Closed);
        assert_eq!(q.pop().unwrap().id, 0);
        // Closed and empty: the worker is told to exit instead of waiting.
        assert!(q.pop().is_none());
    }

    #[test]
    fn cancelled_jobs_are_skipped_and_counted() {
        let q = JobQueue::new(4);
        let first = Item::new(0);
        first.cancelled.store(true, Ordering::SeqCst);
        q.push(first).unwrap();
        q.push(Item::new(1)).unwrap();
        assert_eq!(q.pop().unwrap().id, 1);
        let s = q.stats();
        assert_eq!((s.cancelled, s.running, s.queued), (1, 1, 0));
    }

    #[test]
    fn remove_frees_the_slot_once() {
        let q = JobQueue::new(1);
        q.push(Item::new(7)).unwrap();
        assert_eq!(q.remove(7).map(|i| i.id), Some(7));
        assert!(q.remove(7).is_none());
        assert!(q.remove(99).is_none());
        q.push(Item::new(8)).unwrap();
        assert_eq!(q.stats().cancelled, 1);
    }

    #[test]
    fn drain_cancels_everything_waiting() {
        let q = JobQueue::new(4);
        for id in 0..3 {
            q.push(Item::new(id)).unwrap();
        }
        let _running = q.pop().unwrap();
        assert_eq!(q.drain().len(), 2);
        let s = q.stats();
        assert_eq!((s.queued, s.running, s.cancelled), (0, 1, 2));
    }

    #[test]
    fn pop_waits_for_a_push() {
        let q: Arc<JobQueue<Item>> = Arc::new(JobQueue::new(1));
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.pop().map(|i| i.id))
        };
        std::thread::sleep(Duration::from_millis(20));
        q.push(Item::new(5)).unwrap();
        assert_eq!(worker.join().unwrap(), Some(5));
    }

    #[test]
    fn close_wakes_a_waiting_worker() {
        let q: Arc<JobQueue<Item>> = Arc::new(JobQueue::new(1));
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.pop().is_none())
        };
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert!(worker.join().unwrap());
    }

    #[test]
    fn wait_idle_times_out_while_busy_and_returns_when_idle() {
        let q = Arc::new(JobQueue::new(1));
        q.push(Item::new(0)).unwrap();
        let _job = q.pop().unwrap();
        let start = Instant::now();
        assert!(!q.wait_idle(Instant::now() + Duration::from_millis(30)));
        assert!(start.elapsed() >= Duration::from_millis(30));
        let finisher = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                q.finish(Outcome::Failed);
            })
        };
        assert!(q.wait_idle(Instant::now() + Duration::from_secs(10)));
        finisher.join().unwrap();
        assert_eq!(q.stats().failed, 1);
    }
}
