//! LoRAs through the engine: a job's LoRAs give the image of the pipeline with those LoRAs merged
//! directly, switching sets between jobs gives each set's image (no LoRA: the plain model's, bit
//! for bit), and unknown or wrong-family LoRAs are refused naming them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use sd_serve::engine::{Engine, EngineConfig, Job, JobEvent, SubmitError};
use sd_serve::pipeline::{GenerationRequest, StableDiffusion};
use sd_serve::registry::Registry;
use sd_serve::schedulers::SchedulerSpec;
use sd_serve::weights::lora::{merge_loras, Lora};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(120);

fn registry() -> Arc<Registry> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models.toml");
    Arc::new(Registry::from_file(&path).expect("fixture registry"))
}

fn request(loras: &[(&str, f64)]) -> GenerationRequest {
    let mut req = GenerationRequest::new("a red cube on a table");
    req.width = 64;
    req.height = 64;
    req.steps = 2;
    req.seed = 77;
    req.scheduler = Some(SchedulerSpec::parse("DDIM").expect("DDIM is a scheduler name"));
    req.loras = loras.iter().map(|(id, w)| (id.to_string(), *w)).collect();
    req
}

/// The engine's image for `req` on `model`.
async fn engine_image(engine: &Engine, model: &str, req: GenerationRequest) -> image::RgbImage {
    let mut handle = engine
        .submit(Job {
            model: model.to_string(),
            request: req,
        })
        .unwrap_or_else(|e| panic!("admitted: {e}"));
    let mut image = None;
    loop {
        match timeout(WAIT, handle.recv()).await.expect("in time") {
            Some(JobEvent::Image { image: i, .. }) => image = Some(i),
            Some(JobEvent::Finished) => break,
            Some(JobEvent::Failed(e)) => panic!("job failed: {e}"),
            Some(_) => {}
            None => panic!("no Finished event"),
        }
    }
    image.expect("one image")
}

/// The pipeline's image for `req` with `loras` (registry ids) merged into freshly loaded files.
fn direct_image(model: &str, req: &GenerationRequest, loras: &[(&str, f64)]) -> image::RgbImage {
    let reg = registry();
    let mut files = reg
        .resolve_id(model)
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    let parsed: Vec<(Lora, f64)> = loras
        .iter()
        .map(|(id, w)| {
            let path = reg.resolve_lora(id).unwrap().local_path().unwrap();
            (Lora::load(&path, &Device::Cpu).unwrap(), *w)
        })
        .collect();
    if !parsed.is_empty() {
        let pairs: Vec<(&Lora, f64)> = parsed.iter().map(|(l, w)| (l, *w)).collect();
        // Kept merged: these files serve this one image.
        let _merged = merge_loras(&mut files, &pairs).unwrap();
    }
    let model = StableDiffusion::load(&files, &Device::Cpu, DType::F32).unwrap();
    let mut plain = req.clone();
    plain.loras.clear();
    let images = model.generate(&plain, &mut |_, _| true).unwrap();
    images.to_rgb().unwrap().remove(0)
}

#[tokio::test]
async fn switching_lora_sets_gives_each_sets_image() {
    let engine = Engine::start(EngineConfig::new(vec![Device::Cpu]), registry()).unwrap();
    let a: &[(&str, f64)] = &[("tiny-sd15-lora-kohya", 0.8)];
    // The PEFT LoRA by itself, then with the kohya one under its civitai alias, subtracted.
    let b: &[(&str, f64)] = &[
        ("tiny-sd15-lora-peft", 1.0),
        ("civitai:132942@146296", -0.5),
    ];
    let plain = direct_image("tiny-sd15", &request(&[]), &[]);
    let with_a = direct_image("tiny-sd15", &request(a), a);
    let with_b = direct_image("tiny-sd15", &request(b), b);
    assert_ne!(
        plain.as_raw(),
        with_a.as_raw(),
        "the LoRA changes the image"
    );
    assert_ne!(with_a.as_raw(), with_b.as_raw());

    for (set, expected, what) in [
        (a, &with_a, "A"),
        (b, &with_b, "B"),
        (&[][..], &plain, "none"),
        (a, &with_a, "A again"),
        (a, &with_a, "A repeated"),
        (&[][..], &plain, "none again"),
    ] {
        let got = engine_image(&engine, "tiny-sd15", request(set)).await;
        assert!(
            got.as_raw() == expected.as_raw(),
            "{what}: the engine's image differs from the pipeline's"
        );
    }
    let stats = engine.stats();
    assert_eq!((stats.model_loads, stats.completed), (1, 6));
}

#[tokio::test]
async fn unknown_and_wrong_family_loras_are_refused_at_submit() {
    let engine = Engine::start(EngineConfig::new(vec![Device::Cpu]), registry()).unwrap();
    let submit = |model: &str, lora: &str| {
        engine.submit(Job {
            model: model.to_string(),
            request: request(&[(lora, 1.0)]),
        })
    };
    match submit("tiny-sd15", "no-such-lora") {
        Err(SubmitError::Invalid(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("unknown LoRA `no-such-lora`"), "{msg}");
            assert!(msg.contains("tiny-sd15-lora-kohya"), "{msg}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // A path is not a LoRA id.
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loras/sd15_kohya.safetensors");
    assert!(matches!(
        submit("tiny-sd15", path.to_str().unwrap()),
        Err(SubmitError::Invalid(_))
    ));
    match submit("tiny-sdxl", "tiny-sd15-lora-kohya") {
        Err(SubmitError::Invalid(e)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("tiny-sd15-lora-kohya") && msg.contains("sd1") && msg.contains("sdxl"),
                "{msg}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let refused = engine.submit(Job {
        model: "tiny-sd15".into(),
        request: request(&[("tiny-sd15-lora-kohya", f64::INFINITY)]),
    });
    match refused {
        Err(SubmitError::Invalid(e)) => assert!(e.to_string().contains("finite"), "{e}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn an_sdxl_lora_runs_on_sdxl() {
    let engine = Engine::start(EngineConfig::new(vec![Device::Cpu]), registry()).unwrap();
    let set: &[(&str, f64)] = &[("tiny-sdxl-lora-kohya", 1.0)];
    let expected = direct_image("tiny-sdxl", &request(set), set);
    let got = engine_image(&engine, "tiny-sdxl", request(set)).await;
    assert!(got.as_raw() == expected.as_raw());
    let plain = engine_image(&engine, "tiny-sdxl", request(&[])).await;
    assert_ne!(plain.as_raw(), got.as_raw());
}
