//! The model registry: models.toml parsing, ids and aliases, errors, and loading through every
//! source kind, with the hub served from a local cache only (HF_HUB_OFFLINE; no network).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{copy_dir, fixtures, max_abs_store_diff, registry, scratch, setup};
use sd_serve::registry::{HubOptions, Location, ModelSource, Registry};
use sd_serve::weights::{load_diffusers_folder, Family, PipelineFiles};
use sd_serve::Error;

/// A hub cache holding `repo` at `main` as a copy of `src` (a diffusers folder), in the layout
/// hf-hub writes: refs/main -> commit, snapshots/<commit>/...
fn fake_hub_repo(cache: &Path, repo: &str, src: &Path, skip: &dyn Fn(&Path) -> bool) -> PathBuf {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    copy_dir(src, &snapshot, skip);
    snapshot
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        offline: true,
        endpoint: None,
        token: None,
    }
}

/// Entry `id` of the registry `toml`, loaded from the hub cache `cache` alone.
fn load_from_cache(toml: &str, id: &str, cache: &Path) -> PipelineFiles {
    Registry::from_toml_str(toml, &fixtures())
        .unwrap()
        .resolve_id(id)
        .unwrap()
        .load_with(&offline(cache), &Device::Cpu, DType::F32)
        .unwrap()
}

#[test]
fn fixture_registry_resolves_ids_with_defaults() {
    setup();
    let reg = registry();
    let e = reg.resolve("tiny-sd15").unwrap();
    assert_eq!(e.family, Some(Family::Sd1));
    assert_eq!(e.defaults.steps, Some(4));
    assert_eq!(e.defaults.guidance, Some(7.5));
    assert_eq!((e.defaults.width, e.defaults.height), (Some(64), Some(64)));
    // Relative paths resolve against the toml's folder.
    assert_eq!(e.source, ModelSource::Folder(fixtures().join("tiny-sd15")));
    match reg.resolve("tiny-sdxl-single").unwrap().source {
        ModelSource::SingleFile { file, config, .. } => {
            assert_eq!(file, fixtures().join("tiny-sdxl.safetensors"));
            assert_eq!(config, Some(Location::Local(fixtures().join("tiny-sdxl"))));
        }
        other => panic!("{other:?}"),
    }
    let ids: Vec<&str> = reg.models().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "tiny-sd15",
            "tiny-sd2",
            "tiny-sdxl",
            "tiny-sd15-single",
            "tiny-sdxl-single",
            "tiny-sd15-curated",
            "tiny-sd15-inpaint",
            "tiny-sdxl-inpaint",
            "tiny-sdxl-refiner"
        ]
    );
    assert_eq!(
        reg.resolve("tiny-sdxl-refiner").unwrap().family,
        Some(Family::SdxlRefiner)
    );
    assert_eq!(
        reg.resolve_id("civitai:102438@133677").unwrap().id,
        "tiny-sd15"
    );
}

#[test]
fn ids_and_aliases_are_exact() {
    setup();
    let toml = r#"
[[model]]
id = "yBG2r9O"
aliases = ["civitai:102438@133677", "stable-diffusion-xl-base-1.0"]
path = "tiny-sdxl"
[model.defaults]
scheduler = "DPM++ 2M Karras"
negative_prompt = "blurry"
clip_skip = 2
"#;
    let reg = Registry::from_toml_str(toml, &fixtures()).unwrap();
    for name in [
        "yBG2r9O",
        "civitai:102438@133677",
        "stable-diffusion-xl-base-1.0",
    ] {
        let e = reg.resolve_id(name).unwrap();
        assert_eq!(e.id, "yBG2r9O");
        assert_eq!(e.defaults.clip_skip, Some(2));
        assert_eq!(e.defaults.negative_prompt.as_deref(), Some("blurry"));
    }
    let e = reg.resolve_id("ybg2r9o").unwrap_err();
    assert!(
        matches!(e, Error::UnknownModel(_)),
        "ids are case-sensitive"
    );
}

