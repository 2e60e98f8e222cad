//! The server's configuration: a TOML file (`sd-serve serve --config sd-serve.toml`) whose every
//! field has a default, with command-line flags applied on top.
//!
//! ```toml
//! listen = "0.0.0.0:7860"
//! models = "models.toml"            # the model registry; absent: the built-in one
//! api_keys = ["key-1", "key-2"]     # absent or empty: every key is accepted (logged at start)
//! public_url = "https://img.example.com"  # image links; absent: http://<listen>
//! data_dir = "sd-serve-data"        # images/ and jobs.sqlite3
//! devices = ["cuda:0", "cuda:1"]    # one worker each; absent: the first GPU, else the CPU
//! dtype = "f16"
//! queue_capacity = 32
//! shutdown_grace_secs = 30
//!
//! [limits]        # per request, on top of each dialect's documented limits
//! [media]         # client images: bytes, pixels, URL fetching
//! [modelslab]     # wait before answering "processing"
//! [runware]       # WebSocket idle timeout and resume buffer
//! [pricing]       # credit_cost / cost
//! [prompt_weighting]  # prompt syntax per dialect: "none", "a1111" or "compel"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::media::MediaLimits;
use crate::pipeline::PromptWeighting;
use crate::{Error, Result};

/// Everything `sd-serve serve` reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `models.toml`; `None`: the built-in registry.
    pub models: Option<PathBuf>,
    pub api_keys: Vec<String>,
    /// Base of the image links the dialects return, without a trailing slash.
    pub public_url: Option<String>,
    pub data_dir: PathBuf,
    /// `cpu`, `cuda`, `cuda:N`, `metal`; one engine worker each.
    pub devices: Vec<String>,
    /// `f32`, `f16`, `bf16`; default f16 on a GPU, f32 on the CPU.
    pub dtype: Option<String>,
    /// Jobs waiting or running at once; beyond it requests are refused with each dialect's busy
    /// error.
    pub queue_capacity: usize,
    /// Weight bytes each worker keeps loaded (least recently used models are dropped beyond).
    pub model_cache_bytes: Option<usize>,
    /// On SIGINT/SIGTERM: how long running and waiting jobs get to finish.
    pub shutdown_grace_secs: u64,
    pub limits: RequestLimits,
    pub media: MediaConfig,
    pub modelslab: ModelsLabConfig,
    pub runware: RunwareConfig,
    pub pricing: Pricing,
    pub prompt_weighting: PromptWeightingDefaults,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7860)),
            models: None,
            api_keys: Vec::new(),
            public_url: None,
            data_dir: PathBuf::from("sd-serve-data"),
            devices: Vec::new(),
            dtype: None,
            queue_capacity: 32,
            model_cache_bytes: None,
            shutdown_grace_secs: 30,
            limits: RequestLimits::default(),
            media: MediaConfig::default(),
            modelslab: ModelsLabConfig::default(),
            runware: RunwareConfig::default(),
            pricing: Pricing::default(),
            prompt_weighting: PromptWeightingDefaults::default(),
        }
    }
}

/// Per-request limits the operator sets; a dialect's own documented limits apply first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLimits {
    /// Largest request body (JSON, form or multipart, uploads included).
    pub max_body_bytes: usize,
    /// Most images one request may ask for.
    pub max_images: usize,
    pub max_steps: usize,
    /// Largest `width * height` of a generated image.
    pub max_pixels: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 * 1024 * 1024,
            max_images: 20,
            max_steps: 100,
            max_pixels: 2048 * 2048,
        }
    }
}

/// Client images (uploads, base64, data URIs, URLs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub max_image_side: u32,
    /// Let image URLs, webhooks and upload endpoints reach loopback, private and link-local
    /// addresses (a deployment inside its own network; tests).
    pub allow_private_urls: bool,
    pub fetch_timeout_secs: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        let d = MediaLimits::default();
        Self {
            max_image_bytes: d.max_bytes,
            max_image_pixels: d.max_pixels,
            max_image_side: d.max_side,
            allow_private_urls: d.allow_private_urls,
            fetch_timeout_secs: d.fetch_timeout.as_secs(),
        }
    }
}

