//! The `sd-serve` binary as a user runs it on the tiny fixture models.

mod common;

use std::process::Command;

use common::{fixtures, scratch};

fn sd_serve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sd-serve"))
}

fn generate(model: &str, extra: &[&str], output: &std::path::Path) -> std::process::Output {
    let models = fixtures().join("models.toml");
    sd_serve()
        .args(["generate", "--model", model, "--models"])
        .arg(&models)
        .args([
            "--prompt",
            "a lighthouse at dusk",
            "--seed",
            "42",
            "--output",
        ])
        .arg(output)
        .args(extra)
        .output()
        .expect("sd-serve runs")
}

#[test]
fn generate_writes_a_png_for_each_family_and_a_single_file() {
    let dir = scratch("generate_writes_a_png_for_each_family_and_a_single_file");
    for model in [
        "tiny-sd15",
        "tiny-sd2",
        "tiny-sdxl",
        "tiny-sd15-single",
        "tiny-sdxl-single",
    ] {
        let out = dir.join(format!("{model}.png"));
        let run = generate(model, &["--width", "64", "--height", "48"], &out);
        assert!(
            run.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let image = image::open(&out).expect("a PNG was written").to_rgb8();
        assert_eq!(image.dimensions(), (64, 48), "{model}");
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(stdout.contains("seed=42"), "{model}: {stdout}");
    }
}

#[test]
fn single_file_gives_the_folder_image() {
    let dir = scratch("single_file_gives_the_folder_image");
    for (folder, single) in [
        ("tiny-sd15", "tiny-sd15-single"),
        ("tiny-sdxl", "tiny-sdxl-single"),
    ] {
        let a = dir.join(format!("{folder}.png"));
        let b = dir.join(format!("{single}.png"));
        assert!(generate(folder, &[], &a).status.success());
        assert!(generate(single, &[], &b).status.success());
        let a = image::open(&a).unwrap().to_rgb8();
        let b = image::open(&b).unwrap().to_rgb8();
        assert_eq!(a.as_raw(), b.as_raw(), "{single} differs from {folder}");
    }
}

#[test]
fn several_images_and_img2img() {
    let dir = scratch("several_images_and_img2img");
    let out = dir.join("many.png");
    let init = fixtures().join("goldens/init.png");
    let run = generate(
        "tiny-sd15",
        &[
            "--num-images",
            "2",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0.5",
        ],
        &out,
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for i in 0..2 {
        let path = dir.join(format!("many-{i}.png"));
        assert!(path.exists(), "{} missing", path.display());
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("seed=42") && stdout.contains("seed=43"),
        "{stdout}"
    );
}

#[test]
fn bad_arguments_get_clear_messages() {
    let dir = scratch("bad_arguments_get_clear_messages");
    let out = dir.join("bad.png");
    let cases: [(&str, &[&str], &str); 4] = [
        ("tiny-sd15", &["--width", "65"], "`width`"),
        ("tiny-sd15", &["--scheduler", "Warp Drive"], "Warp Drive"),
        ("no-such-model", &[], "no-such-model"),
        ("tiny-sd15", &["--steps", "0"], "`steps`"),
    ];
    for (model, extra, expect) in cases {
        let run = generate(model, extra, &out);
        assert!(!run.status.success(), "{extra:?} should fail");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains(expect), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
}

/// A GPU this build cannot open is refused with the reason, before any model is loaded.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_build_without_it_is_refused_with_the_reason() {
    let run = sd_serve()
        .args([
            "bench", "--device", "cuda:0", "--arch", "sd15", "--size", "64",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("cannot open cuda:0: this sd-serve was built without CUDA"),
        "{stderr}"
    );
}

#[test]
fn generate_merges_registry_loras() {
    let dir = scratch("generate_merges_registry_loras");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.png"));
        let run = generate("tiny-sd15", extra, &out);
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        image::open(&out).unwrap().to_rgb8().into_raw()
    };
    let plain = run("plain", &[]);
    // The kohya fixture's default weight is 0.8; its alias is a civitai AIR id.
    let by_default = run("default", &["--lora", "tiny-sd15-lora-kohya"]);
    let by_alias = run("alias", &["--lora", "civitai:132942@146296:0.8"]);
    let heavier = run("heavier", &["--lora", "tiny-sd15-lora-kohya:1.2"]);
    assert_ne!(plain, by_default);
    assert_eq!(by_default, by_alias);
    assert_ne!(by_default, heavier);
    let out = dir.join("bad.png");
    for (lora, expect) in [
        ("no-such-lora", "unknown LoRA `no-such-lora`"),
        ("tiny-sdxl-lora-kohya", "is for sdxl models"),
    ] {
        let failed = generate("tiny-sd15", &["--lora", lora], &out);
        assert!(!failed.status.success(), "{lora}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(stderr.contains(expect), "{lora}: {stderr}");
    }
}

#[test]
fn models_lists_the_registry() {
    let run = sd_serve()
        .args(["models", "--models"])
        .arg(fixtures().join("models.toml"))
        .output()
        .unwrap();
    assert!(run.status.success());
    let stdout = String::from_utf8_lossy(&run.stdout);
    for id in ["tiny-sd15", "tiny-sd2", "tiny-sdxl", "tiny-sd15-single"] {
        assert!(stdout.contains(id), "{stdout}");
    }
    assert!(
        stdout.contains("tiny-sd15-lora-kohya\tlora sd1\t"),
        "LoRAs are listed: {stdout}"
    );
    assert!(
        stdout.contains("tiny-sd15-controlnet-a\tcontrolnet sd1\t")
            && stdout.contains("preprocessor canny"),
        "ControlNets are listed: {stdout}"
    );
    let builtin = sd_serve().arg("models").output().unwrap();
    assert!(builtin.status.success());
    assert!(String::from_utf8_lossy(&builtin.stdout).contains("stable-diffusion-xl-base-1.0"));
}

#[test]
fn generate_accepts_every_scheduler_name() {
    let dir = scratch("generate_accepts_every_scheduler_name");
    let names = sd_serve::schedulers::SchedulerSpec::accepted_names();
    assert!(names.len() >= 20, "{names:?}");
    for name in names {
        let out = dir.join("sched.png");
        let run = generate("tiny-sd15", &["--scheduler", name, "--steps", "3"], &out);
        assert!(
            run.status.success(),
            "--scheduler {name:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let image = image::open(&out).expect("a PNG was written").to_rgb8();
        assert_eq!(image.dimensions(), (64, 64), "{name}");
    }
}

#[test]
fn a_registry_vae_replaces_the_model_vae() {
    let dir = scratch("a_registry_vae_replaces_the_model_vae");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.png"));
        let run = generate("tiny-sd15", extra, &out);
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        image::open(&out).unwrap().to_rgb8()
    };
    let own = run("own", &[]);
    let folder = run("folder", &["--vae", "tiny-sd15-vae-alt"]);
    let single = run("single", &["--vae", "tiny-sd15-vae-alt-single"]);
    assert_ne!(own.as_raw(), folder.as_raw(), "the VAE changes the image");
    assert_eq!(folder.as_raw(), single.as_raw(), "one VAE, two files");
    // A VAE of another latent space names both families.
    let out = dir.join("sdxl.png");
    let run = generate("tiny-sdxl", &["--vae", "tiny-sd15-vae-alt"], &out);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("is for sd1 models, but model `tiny-sdxl` is sdxl"),
        "{stderr}"
    );
}

#[test]
fn generate_with_a_refiner_gives_the_diffusers_image() {
    let dir = scratch("generate_with_a_refiner_gives_the_diffusers_image");
    let manifest = common::manifest();
    let case = manifest["refiner"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "euler_half")
        .expect("the euler_half refiner golden")
        .clone();
    let out = dir.join("refined.png");
    let run = sd_serve()
        .args(["generate", "--model", "tiny-sdxl", "--models"])
        .arg(fixtures().join("models.toml"))
        .args(["--prompt", case["prompt"].as_str().unwrap()])
        .args([
            "--negative-prompt",
            case["negative_prompt"].as_str().unwrap(),
        ])
        .args(["--seed", &case["seed"].to_string()])
        .args(["--steps", &case["steps"].to_string()])
        .args(["--scheduler", "Euler", "--refiner", "tiny-sdxl-refiner"])
        .args(["--refiner-start", "2", "--output"])
        .arg(&out)
        .output()
        .expect("sd-serve runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let image = image::open(&out).unwrap().to_rgb8();
    let golden = common::load_goldens(case["file"].as_str().unwrap());
    let expected = common::flat(&golden["images"]);
    // The PNG holds round(255 * x): half a level of quantisation, plus the pipeline's f32
    // bound on 0..1 pixels (2e-5, see parity_refiner.rs).
    let worst = image
        .as_raw()
        .iter()
        .zip(&expected)
        .map(|(&ours, &x)| (ours as f32 / 255.0 - x).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 0.5 / 255.0 + 2e-5, "PNG differs by {worst}");

    // Refused with the reason: a start outside 1..=steps, a non-refiner, a non-SDXL base.
    for (model, extra, words) in [
        (
            "tiny-sdxl",
            ["--refiner", "tiny-sdxl-refiner", "--refiner-start", "0"],
            &["--refiner-start"][..],
        ),
        (
            "tiny-sdxl",
            ["--refiner", "tiny-sd15", "--refiner-start", "2"],
            &["sdxl-refiner", "sd1"],
        ),
        (
            "tiny-sd15",
            ["--refiner", "tiny-sdxl-refiner", "--refiner-start", "2"],
            &["SDXL", "sd1"],
        ),
    ] {
        let run = generate(model, &extra, &dir.join("refused.png"));
        assert!(!run.status.success(), "{model} {extra:?}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        for word in words {
            assert!(stderr.contains(word), "{model} {extra:?}: {stderr}");
        }
    }
}
