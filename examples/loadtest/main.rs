//! Load test of a running sd-serve: N concurrent clients over HTTP, bounded in requests and
//! time, reporting requests/s, latency p50/p99 and how each request ended.
//!
//! ```text
//! sd-serve serve --models tests/fixtures/models.toml --api-key K --device cpu \
//!     --listen 127.0.0.1:7860 --queue-capacity 4
//! cargo run --release --example loadtest -- --url http://127.0.0.1:7860 --key K \
//!     --workload ping --clients 32 --requests 20000 --duration 30
//! cargo run --release --example loadtest -- --url http://127.0.0.1:7860 --key K \
//!     --workload generate --model tiny-sd15 --width 128 --height 128 --steps 10 \
//!     --clients 8 --requests 200 --duration 60 --busy-pause 0.2
//! ```
//!
//! Workloads: `ping` (Runware's ping task, `POST /v1`), `health` (`GET /health`), `generate`
//! (one image per request through `POST /v1/images/generate`). Exit status: 0 when every request
//! the server accepted came back complete and every refusal was the clean 429 busy shape; 1
//! when one was lost or a refusal was not clean; 2 when nothing completed at all (a wrong URL,
//! key or model).

mod driver;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use driver::{LoadConfig, Workload};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorkloadName {
    /// Runware `ping` over HTTP (`POST /v1`).
    Ping,
    /// `GET /health`.
    Health,
    /// Bearer-dialect generations (`POST /v1/images/generate`).
    Generate,
}

#[derive(Debug, Parser)]
#[command(about = "Drive a running sd-serve with concurrent clients and report")]
struct Args {
    /// Base URL of the server, e.g. http://127.0.0.1:7860.
    #[arg(long)]
    url: String,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long)]
    key: Option<String>,
    #[arg(long, value_enum)]
    workload: WorkloadName,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Seconds after which no new request starts.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds to wait for one answer.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Seconds a client refused as busy waits before its next request (0: none, so refusals
    /// use up `--requests` at once; 1 follows the bearer dialect's Retry-After).
    #[arg(long, default_value_t = 0.0)]
    busy_pause: f64,
    /// Model of `generate` (a registry id or alias).
    #[arg(long, default_value = "tiny-sd15")]
    model: String,
    /// Image size of `generate`: multiples of 64, at least 128 (the bearer dialect's limits).
    #[arg(long, default_value_t = 128)]
    width: u32,
    #[arg(long, default_value_t = 128)]
    height: u32,
    /// Steps of `generate`: 10..=50.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let workload = match args.workload {
        WorkloadName::Ping => Workload::Ping,
        WorkloadName::Health => Workload::Health,
        WorkloadName::Generate => Workload::Generate {
            model: args.model,
            width: args.width,
            height: args.height,
            steps: args.steps,
        },
    };
    let seconds = |s: f64| Duration::from_secs_f64(s.max(0.0));
    let report = driver::run(LoadConfig {
        base_url: args.url.trim_end_matches('/').to_string(),
        key: args.key,
        workload,
        clients: args.clients.max(1),
        max_requests: args.requests,
        max_duration: seconds(args.duration),
        request_timeout: seconds(args.timeout),
        busy_pause: seconds(args.busy_pause),
    })
    .await;
    if args.json {
        println!("{:#}", report.to_json());
    } else {
        println!("{report}");
    }
    if !report.passed() {
        ExitCode::from(1)
    } else if report.completed == 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
