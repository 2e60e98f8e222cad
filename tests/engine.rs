//! The engine on the tiny fixture models: event order, images equal to the pipeline's, immediate
//! refusal when full, cancellation by dropping or cancelling a handle, failures that leave the
//! worker running, and shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use sd_serve::engine::{Engine, EngineConfig, Job, JobEvent, JobHandle, SubmitError};
use sd_serve::pipeline::{GenerationRequest, StableDiffusion};
use sd_serve::registry::Registry;
use sd_serve::schedulers::SchedulerSpec;
use sd_serve::Error;
use tokio::time::timeout;

/// Generous: the machine running the tests may be shared; a tiny job takes well under a second.
const WAIT: Duration = Duration::from_secs(120);

fn registry() -> Arc<Registry> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models.toml");
    Arc::new(Registry::from_file(&path).expect("fixture registry"))
}

fn engine(queue_capacity: usize) -> Engine {
    let mut config = EngineConfig::new(vec![Device::Cpu]);
    config.queue_capacity = queue_capacity;
    Engine::start(config, registry()).expect("engine starts")
}

/// Runs `jobs` one after the other; each must finish.
async fn run_in_turn(engine: &Engine, models: &[&str]) {
    for model in models {
        let mut handle = engine.submit(job(model, request(2, 1, 1))).unwrap();
        let events = events(&mut handle).await;
        assert!(
            matches!(events.last(), Some(JobEvent::Finished)),
            "{model}: {events:?}"
        );
    }
}

fn request(steps: usize, num_images: usize, seed: u64) -> GenerationRequest {
    let mut req = GenerationRequest::new("a red cube on a table");
    req.width = 64;
    req.height = 64;
    req.steps = steps;
    req.num_images = num_images;
    req.seed = seed;
    // One progress event per step (PNDM, the fixture's own scheduler, adds warm-up evaluations).
    req.scheduler = Some(SchedulerSpec::parse("DDIM").expect("DDIM is a scheduler name"));
    req
}

fn job(model: &str, request: GenerationRequest) -> Job {
    Job {
        model: model.to_string(),
        request,
    }
}

async fn next(handle: &mut JobHandle) -> Option<JobEvent> {
    timeout(WAIT, handle.recv())
        .await
        .expect("the job reports within the time limit")
}

/// Every event up to and including `Finished` or `Failed`.
async fn events(handle: &mut JobHandle) -> Vec<JobEvent> {
    let mut out = Vec::new();
    while let Some(event) = next(handle).await {
        let last = matches!(event, JobEvent::Finished | JobEvent::Failed(_));
        out.push(event);
        if last {
            break;
        }
    }
    out
}

/// Waits for the progress event of `step`.
async fn wait_for_step(handle: &mut JobHandle, step: usize) {
    loop {
        match next(handle).await {
            Some(JobEvent::Progress { step: s, .. }) if s >= step => return,
            Some(JobEvent::Started | JobEvent::Progress { .. }) => {}
            other => panic!("expected progress, got {other:?}"),
        }
    }
}

