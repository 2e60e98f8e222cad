//! Job records: what a dialect needs to answer a status fetch after the request that started the
//! job has gone, or after a restart.

use std::fmt;
use std::time::SystemTime;

use rusqlite::{params, OptionalExtension, Row};

use super::{from_millis, to_millis, Result, Store, StoreError};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Queued,
    Processing,
    Success,
    Error,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Processing => "processing",
            JobStatus::Success => "success",
            JobStatus::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(JobStatus::Queued),
            "processing" => Some(JobStatus::Processing),
            "success" => Some(JobStatus::Success),
            "error" => Some(JobStatus::Error),
            _ => None,
        }
    }

    /// Success and error are final.
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Success | JobStatus::Error)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One job as recorded. `id` is the client-visible id (a ModelsLab numeric id, a Runware
/// taskUUID, ...), unique across dialects; callers answering a fetch check `dialect` too.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    /// Which API made the job (`modelslab`, `runware`, ...).
    pub dialect: String,
    pub status: JobStatus,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    /// The request as the dialect received it (or its canonical form), to answer with `meta`.
    pub request_json: serde_json::Value,
    /// The dialect's result body (image URLs, seeds, ...), set on success.
    pub result_json: Option<serde_json::Value>,
    /// The failure message, set on error.
    pub error: Option<String>,
    pub expires_at: Option<SystemTime>,
}

impl JobRecord {
    /// A queued job created now.
    pub fn new(
        id: impl Into<String>,
        dialect: impl Into<String>,
        request_json: serde_json::Value,
        expires_at: Option<SystemTime>,
    ) -> Self {
        let now = SystemTime::now();
        JobRecord {
            id: id.into(),
            dialect: dialect.into(),
            status: JobStatus::Queued,
            created_at: now,
            updated_at: now,
            request_json,
            result_json: None,
            error: None,
            expires_at,
        }
    }
}

const JOB_COLUMNS: &str =
    "id, dialect, status, created_at, updated_at, request_json, result_json, error, expires_at";

impl Store {
    /// Records a new job. An id already present is [`StoreError::DuplicateJob`].
    pub fn insert_job(&self, job: &JobRecord) -> Result<()> {
        let inserted = self.db().execute(
            &format!(
                "INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![
                job.id,
                job.dialect,
                job.status.as_str(),
                to_millis(job.created_at),
                to_millis(job.updated_at),
                job.request_json.to_string(),
                job.result_json.as_ref().map(|v| v.to_string()),
                job.error,
                job.expires_at.map(to_millis),
            ],
        );
        match inserted {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::DuplicateJob(job.id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sets a job's status. Returns false when no job has this id.
    pub fn update_job_status(&self, id: &str, status: JobStatus) -> Result<bool> {
        let changed = self.db().execute(
            "UPDATE jobs SET status = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, status.as_str(), to_millis(SystemTime::now())],
        )?;
        Ok(changed > 0)
    }

    /// Marks a job successful with its result body. Returns false when no job has this id.
    pub fn update_job_result(&self, id: &str, result_json: &serde_json::Value) -> Result<bool> {
        let changed = self.db().execute(
            "UPDATE jobs SET status = ?2, result_json = ?3, error = NULL, updated_at = ?4 WHERE id = ?1",
            params![
                id,
                JobStatus::Success.as_str(),
                result_json.to_string(),
                to_millis(SystemTime::now())
            ],
        )?;
        Ok(changed > 0)
    }

    /// Marks a job failed with a message for the client. Returns false when no job has this id.
    pub fn update_job_error(&self, id: &str, message: &str) -> Result<bool> {
        let changed = self.db().execute(
            "UPDATE jobs SET status = ?2, error = ?3, updated_at = ?4 WHERE id = ?1",
            params![
                id,
                JobStatus::Error.as_str(),
                message,
                to_millis(SystemTime::now())
            ],
        )?;
        Ok(changed > 0)
    }

    /// The job with this id, expired or not (expired ones go at the next purge).
    pub fn get_job(&self, id: &str) -> Result<Option<JobRecord>> {
        let row = self
            .db()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                RawJob::from_row,
            )
            .optional()?;
        row.map(RawJob::into_record).transpose()
    }
}

/// A jobs row before its text columns are parsed.
struct RawJob {
    id: String,
    dialect: String,
    status: String,
    created_at: i64,
    updated_at: i64,
    request_json: String,
    result_json: Option<String>,
    error: Option<String>,
    expires_at: Option<i64>,
}

impl RawJob {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawJob {
            id: row.get(0)?,
            dialect: row.get(1)?,
            status: row.get(2)?,
            created_at: row.get(3)?,
            updated_at: row.get(4)?,
            request_json: row.get(5)?,
            result_json: row.get(6)?,
            error: row.get(7)?,
            expires_at: row.get(8)?,
        })
    }

    fn into_record(self) -> Result<JobRecord> {
        let corrupt = |what: String| StoreError::Corrupt(format!("job {}: {what}", self.id));
        let status = JobStatus::parse(&self.status)
            .ok_or_else(|| corrupt(format!("status `{}`", self.status)))?;
        let request_json = serde_json::from_str(&self.request_json)
            .map_err(|e| corrupt(format!("request_json: {e}")))?;
        let result_json = self
            .result_json
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| corrupt(format!("result_json: {e}")))?;
        Ok(JobRecord {
            status,
            created_at: from_millis(self.created_at),
            updated_at: from_millis(self.updated_at),
            request_json,
            result_json,
            expires_at: self.expires_at.map(from_millis),
            id: self.id,
            dialect: self.dialect,
            error: self.error,
        })
    }
}
