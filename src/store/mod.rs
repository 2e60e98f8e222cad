//! Where finished images and job records live, so that a result survives the request that made it
//! and a restart of the server: image files under `<dir>/images/`, their index and the job records
//! in SQLite (`<dir>/jobs.sqlite3`, WAL mode).
//!
//! A finished image is written (temp file, fsync, rename) and indexed before any dialect reports
//! it. Images are addressed by a UUID the server generates; a client-supplied id is only ever
//! parsed into a [`ImageId`], never joined onto a path.
//!
//! Every method blocks on disk and SQLite. Async callers run them in
//! `tokio::task::spawn_blocking` (a [`Store`] is `Send + Sync`; share it in an `Arc`).

mod images;
mod jobs;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

pub use images::{ImageFormat, ImageId, StoredImage};
pub use jobs::{JobRecord, JobStatus};

/// How long a ModelsLab `temp: "yes"` link stays valid: their temporary links expire after 24 hours.
pub const TEMP_LINK_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Errors of the image and job store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    #[error("store database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A job id that is already recorded (ids are client-visible and must be unique).
    #[error("a job with id `{0}` already exists")]
    DuplicateJob(String),
    /// A row that this version cannot read (written by another version, or edited by hand).
    #[error("store database holds an unreadable value: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What [`Store::purge_expired`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub images: usize,
    pub jobs: usize,
}

/// Image files and job records under one directory.
pub struct Store {
    images_dir: PathBuf,
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS images (
    id          TEXT PRIMARY KEY NOT NULL,
    format      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER
);
CREATE INDEX IF NOT EXISTS images_expires_at ON images(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY NOT NULL,
    dialect      TEXT NOT NULL,
    status       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    request_json TEXT NOT NULL,
    result_json  TEXT,
    error        TEXT,
    expires_at   INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_expires_at ON jobs(expires_at) WHERE expires_at IS NOT NULL;
";

impl Store {
    /// Opens (creating if needed) the store in `dir`: `dir/images/` and `dir/jobs.sqlite3`.
    /// Temp files left by an interrupted write are removed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let images_dir = dir.join("images");
        std::fs::create_dir_all(&images_dir)?;
        images::remove_stale_temp_files(&images_dir)?;

        let conn = Connection::open(dir.join("jobs.sqlite3"))?;
        // WAL lets readers run beside the writer; FULL makes each commit durable before it returns,
        // which "stored before reported" relies on.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            images_dir,
            db: Mutex::new(conn),
        })
    }

    /// The directory holding the image files.
    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection half-used: each statement is
        // its own transaction or an explicit one that rolls back on drop.
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deletes images (files and rows) and job records whose `expires_at` is at or before `now`.
    /// Rows go first, so an image is never listed without its file; a file whose removal failed
    /// is logged and left behind.
    pub fn purge_expired(&self, now: SystemTime) -> Result<PurgeReport> {
        let now = to_millis(now);
        let mut conn = self.db();
        let tx = conn.transaction()?;
        let expired: Vec<(String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT id, format FROM images WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            )?;
            let rows = stmt.query_map([now], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        tx.execute(
            "DELETE FROM images WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            [now],
        )?;
        let jobs = tx.execute(
            "DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            [now],
        )?;
        tx.commit()?;
        drop(conn);

        for (id, format) in &expired {
            let (Some(id), Some(format)) = (ImageId::parse(id), ImageFormat::parse(format)) else {
                tracing::warn!(
                    id,
                    format,
                    "purged an image row with an unreadable id or format"
                );
                continue;
            };
            let path = self.images_dir.join(id.file_name(format));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove expired image")
                }
            }
        }
        Ok(PurgeReport {
            images: expired.len(),
            jobs,
        })
    }
}

/// Milliseconds since the Unix epoch, as stored in the database (times before 1970 store as 0).
fn to_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
