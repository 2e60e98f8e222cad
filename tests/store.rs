//! The image and job store: atomic image files found only by well-formed ids, job records that
//! survive reopening, retention that removes exactly what has expired.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sd_serve::store::{
    ImageFormat, ImageId, JobRecord, JobStatus, PurgeReport, Store, StoreError, TEMP_LINK_TTL,
};
use serde_json::json;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("sd-serve-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn open_creates_layout_and_store_is_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();

    let dir = TempDir::new();
    let root = dir.0.join("nested");
    let _store = Store::open(&root).unwrap();
    assert!(root.join("images").is_dir());
    assert!(root.join("jobs.sqlite3").is_file());
}

#[test]
fn put_then_get_image() {
    let dir = TempDir::new();
    let store = Store::open(&dir.0).unwrap();
    let bytes = b"\x89PNG\r\n\x1a\n not really an image, the store does not care";
    let id = store.put_image(bytes, ImageFormat::Png, None).unwrap();

    let found = store.image(&id.to_string()).unwrap().expect("stored image");
    assert_eq!(found.content_type, "image/png");
    assert_eq!(found.format, ImageFormat::Png);
    assert_eq!(found.path, dir.0.join("images").join(format!("{id}.png")));
    assert_eq!(std::fs::read(&found.path).unwrap(), bytes);

    // Upper-case hex is the same UUID; the path is built from the parsed id.
    let upper = store
        .image(&id.to_string().to_uppercase())
        .unwrap()
        .unwrap();
    assert_eq!(upper.path, found.path);

    let jpeg = store.put_image(b"jpeg", ImageFormat::Jpeg, None).unwrap();
    let found = store.image(&jpeg.to_string()).unwrap().unwrap();
    assert_eq!(found.content_type, "image/jpeg");
    assert!(found.path.to_string_lossy().ends_with(".jpg"));
    assert_ne!(id, jpeg);

    // No temp file is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.0.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn image_lookup_accepts_only_uuids() {
    let dir = TempDir::new();
    let store = Store::open(&dir.0).unwrap();
    let id = store.put_image(b"x", ImageFormat::Webp, None).unwrap();
    let s = id.to_string();

    for bad in [
        "../x".to_string(),
        "a/b".to_string(),
        String::new(),
        "not-a-uuid".to_string(),
        format!("../{s}"),
        format!("{s}/"),
        format!("{s}.webp"),
        format!("{{{s}}}"),
        format!("urn:uuid:{s}"),
        s.replace('-', ""),
        format!("images/{s}"),
        "..".to_string(),
        "/etc/passwd".to_string(),
        "........-....-....-....-............".to_string(),
    ] {
        assert!(ImageId::parse(&bad).is_none(), "{bad:?} parsed");
        assert!(store.image(&bad).unwrap().is_none(), "{bad:?} found");
    }
    // A well-formed id that was never stored is simply absent.
    assert!(store.image(&ImageId::new().to_string()).unwrap().is_none());

    assert_eq!(
        ImageId::parse_file_name(&format!("{s}.webp")),
        Some((id, ImageFormat::Webp))
    );
    assert_eq!(ImageId::parse_file_name(&format!("{s}.exe")), None);
    assert_eq!(ImageId::parse_file_name("../x.png"), None);
}

#[test]
fn expired_image_is_not_served() {
    let dir = TempDir::new();
    let store = Store::open(&dir.0).unwrap();
    let past = SystemTime::now() - Duration::from_secs(1);
    let id = store
        .put_image(b"old", ImageFormat::Png, Some(past))
        .unwrap();
    assert!(store.image(&id.to_string()).unwrap().is_none());
}

