//! The load tool's driver against a real server: under more concurrent clients than the queue
//! holds, every generation either completes with a valid PNG or is refused at once in the clean
//! busy shape, nothing is lost, and the server's own counts agree with the clients'.

mod common;

// The whole driver, of which the command line uses parts these tests do not.
#[allow(dead_code)]
#[path = "../examples/loadtest/driver.rs"]
mod driver;

use std::time::Duration;

use common::server::{TestServer, KEY};
use driver::{LoadConfig, Workload};

fn config(server: &TestServer, workload: Workload, clients: usize, requests: usize) -> LoadConfig {
    LoadConfig {
        base_url: server.base.clone(),
        key: Some(KEY.to_string()),
        workload,
        clients,
        max_requests: requests,
        max_duration: Duration::from_secs(60),
        request_timeout: Duration::from_secs(120),
        busy_pause: Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_complete_or_are_refused_cleanly() {
    let server = TestServer::start_with("load-generate", |config| config.queue_capacity = 4).await;
    let workload = Workload::Generate {
        model: "tiny-sd15".to_string(),
        width: 128,
        height: 128,
        steps: 10,
    };
    let report = driver::run(config(&server, workload, 8, 40)).await;
    println!("{report}");

    assert!(report.passed(), "{report}");
    assert_eq!(report.sent, 40, "{report}");
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.completed + report.busy, report.sent, "{report}");
    assert!(report.completed >= 1, "{report}");
    // Eight clients on a queue of four: some are turned away, and at once.
    assert!(report.busy >= 1, "{report}");
    let slowest_refusal = report.busy_latencies.last().copied().unwrap_or_default();
    assert!(slowest_refusal < Duration::from_secs(5), "{report}");

    let stats = server.state.engine().stats();
    assert_eq!(stats.completed as usize, report.completed, "{stats:?}");
    assert_eq!(stats.refused as usize, report.busy, "{stats:?}");
    assert_eq!(
        (stats.failed, stats.cancelled, stats.running, stats.queued),
        (0, 0, 0, 0)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheap_route_under_load() {
    let server = TestServer::start("load-health").await;
    let report = driver::run(config(&server, Workload::Health, 8, 400)).await;
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.completed, 400, "{report}");
    assert!(report.requests_per_sec() > 0.0);
    server.stop().await;
}