impl MediaConfig {
    pub fn limits(&self) -> MediaLimits {
        MediaLimits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_image_pixels,
            max_side: self.max_image_side,
            allow_private_urls: self.allow_private_urls,
            fetch_timeout: Duration::from_secs(self.fetch_timeout_secs),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsLabConfig {
    /// How long a request waits for its images before answering `status: "processing"` with an
    /// `id` to fetch later.
    pub wait_secs: f64,
}

impl Default for ModelsLabConfig {
    fn default() -> Self {
        Self { wait_secs: 30.0 }
    }
}

impl ModelsLabConfig {
    pub fn wait(&self) -> Duration {
        Duration::from_secs_f64(self.wait_secs.max(0.0))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunwareConfig {
    /// A WebSocket with no message either way for this long is closed (Runware: 120 s).
    pub idle_timeout_secs: u64,
    /// Results a dropped connection did not receive are kept this long for a client that
    /// reconnects with its `connectionSessionUUID` (Runware: 120 s).
    pub resume_buffer_secs: u64,
}

impl Default for RunwareConfig {
    fn default() -> Self {
        Self {
            idle_timeout_secs: 120,
            resume_buffer_secs: 120,
        }
    }
}

impl RunwareConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn resume_buffer(&self) -> Duration {
        Duration::from_secs(self.resume_buffer_secs)
    }
}

/// The prompt syntax each dialect reads prompts in (`none`, `a1111`, `compel`). Runware's
/// `promptWeighting` chooses per request; this is what a Runware request without it gets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptWeightingDefaults {
    pub sinkin: PromptWeighting,
    pub modelslab: PromptWeighting,
    pub bearer: PromptWeighting,
    pub runware: PromptWeighting,
}

impl Default for PromptWeightingDefaults {
    fn default() -> Self {
        Self {
            // token-multipart hosts civitai checkpoints for web-UI users, whose prompts are
            // written in A1111's `(word:1.2)` syntax and often run past 75 tokens.
            sinkin: PromptWeighting::A1111,
            // ModelsLab's community-model API reads the same A1111-style prompts (copied from
            // civitai) and does not cut them at 77 tokens.
            modelslab: PromptWeighting::A1111,
            // The bearer API documents plain prompts for stock SDXL, read as diffusers reads
            // them.
            bearer: PromptWeighting::None,
            // Runware applies a syntax only when `promptWeighting` names one.
            runware: PromptWeighting::None,
        }
    }
}

/// What a generation costs, reported as token-multipart's `credit_cost` and Runware's `cost`
/// (`includeCost`). An image costs `per_image + per_step * steps`, scaled by its pixel count
/// relative to 512x512; LCM sampling costs `lcm_factor` of that (the token-multipart API
/// documents LCM at half the cost). A model id listed in `models` uses its own table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pricing {
    pub per_image: f64,
    pub per_step: f64,
    pub lcm_factor: f64,
    pub models: std::collections::BTreeMap<String, ModelPrice>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub per_image: f64,
    pub per_step: f64,
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            per_image: 0.0,
            per_step: 0.0,
            lcm_factor: 0.5,
            models: Default::default(),
        }
    }
}

impl Pricing {
    /// Cost of `images` images of `width` x `height` with `steps` steps on `model`, rounded to
    /// 1e-6 so that sums print cleanly.
    pub fn cost(
        &self,
        model: &str,
        images: usize,
        width: usize,
        height: usize,
        steps: usize,
        lcm: bool,
    ) -> f64 {
        let (per_image, per_step) = match self.models.get(model) {
            Some(p) => (p.per_image, p.per_step),
            None => (self.per_image, self.per_step),
        };
        let scale = (width * height) as f64 / (512.0 * 512.0);
        let mut cost = images as f64 * (per_image + per_step * steps as f64) * scale;
        if lcm {
            cost *= self.lcm_factor;
        }
        (cost * 1e6).round() / 1e6
    }
}