#[test]
fn unknown_ids_list_known_ones_and_how_to_add() {
    setup();
    let reg = registry();
    let e = reg.resolve("no-such-model").unwrap_err();
    let Error::UnknownModel(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(msg.contains("no-such-model"), "{msg}");
    assert!(
        msg.contains("tiny-sd15") && msg.contains("tiny-sdxl-single"),
        "{msg}"
    );
    assert!(
        msg.contains("[[model]]") && msg.contains("models.toml"),
        "{msg}"
    );
    // Request handlers never turn ids into paths.
    let path = fixtures().join("tiny-sd15");
    assert!(reg.resolve_id(path.to_str().unwrap()).is_err());
}

#[test]
fn invalid_registries_are_refused() {
    setup();
    let base = fixtures();
    let cases = [
        ("[[model]]\nid = \"a\"\npath = \"x\"\nhf = \"o/r\"\n", "exactly one source"),
        ("[[model]]\nid = \"a\"\n", "exactly one source"),
        ("[[model]]\nid = \"a\"\nhf = \"not-a-repo\"\n", "hub repo id"),
        ("[[model]]\nid = \"a\"\nfile = \"m.ckpt\"\n", "pickle"),
        ("[[model]]\nid = \"a\"\npath = \"x\"\n[model.defaults]\nstep = 3\n", "step"),
        (
            "[[model]]\nid = \"a\"\npath = \"x\"\n[[model]]\nid = \"b\"\naliases = [\"a\"]\npath = \"y\"\n",
            "used by both",
        ),
        ("[[model]]\nid = \"a\"\nfile = \"m.safetensors\"\nconfig = \"./nowhere\"\n", "no such folder"),
    ];
    for (toml, expected) in cases {
        let e = Registry::from_toml_str(toml, &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains(expected), "{toml}\n-> {e}");
    }
}

#[test]
fn builtin_registry_lists_the_public_models() {
    setup();
    let reg = Registry::builtin();
    let sd15 = reg.resolve_id("runwayml/stable-diffusion-v1-5").unwrap();
    assert_eq!(sd15.id, reg.resolve_id("sd15").unwrap().id);
    match &sd15.source {
        ModelSource::Hub { repo, revision, .. } => {
            assert_eq!(repo, "stable-diffusion-v1-5/stable-diffusion-v1-5");
            assert_eq!(revision, "main");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        reg.resolve_id("stable-diffusion-2-1")
            .unwrap()
            .defaults
            .width,
        Some(768)
    );
    assert_eq!(
        reg.resolve_id("stable-diffusion-2-1-base")
            .unwrap()
            .defaults
            .width,
        Some(512)
    );
    let xl = reg.resolve_id("stable-diffusion-xl-base-1.0").unwrap();
    assert_eq!(xl.family, Some(Family::Sdxl));
    assert_eq!(xl.defaults.width, Some(1024));
    let turbo = reg.resolve_id("sdxl-turbo").unwrap();
    assert_eq!(turbo.defaults.steps, Some(1));
    assert_eq!(turbo.defaults.guidance, Some(0.0));
}

#[test]
fn paths_resolve_to_ad_hoc_entries() {
    setup();
    let reg = Registry::default();
    let dir = fixtures().join("tiny-sd2");
    let e = reg.resolve(dir.to_str().unwrap()).unwrap();
    assert_eq!(e.source, ModelSource::Folder(dir));
    let file = fixtures().join("tiny-sd15.safetensors");
    let e = reg.resolve(file.to_str().unwrap()).unwrap();
    assert!(matches!(
        e.source,
        ModelSource::SingleFile { config: None, .. }
    ));

    let tmp = scratch("pickle-path");
    let ckpt = tmp.join("model.ckpt");
    std::fs::write(&ckpt, b"x").unwrap();
    let e = reg.resolve(ckpt.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("pickle"), "{e}");
}

#[test]
fn entries_load_folders_and_single_files() {
    setup();
    let reg = registry();
    let folder = reg
        .resolve("tiny-sdxl")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    let single = reg
        .resolve("tiny-sdxl-single")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!((folder.family, single.family), (Family::Sdxl, Family::Sdxl));
    assert_eq!(
        max_abs_store_diff("unet", &folder.unet.weights, &single.unet.weights),
        0.0
    );
    assert_eq!(single.tokenizer_2, folder.tokenizer_2);
}

#[test]
fn prediction_type_override_applies_to_the_scheduler_config() {
    setup();
    let toml = "[[model]]\nid = \"m\"\npath = \"tiny-sd15\"\nprediction_type = \"v_prediction\"\n";
    let reg = Registry::from_toml_str(toml, &fixtures()).unwrap();
    let p = reg
        .resolve_id("m")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(p.scheduler_config["prediction_type"], "v_prediction");
}

#[test]
fn offline_with_empty_hf_home_is_a_clear_error() {
    setup(); // HF_HUB_OFFLINE=1 and HF_HOME = an empty folder for this whole test binary
    let opts = HubOptions::from_env().unwrap();
    assert!(opts.offline);
    assert!(opts.cache_dir.ends_with("empty-hf-home/hub"));
    let e = Registry::builtin()
        .resolve_id("sd15")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(matches!(e, Error::Model(_)));
    let msg = e.to_string();
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert!(msg.contains("not in the local cache"), "{msg}");
    assert!(
        msg.contains("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "{msg}"
    );
}

#[test]
fn hub_entries_load_from_the_cache_offline() {
    setup();
    let cache = scratch("hub-cache");
    let snapshot = fake_hub_repo(
        &cache,
        "org/tiny-sd15",
        &fixtures().join("tiny-sd15"),
        &|_| false,
    );
    // The fp16 variant is what the entry asks for; the plain file is absent from the cache.
    std::fs::rename(
        snapshot.join("unet/diffusion_pytorch_model.safetensors"),
        snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let toml = "[[model]]\nid = \"hub\"\nhf = \"org/tiny-sd15\"\nvariant = \"fp16\"\n";
    let p = load_from_cache(toml, "hub", &cache);
    let reference =
        load_diffusers_folder(&fixtures().join("tiny-sd15"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(p.family, Family::Sd1);
    assert_eq!(
        max_abs_store_diff("hub unet", &reference.unet.weights, &p.unet.weights),
        0.0
    );

    // A single file inside a hub repo, with its config from another hub repo.
    let files = cache.join("single-src");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::copy(
        fixtures().join("tiny-sd15.safetensors"),
        files.join("tiny.safetensors"),
    )
    .unwrap();
    fake_hub_repo(&cache, "org/tiny-single", &files, &|_| false);
    let toml = "[[model]]\nid = \"s\"\nhf = \"org/tiny-single\"\nfile = \"tiny.safetensors\"\nconfig = \"hf:org/tiny-sd15\"\n";
    let p = load_from_cache(toml, "s", &cache);
    assert_eq!(
        max_abs_store_diff("hub single unet", &reference.unet.weights, &p.unet.weights),
        0.0
    );
    assert_eq!(p.unet.config, reference.unet.config);
}

#[test]
fn single_file_without_config_takes_reference_tokenizers() {
    setup();
    let cache = scratch("tokenizer-cache");
    let path = fixtures().join("tiny-sd15.safetensors");
    let entry = Registry::default().resolve(path.to_str().unwrap()).unwrap();

    // Nothing cached: the error names the reference repo and what to do.
    let e = entry
        .load_with(&offline(&cache), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "{e}"
    );
    assert!(e.contains("`config`"), "{e}");

    // Only the reference repo's model_index.json and tokenizer are cached (no weights).
    let src = fixtures().join("tiny-sd15");
    fake_hub_repo(
        &cache,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        &src,
        &|p| p.extension().is_some_and(|e| e == "safetensors"),
    );
    let p = entry
        .load_with(&offline(&cache), &Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(p.family, Family::Sd1);
    assert_eq!(
        p.unet.config["cross_attention_dim"], 768,
        "built-in SD1.5 config"
    );
    assert_eq!(p.tokenizer.pad_token, "<|endoftext|>");
}

#[test]
fn a_refiner_folder_loads_as_a_refiner_and_no_declaration_turns_it_into_a_base() {
    setup();
    let files = registry()
        .resolve("tiny-sdxl-refiner")
        .unwrap()
        .load(&Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(files.family, Family::SdxlRefiner);
    // Its only text encoder (SDXL's second, with projection) sits in the first place.
    assert!(files.text_encoder_2.is_none() && files.tokenizer_2.is_none());
    assert_eq!(files.text_encoder.config["projection_dim"], 16);
    assert!(!files.force_zeros_for_empty_prompt);
    for (declared, path, words) in [
        ("sdxl", "tiny-sdxl-refiner", ["sdxl", "sdxl-refiner"]),
        ("sdxl-refiner", "tiny-sdxl", ["sdxl-refiner", "sdxl model"]),
    ] {
        let toml = format!("[[model]]\nid = \"m\"\nfamily = \"{declared}\"\npath = \"{path}\"\n");
        let reg = Registry::from_toml_str(&toml, &fixtures()).unwrap();
        let e = reg
            .resolve("m")
            .unwrap()
            .load(&Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        for word in words {
            assert!(e.contains(word), "{declared} {path}: {e}");
        }
    }
}
