//! The load driver: `clients` concurrent HTTP clients sending one workload to a running server,
//! bounded by a request count and a time limit, each answer sorted into an [`Outcome`].
//!
//! Kept apart from the command line so that `tests/load.rs` runs the same accounting against a
//! test server.
//!
//! An answer counts as completed only when it carries the workload's full result (for a
//! generation: a PNG of the requested size). A refusal counts as busy only in the dialect's
//! clean shape (429 with its error body); anything else with status 429 is a bad refusal. A
//! request the server may have admitted and that did not end with a result (a 500, a job
//! cancelled under it, a 200 without a valid image, a connection cut or timed out after it was
//! sent) is lost. [`Report::passed`] is false when anything was lost or badly refused.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What each request does.
#[derive(Debug, Clone)]
pub enum Workload {
    /// Runware's `ping` task over HTTP: `POST /v1` with `[{"taskType":"ping","ping":true}]`,
    /// answered `{"data":[{"taskType":"ping","pong":true}]}`. A cheap route: no engine work.
    Ping,
    /// `GET /health`: the cheapest route there is.
    Health,
    /// One image through the bearer dialect, `POST /v1/images/generate`; request i asks for
    /// seed i + 1.
    Generate {
        model: String,
        width: u32,
        height: u32,
        steps: u32,
    },
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Ping => f.write_str("ping (POST /v1)"),
            Workload::Health => f.write_str("health (GET /health)"),
            Workload::Generate {
                model,
                width,
                height,
                steps,
            } => write!(
                f,
                "generate (POST /v1/images/generate) {model} {width}x{height}, {steps} steps"
            ),
        }
    }
}

/// A run's shape and bounds.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub base_url: String,
    /// Sent as `Authorization: Bearer`.
    pub key: Option<String>,
    pub workload: Workload,
    /// Concurrent clients, each with its own connection.
    pub clients: usize,
    /// Requests sent in all.
    pub max_requests: usize,
    /// No request starts after this much time (those under way finish).
    pub max_duration: Duration,
    /// Longest wait for one answer.
    pub request_timeout: Duration,
    /// How long a client refused as busy waits before its next request (zero: not at all, so
    /// refusals use up the request count at once).
    pub busy_pause: Duration,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The full result arrived.
    Completed,
    /// Refused at admission in the dialect's clean busy shape.
    Busy,
    /// Not admitted for another reason (a 4xx, shutting down, no connection).
    Error(String),
    /// Possibly admitted, and no result came back.
    Lost(String),
    /// A 429 not in the clean busy shape.
    BadRefusal(String),
}

/// One request's outcome and how long its answer took.
#[derive(Debug, Clone)]
pub struct Sample {
    pub outcome: Outcome,
    pub latency: Duration,
}

/// Counts and latencies of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub workload: String,
    pub clients: usize,
    pub sent: usize,
    pub completed: usize,
    pub busy: usize,
    pub errors: usize,
    pub lost: usize,
    pub bad_refusals: usize,
    pub elapsed: Duration,
    /// True when the time limit, not the request count, ended the run.
    pub hit_time_limit: bool,
    /// Latencies of completed requests, sorted.
    pub completed_latencies: Vec<Duration>,
    /// Latencies of busy refusals, sorted.
    pub busy_latencies: Vec<Duration>,
    /// The first few messages of errors, lost requests and bad refusals.
    pub problems: Vec<String>,
}

const PROBLEMS_KEPT: usize = 10;

impl Report {
    fn new(config: &LoadConfig, samples: Vec<Sample>, elapsed: Duration) -> Report {
        let mut report = Report {
            workload: config.workload.to_string(),
            clients: config.clients,
            sent: samples.len(),
            completed: 0,
            busy: 0,
            errors: 0,
            lost: 0,
            bad_refusals: 0,
            elapsed,
            hit_time_limit: samples.len() < config.max_requests,
            completed_latencies: Vec::new(),
            busy_latencies: Vec::new(),
            problems: Vec::new(),
        };
        for sample in samples {
            let problem = match sample.outcome {
                Outcome::Completed => {
                    report.completed += 1;
                    report.completed_latencies.push(sample.latency);
                    None
                }
                Outcome::Busy => {
                    report.busy += 1;
                    report.busy_latencies.push(sample.latency);
                    None
                }
                Outcome::Error(m) => {
                    report.errors += 1;
                    Some(format!("error: {m}"))
                }
                Outcome::Lost(m) => {
                    report.lost += 1;
                    Some(format!("lost: {m}"))
                }
                Outcome::BadRefusal(m) => {
                    report.bad_refusals += 1;
                    Some(format!("bad refusal: {m}"))
                }
            };
            if let Some(p) = problem {
                if report.problems.len() < PROBLEMS_KEPT {
                    report.problems.push(p);
                }
            }
        }
        report.completed_latencies.sort();
        report.busy_latencies.sort();
        report
    }