/// Polls `cond` on the engine's stats until it holds.
async fn wait_until(
    engine: &Engine,
    what: &str,
    cond: impl Fn(&sd_serve::engine::EngineStats) -> bool,
) {
    let start = Instant::now();
    while !cond(&engine.stats()) {
        assert!(start.elapsed() < WAIT, "{what}: stats {:?}", engine.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_job_streams_its_steps_and_images_equal_to_the_pipeline() {
    let engine = engine(4);
    let req = request(4, 2, 1234);
    let mut handle = engine.submit(job("tiny-sd15", req.clone())).unwrap();
    let events = events(&mut handle).await;

    assert!(matches!(events[0], JobEvent::Started), "{events:?}");
    let steps: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress { step, total } => Some((*step, *total)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    let images: Vec<(usize, u64, &image::RgbImage)> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Image { index, seed, image } => Some((*index, *seed, image)),
            _ => None,
        })
        .collect();
    assert_eq!(images.len(), 2);
    assert!(
        matches!(events.last(), Some(JobEvent::Finished)),
        "{events:?}"
    );
    // Images come after the last step, before `Finished`.
    let first_image = events
        .iter()
        .position(|e| matches!(e, JobEvent::Image { .. }))
        .unwrap();
    assert_eq!(first_image, 5);

    let entry = registry().resolve_id("tiny-sd15").unwrap();
    let files = entry.load(&Device::Cpu, DType::F32).unwrap();
    let model = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
    let reference = model.generate(&req, &mut |_, _| true).unwrap();
    let expected = reference.to_rgb().unwrap();
    for (i, (index, seed, image)) in images.into_iter().enumerate() {
        assert_eq!(index, i);
        assert_eq!(seed, 1234 + i as u64);
        assert_eq!(image.dimensions(), (64, 64));
        assert!(
            image.as_raw() == expected[i].as_raw(),
            "image {i} differs from StableDiffusion::generate"
        );
    }
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.running, stats.queued), (1, 0, 0));
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let engine = engine(1);
    let _running = engine.submit(job("tiny-sd15", request(50, 1, 1))).unwrap();
    for _ in 0..2 {
        let start = Instant::now();
        let refused = engine.submit(job("tiny-sd15", request(50, 1, 1)));
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "submit blocked"
        );
        match refused {
            Err(SubmitError::QueueFull { capacity }) => assert_eq!(capacity, 1),
            other => panic!("expected QueueFull, got {other:?}"),
        }
    }
    assert_eq!(engine.stats().refused, 2);
}

#[tokio::test]
async fn dropping_a_running_handle_stops_the_job_and_the_next_one_runs() {
    let engine = engine(4);
    let mut slow = engine.submit(job("tiny-sd15", request(50, 1, 1))).unwrap();
    wait_for_step(&mut slow, 2).await;
    drop(slow);
    // Run to its end it would count as completed; stopped between steps it counts as cancelled.
    wait_until(&engine, "the dropped job ends", |s| s.running == 0).await;
    let stats = engine.stats();
    assert_eq!((stats.cancelled, stats.completed), (1, 0), "{stats:?}");

    let mut next_job = engine.submit(job("tiny-sd15", request(2, 1, 2))).unwrap();
    let events = events(&mut next_job).await;
    assert!(
        matches!(events.last(), Some(JobEvent::Finished)),
        "{events:?}"
    );
    assert_eq!(engine.stats().completed, 1);
}

#[tokio::test]
async fn cancel_stops_progress_between_steps() {
    let engine = engine(4);
    let mut handle = engine.submit(job("tiny-sd15", request(50, 1, 1))).unwrap();
    wait_for_step(&mut handle, 1).await;
    handle.cancel();
    let rest = events(&mut handle).await;
    let last_step = rest
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress { step, .. } => Some(*step),
            _ => None,
        })
        .max()
        .unwrap_or(1);
    assert!(last_step < 50, "the job ran to the end: {rest:?}");
    assert!(!rest.iter().any(|e| matches!(e, JobEvent::Image { .. })));
    assert!(
        matches!(rest.last(), Some(JobEvent::Failed(Error::Cancelled))),
        "{rest:?}"
    );
    assert_eq!(engine.stats().cancelled, 1);
}

#[tokio::test]
async fn a_waiting_job_dropped_never_starts() {
    let engine = engine(4);
    let mut first = engine.submit(job("tiny-sd15", request(20, 1, 1))).unwrap();
    let waiting = engine.submit(job("tiny-sd15", request(4, 1, 1))).unwrap();
    wait_for_step(&mut first, 1).await;
    drop(waiting);
    // It leaves the queue at once, freeing its slot.
    let stats = engine.stats();
    assert_eq!((stats.queued, stats.cancelled), (0, 1), "{stats:?}");
    let events = events(&mut first).await;
    assert!(matches!(events.last(), Some(JobEvent::Finished)));
    wait_until(&engine, "the first job ends", |s| s.running == 0).await;
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.cancelled), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn an_unknown_model_fails_the_job_not_the_worker() {
    let engine = engine(4);
    let mut handle = engine
        .submit(job("no-such-model", request(2, 1, 1)))
        .unwrap();
    let events = events(&mut handle).await;
    match events.last() {
        Some(JobEvent::Failed(e @ Error::UnknownModel(_))) => {
            let msg = e.to_string();
            assert!(msg.contains("unknown model `no-such-model`"), "{msg}");
            assert!(
                msg.contains("tiny-sd15"),
                "the known models are listed: {msg}"
            );
        }
        other => panic!("expected an unknown-model failure, got {other:?}"),
    }
    let mut ok = engine.submit(job("tiny-sd15", request(2, 1, 1))).unwrap();
    assert!(matches!(
        self::events(&mut ok).await.last(),
        Some(JobEvent::Finished)
    ));
    let stats = engine.stats();
    assert_eq!((stats.failed, stats.completed), (1, 1));
}