#[test]
fn jobs_insert_update_get() {
    let dir = TempDir::new();
    let store = Store::open(&dir.0).unwrap();
    let request = json!({"prompt": "a red fox", "width": "512"});
    let job = JobRecord::new("81234567", "modelslab", request.clone(), None);
    store.insert_job(&job).unwrap();

    let got = store.get_job("81234567").unwrap().unwrap();
    assert_eq!(got.status, JobStatus::Queued);
    assert_eq!(got.dialect, "modelslab");
    assert_eq!(got.request_json, request);
    assert_eq!(got.result_json, None);

    assert!(matches!(
        store.insert_job(&job),
        Err(StoreError::DuplicateJob(id)) if id == "81234567"
    ));

    assert!(store
        .update_job_status("81234567", JobStatus::Processing)
        .unwrap());
    assert_eq!(
        store.get_job("81234567").unwrap().unwrap().status,
        JobStatus::Processing
    );

    let result = json!({"output": ["http://host/images/x.png"], "seed": [42]});
    assert!(store.update_job_result("81234567", &result).unwrap());
    let got = store.get_job("81234567").unwrap().unwrap();
    assert_eq!(got.status, JobStatus::Success);
    assert!(got.status.is_finished());
    assert_eq!(got.result_json, Some(result));
    assert!(got.updated_at >= got.created_at);

    let other = JobRecord::new("5b8e...-task", "runware", json!({}), None);
    store.insert_job(&other).unwrap();
    assert!(store
        .update_job_error("5b8e...-task", "out of memory")
        .unwrap());
    let got = store.get_job("5b8e...-task").unwrap().unwrap();
    assert_eq!(got.status, JobStatus::Error);
    assert_eq!(got.error.as_deref(), Some("out of memory"));

    assert!(store.get_job("missing").unwrap().is_none());
    assert!(!store
        .update_job_status("missing", JobStatus::Success)
        .unwrap());
    assert!(!store.update_job_result("missing", &json!(null)).unwrap());
}

#[test]
fn reopen_keeps_images_and_jobs() {
    let dir = TempDir::new();
    let (image_id, result) = {
        let store = Store::open(&dir.0).unwrap();
        let id = store.put_image(b"kept", ImageFormat::Png, None).unwrap();
        let job = JobRecord::new("42", "modelslab", json!({"prompt": "p"}), None);
        store.insert_job(&job).unwrap();
        let result = json!({"output": [format!("/images/{id}.png")]});
        store.update_job_result("42", &result).unwrap();
        (id, result)
    };
    // A temp file from an interrupted write is cleaned up on open.
    std::fs::write(dir.0.join("images").join(".tmp-leftover.png"), b"partial").unwrap();

    let store = Store::open(&dir.0).unwrap();
    let job = store
        .get_job("42")
        .unwrap()
        .expect("job survives a restart");
    assert_eq!(job.status, JobStatus::Success);
    assert_eq!(job.result_json, Some(result));
    let image = store.image(&image_id.to_string()).unwrap().unwrap();
    assert_eq!(std::fs::read(image.path).unwrap(), b"kept");
    assert!(!dir.0.join("images").join(".tmp-leftover.png").exists());
}

#[test]
fn purge_removes_expired_only() {
    let dir = TempDir::new();
    let store = Store::open(&dir.0).unwrap();
    let now = SystemTime::now();
    let soon = now + Duration::from_secs(60);
    let temp = now + TEMP_LINK_TTL;
    assert_eq!(TEMP_LINK_TTL, Duration::from_secs(86_400));

    let forever = store.put_image(b"a", ImageFormat::Png, None).unwrap();
    let short = store.put_image(b"b", ImageFormat::Png, Some(soon)).unwrap();
    let day = store
        .put_image(b"c", ImageFormat::Jpeg, Some(temp))
        .unwrap();
    store
        .insert_job(&JobRecord::new("keep", "modelslab", json!({}), None))
        .unwrap();
    store
        .insert_job(&JobRecord::new("short", "modelslab", json!({}), Some(soon)))
        .unwrap();
    store
        .insert_job(&JobRecord::new("day", "runware", json!({}), Some(temp)))
        .unwrap();
    let short_path = store.image(&short.to_string()).unwrap().unwrap().path;

    // Nothing has expired yet.
    assert_eq!(store.purge_expired(now).unwrap(), PurgeReport::default());

    let report = store
        .purge_expired(now + Duration::from_secs(3600))
        .unwrap();
    assert_eq!(report, PurgeReport { images: 1, jobs: 1 });
    assert!(!short_path.exists());
    assert!(store.get_job("short").unwrap().is_none());
    assert!(store.get_job("keep").unwrap().is_some());
    assert!(store.get_job("day").unwrap().is_some());
    assert!(store.image(&forever.to_string()).unwrap().is_some());
    assert!(store.image(&day.to_string()).unwrap().is_some());

    let report = store
        .purge_expired(now + TEMP_LINK_TTL + Duration::from_secs(1))
        .unwrap();
    assert_eq!(report, PurgeReport { images: 1, jobs: 1 });
    assert!(store.get_job("day").unwrap().is_none());
    assert!(store.image(&day.to_string()).unwrap().is_none());
    assert!(store.image(&forever.to_string()).unwrap().is_some());
    assert!(store.get_job("keep").unwrap().is_some());
    let files = std::fs::read_dir(dir.0.join("images")).unwrap().count();
    assert_eq!(files, 1);
}