    /// No accepted request was lost and every refusal was clean.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.bad_refusals == 0
    }

    /// `PASS`, or `FAIL` with the reason.
    pub fn verdict(&self) -> &'static str {
        if !self.passed() {
            "FAIL: a request was lost or refused uncleanly"
        } else if self.completed == 0 {
            "FAIL: nothing completed"
        } else {
            "PASS"
        }
    }

    /// Answers of any kind per second.
    pub fn requests_per_sec(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Completed requests per second.
    pub fn completed_per_sec(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report as JSON, durations in seconds.
    pub fn to_json(&self) -> Value {
        json!({
            "workload": self.workload,
            "clients": self.clients,
            "sent": self.sent,
            "completed": self.completed,
            "refused_busy": self.busy,
            "errors": self.errors,
            "lost": self.lost,
            "bad_refusals": self.bad_refusals,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "hit_time_limit": self.hit_time_limit,
            "requests_per_second": self.requests_per_sec(),
            "completed_per_second": self.completed_per_sec(),
            "completed_latency_seconds": latency_json(&self.completed_latencies),
            "busy_latency_seconds": latency_json(&self.busy_latencies),
            "problems": self.problems,
            "passed": self.passed(),
            "verdict": self.verdict(),
        })
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "workload: {}", self.workload)?;
        writeln!(
            f,
            "{} clients, {} requests in {:.2} s{}",
            self.clients,
            self.sent,
            self.elapsed.as_secs_f64(),
            if self.hit_time_limit {
                " (stopped by the time limit)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "requests/s: {:.1} (completed/s: {:.1})",
            self.requests_per_sec(),
            self.completed_per_sec()
        )?;
        writeln!(
            f,
            "completed:          {:>6}   latency {}",
            self.completed,
            latency_text(&self.completed_latencies)
        )?;
        writeln!(
            f,
            "refused busy (429): {:>6}   latency {}",
            self.busy,
            latency_text(&self.busy_latencies)
        )?;
        writeln!(f, "other errors:       {:>6}", self.errors)?;
        writeln!(
            f,
            "lost:               {:>6}   (accepted, no result)",
            self.lost
        )?;
        writeln!(f, "bad refusals:       {:>6}", self.bad_refusals)?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        write!(f, "{}", self.verdict())
    }
}

/// The nearest-rank `q` quantile of sorted durations.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn latency_json(sorted: &[Duration]) -> Value {
    let at = |q| percentile(sorted, q).map(|d| d.as_secs_f64());
    json!({"p50": at(0.5), "p99": at(0.99), "max": sorted.last().map(Duration::as_secs_f64)})
}

fn latency_text(sorted: &[Duration]) -> String {
    match (percentile(sorted, 0.5), percentile(sorted, 0.99)) {
        (Some(p50), Some(p99)) => format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        ),
        _ => "-".to_string(),
    }
}