#[tokio::test]
async fn invalid_requests_are_refused_at_submit() {
    let engine = engine(4);
    let mut req = request(2, 1, 1);
    req.width = 60;
    match engine.submit(job("tiny-sd15", req)) {
        Err(SubmitError::Invalid(e)) => assert!(e.to_string().contains("`width`"), "{e}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let stats = engine.stats();
    assert_eq!((stats.invalid, stats.queued, stats.refused), (1, 0, 0));
}

#[tokio::test]
async fn shutdown_refuses_new_jobs_and_finishes_the_running_one() {
    let engine = Arc::new(engine(4));
    let mut running = engine.submit(job("tiny-sd15", request(10, 1, 1))).unwrap();
    wait_for_step(&mut running, 1).await;
    let stopping = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.shutdown(WAIT))
    };
    let start = Instant::now();
    loop {
        match engine.submit(job("tiny-sd15", request(2, 1, 1))) {
            Err(SubmitError::ShuttingDown) => break,
            // Shutdown has not begun yet: this job is admitted and must finish too.
            Ok(handle) => drop(handle),
            Err(e) => panic!("expected ShuttingDown, got {e}"),
        }
        assert!(start.elapsed() < WAIT, "shutdown never began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let events = events(&mut running).await;
    assert!(
        matches!(events.last(), Some(JobEvent::Finished)),
        "{events:?}"
    );
    let finished_in_time = timeout(WAIT, stopping).await.unwrap().unwrap();
    assert!(finished_in_time);
    assert_eq!(engine.stats().completed, 1);
}

#[tokio::test]
async fn shutdown_past_its_deadline_cancels_running_and_waiting_jobs() {
    let engine = Arc::new(engine(4));
    let mut running = engine.submit(job("tiny-sd15", request(200, 1, 1))).unwrap();
    let mut waiting = engine.submit(job("tiny-sd15", request(4, 1, 1))).unwrap();
    wait_for_step(&mut running, 1).await;
    let stopping = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.shutdown(Duration::ZERO))
    };
    let finished_in_time = timeout(WAIT, stopping).await.unwrap().unwrap();
    assert!(!finished_in_time);
    for handle in [&mut running, &mut waiting] {
        let events = events(handle).await;
        assert!(
            matches!(events.last(), Some(JobEvent::Failed(Error::Cancelled))),
            "{events:?}"
        );
    }
    let stats = engine.stats();
    assert_eq!((stats.cancelled, stats.completed, stats.running), (2, 0, 0));
}

#[tokio::test]
async fn models_stay_cached_within_the_budget() {
    let engine = engine(4);
    run_in_turn(&engine, &["tiny-sd15", "tiny-sd2", "tiny-sd15", "tiny-sd2"]).await;
    let stats = engine.stats();
    assert_eq!((stats.model_loads, stats.model_evictions), (2, 0));
}

#[tokio::test]
async fn the_least_recently_used_model_is_evicted_beyond_the_budget() {
    let mut config = EngineConfig::new(vec![Device::Cpu]);
    // Smaller than any model: the cache keeps only the model in use.
    config.model_cache_bytes = 1;
    let engine = Engine::start(config, registry()).unwrap();
    run_in_turn(
        &engine,
        &["tiny-sd15", "tiny-sd15", "tiny-sd2", "tiny-sd15"],
    )
    .await;
    let stats = engine.stats();
    assert_eq!((stats.model_loads, stats.model_evictions), (3, 2));
}