impl ServerConfig {
    /// Reads a config file; relative `models` and `data_dir` resolve against its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid(format!("reading {}: {e}", path.display())))?;
        let mut config: ServerConfig = toml::from_str(&text)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(models) = &config.models {
            if models.is_relative() {
                config.models = Some(base.join(models));
            }
        }
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        Ok(config)
    }

    /// The base of image links: `public_url`, else `http://<listen>` with an unspecified
    /// address shown as 127.0.0.1.
    pub fn base_url(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let mut addr = bound;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
        }
    }

    /// Checks values no default can make sense of.
    pub fn validate(&self) -> Result<()> {
        if self.queue_capacity == 0 {
            return Err(Error::invalid("`queue_capacity` must be at least 1"));
        }
        if self.limits.max_images == 0 || self.limits.max_steps == 0 {
            return Err(Error::invalid(
                "`limits.max_images` and `limits.max_steps` must be at least 1",
            ));
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            return Err(Error::invalid("an API key may not be empty"));
        }
        if let Some(url) = &self.public_url {
            url::Url::parse(url)
                .map_err(|e| Error::invalid(format!("`public_url` {url:?}: {e}")))?;
        }
        if !(self.modelslab.wait_secs >= 0.0 && self.modelslab.wait_secs.is_finite()) {
            return Err(Error::invalid("`modelslab.wait_secs` must be >= 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_has_a_default_and_unknown_fields_are_refused() {
        let c: ServerConfig = toml::from_str("").unwrap();
        assert_eq!(c.listen.port(), 7860);
        assert_eq!(c.queue_capacity, 32);
        assert!(toml::from_str::<ServerConfig>("listn = \"x\"").is_err());
        let c: ServerConfig =
            toml::from_str("api_keys = [\"a\"]\n[modelslab]\nwait_secs = 2.5\n").unwrap();
        assert_eq!(c.api_keys, ["a"]);
        assert_eq!(c.modelslab.wait(), Duration::from_millis(2500));
    }

    #[test]
    fn base_url_prefers_public_url_and_shows_unspecified_as_loopback() {
        let mut c = ServerConfig::default();
        let bound: SocketAddr = "0.0.0.0:1234".parse().unwrap();
        assert_eq!(c.base_url(bound), "http://127.0.0.1:1234");
        c.public_url = Some("https://img.example.com/".into());
        assert_eq!(c.base_url(bound), "https://img.example.com");
    }

    #[test]
    fn prompt_weighting_defaults_per_dialect_and_overrides() {
        let c = ServerConfig::default();
        assert_eq!(c.prompt_weighting.sinkin, PromptWeighting::A1111);
        assert_eq!(c.prompt_weighting.modelslab, PromptWeighting::A1111);
        assert_eq!(c.prompt_weighting.bearer, PromptWeighting::None);
        assert_eq!(c.prompt_weighting.runware, PromptWeighting::None);
        let c: ServerConfig =
            toml::from_str("[prompt_weighting]\nbearer = \"compel\"\nsinkin = \"none\"\n").unwrap();
        assert_eq!(c.prompt_weighting.bearer, PromptWeighting::Compel);
        assert_eq!(c.prompt_weighting.sinkin, PromptWeighting::None);
        assert_eq!(c.prompt_weighting.modelslab, PromptWeighting::A1111);
        for bad in [
            "[prompt_weighting]\nbearer = \"sdEmbeds\"\n",
            "[prompt_weighting]\ncomfy = \"a1111\"\n",
        ] {
            assert!(toml::from_str::<ServerConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pricing_scales_with_pixels_steps_and_lcm() {
        let p: Pricing = toml::from_str(
            "per_image = 0.001\nper_step = 0.0001\n[models.big]\nper_image = 0.01\nper_step = 0.0\n",
        )
        .unwrap();
        assert_eq!(p.cost("m", 1, 512, 512, 10, false), 0.002);
        assert_eq!(p.cost("m", 2, 1024, 512, 10, false), 0.008);
        assert_eq!(p.cost("m", 1, 512, 512, 10, true), 0.001);
        assert_eq!(p.cost("big", 1, 512, 512, 50, false), 0.01);
    }
}