/// Runs the load and reports. Clients take request numbers from one counter until
/// `max_requests` are taken or `max_duration` has passed.
pub async fn run(config: LoadConfig) -> Report {
    let config = Arc::new(config);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut clients = Vec::with_capacity(config.clients);
    for _ in 0..config.clients.max(1) {
        let config = config.clone();
        let next = next.clone();
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(config.request_timeout)
                .build()
                .expect("an HTTP client with default TLS settings builds");
            let mut samples = Vec::new();
            loop {
                if start.elapsed() >= config.max_duration {
                    break;
                }
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= config.max_requests {
                    break;
                }
                let sent = Instant::now();
                let outcome = one_request(&http, &config, index).await;
                let busy = outcome == Outcome::Busy;
                samples.push(Sample {
                    outcome,
                    latency: sent.elapsed(),
                });
                if busy && !config.busy_pause.is_zero() {
                    tokio::time::sleep(config.busy_pause).await;
                }
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for client in clients {
        match client.await {
            Ok(mut s) => samples.append(&mut s),
            Err(e) => samples.push(Sample {
                outcome: Outcome::Lost(format!("a client task failed: {e}")),
                latency: Duration::ZERO,
            }),
        }
    }
    Report::new(&config, samples, start.elapsed())
}

async fn one_request(http: &reqwest::Client, config: &LoadConfig, index: usize) -> Outcome {
    let base = &config.base_url;
    let request = match &config.workload {
        Workload::Ping => http
            .post(format!("{base}/v1"))
            .json(&json!([{"taskType": "ping", "ping": true}])),
        Workload::Health => http.get(format!("{base}/health")),
        Workload::Generate {
            model,
            width,
            height,
            steps,
        } => http
            .post(format!("{base}/v1/images/generate"))
            .json(&json!({
                "model": model,
                "prompt": format!("load test {index}"),
                "width": width,
                "height": height,
                "steps": steps,
                "seed": index + 1,
            })),
    };
    let request = match &config.key {
        Some(key) => request.bearer_auth(key),
        None => request,
    };
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Outcome::Error(format!("no connection: {e}")),
        Err(e) => return Outcome::Lost(format!("no answer: {e}")),
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(e) => return Outcome::Lost(format!("status {status}, body cut off: {e}")),
    };
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match status {
        200 => match check_result(&config.workload, &headers, &body) {
            Ok(()) => Outcome::Completed,
            Err(m) => Outcome::Lost(format!("status 200 without a valid result: {m}")),
        },
        429 => match check_busy(&config.workload, &headers, &body) {
            Ok(()) => Outcome::Busy,
            Err(m) => Outcome::BadRefusal(format!("{m}: {}", text())),
        },
        500..=599 if !is_shutting_down(&body) => {
            Outcome::Lost(format!("status {status}: {}", text()))
        }
        _ => Outcome::Error(format!("status {status}: {}", text())),
    }
}

/// A 503 saying the server is stopping refused the request before admitting it.
fn is_shutting_down(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v["error"]["code"] == "shutting_down")
}

fn check_result(
    workload: &Workload,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    match workload {
        Workload::Ping => {
            let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
            let item = &v["data"][0];
            if item["taskType"] == "ping" && item["pong"] == true {
                Ok(())
            } else {
                Err(format!("not a pong: {v}"))
            }
        }
        Workload::Health => {
            let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
            if v["status"].is_string() {
                Ok(())
            } else {
                Err(format!("no status: {v}"))
            }
        }
        Workload::Generate { width, height, .. } => {
            let content_type = headers
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if content_type != "image/png" {
                return Err(format!("content type {content_type:?}"));
            }
            let image = image::load_from_memory_with_format(body, image::ImageFormat::Png)
                .map_err(|e| format!("not a PNG: {e}"))?;
            if (image.width(), image.height()) != (*width, *height) {
                return Err(format!(
                    "a {}x{} image, {width}x{height} requested",
                    image.width(),
                    image.height()
                ));
            }
            Ok(())
        }
    }
}

/// The clean busy refusal of each route: the bearer dialect's `server_busy` error with
/// `Retry-After`; Runware's `errors` array.
fn check_busy(
    workload: &Workload,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("429 body not JSON ({e})"))?;
    match workload {
        Workload::Generate { .. } => {
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if retry_after.is_none() {
                return Err("429 without a Retry-After in seconds".into());
            }
            let error = &v["error"];
            if error["code"] != "server_busy" || !error["message"].is_string() {
                return Err("429 without the `server_busy` error body".into());
            }
            Ok(())
        }
        Workload::Ping => {
            if v["errors"][0]["code"].is_string() && v["errors"][0]["message"].is_string() {
                Ok(())
            } else {
                Err("429 without an `errors` item".into())
            }
        }
        Workload::Health => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: u64| Duration::from_millis(v);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.5), Some(ms(50)));
        assert_eq!(percentile(&sorted, 0.99), Some(ms(99)));
        assert_eq!(percentile(&[ms(7)], 0.99), Some(ms(7)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