#[tokio::test]
async fn each_device_runs_its_own_job() {
    let mut config = EngineConfig::new(vec![Device::Cpu, Device::Cpu]);
    config.queue_capacity = 4;
    let engine = Engine::start(config, registry()).unwrap();
    let mut a = engine.submit(job("tiny-sd15", request(200, 1, 1))).unwrap();
    let mut b = engine.submit(job("tiny-sd15", request(200, 1, 1))).unwrap();
    // Both progress at once: one worker would finish the first 200 steps before starting the next.
    wait_for_step(&mut a, 1).await;
    wait_for_step(&mut b, 1).await;
    assert_eq!(engine.stats().running, 2);
    a.cancel();
    b.cancel();
    wait_until(&engine, "both jobs stop", |s| s.running == 0).await;
    assert_eq!(engine.stats().cancelled, 2);
}

fn refined_job(start: f64) -> Job {
    let mut req = request(4, 1, 77);
    req.scheduler = Some(SchedulerSpec::parse("Euler").unwrap());
    req.refiner = Some(sd_serve::pipeline::Refiner {
        model: "tiny-sdxl-refiner".into(),
        start,
    });
    job("tiny-sdxl", req)
}

#[tokio::test]
async fn a_refined_job_hands_over_to_the_refiner_and_both_are_cached() {
    let engine = engine(4);
    let job = refined_job(0.5);
    let mut handle = engine.submit(job.clone()).unwrap();
    let seen = events(&mut handle).await;
    assert!(matches!(seen.last(), Some(JobEvent::Finished)), "{seen:?}");
    // Each share reports its own steps: 2 of the base, then 2 of the refiner.
    let steps: Vec<(usize, usize)> = seen
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress { step, total } => Some((*step, *total)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, [(1, 2), (2, 2), (1, 2), (2, 2)]);
    let image = seen
        .iter()
        .find_map(|e| match e {
            JobEvent::Image { image, .. } => Some(image.clone()),
            _ => None,
        })
        .expect("an image");
    let load = |id: &str| {
        let files = registry()
            .resolve_id(id)
            .unwrap()
            .load(&Device::Cpu, DType::F32)
            .unwrap();
        StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap()
    };
    let expected = load("tiny-sdxl")
        .generate_refined(&load("tiny-sdxl-refiner"), &job.request, &mut |_, _| true)
        .unwrap()
        .to_rgb()
        .unwrap();
    assert!(
        image.as_raw() == expected[0].as_raw(),
        "differs from generate_refined"
    );

    // Within the budget both stay loaded.
    let mut handle = engine.submit(refined_job(0.75)).unwrap();
    assert!(matches!(
        events(&mut handle).await.last(),
        Some(JobEvent::Finished)
    ));
    let stats = engine.stats();
    assert_eq!((stats.model_loads, stats.model_evictions), (2, 0));
}

#[tokio::test]
async fn a_budget_for_one_model_still_runs_refined_jobs() {
    let mut config = EngineConfig::new(vec![Device::Cpu]);
    // Smaller than any model: the refiner's load evicts the base, whose share is done.
    config.model_cache_bytes = 1;
    let engine = Engine::start(config, registry()).unwrap();
    for _ in 0..2 {
        let mut handle = engine.submit(refined_job(0.5)).unwrap();
        let events = events(&mut handle).await;
        assert!(
            matches!(events.last(), Some(JobEvent::Finished)),
            "{events:?}"
        );
    }
    let stats = engine.stats();
    assert_eq!((stats.model_loads, stats.model_evictions), (4, 3));
}

#[tokio::test]
async fn bad_refiners_are_refused_at_submit() {
    let engine = engine(4);
    for (model, refiner, words) in [
        ("tiny-sdxl", "no-such-model", &["no-such-model"][..]),
        (
            "tiny-sdxl",
            "tiny-sd2",
            &["tiny-sd2", "sd2", "sdxl-refiner"],
        ),
        ("tiny-sd15", "tiny-sdxl-refiner", &["SDXL", "sd1"]),
        (
            "tiny-sdxl-refiner",
            "tiny-sdxl-refiner",
            &["tiny-sdxl-refiner", "alone"],
        ),
    ] {
        let mut job = refined_job(0.5);
        job.model = model.into();
        job.request.refiner.as_mut().unwrap().model = refiner.into();
        match engine.submit(job) {
            Err(SubmitError::Invalid(e)) => {
                let message = e.to_string();
                for word in words {
                    assert!(message.contains(word), "{model} + {refiner}: {message}");
                }
            }
            other => panic!("{model} + {refiner}: expected a refusal, got {other:?}"),
        }
    }
}
