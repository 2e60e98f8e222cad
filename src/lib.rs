//! sd-serve: Stable Diffusion 1.x/2.x and SDXL on candle, served behind four hosted image APIs.
//!
//! Layers, each calling only downwards: `pipeline` (prompt -> image) over `models` (candle
//! modules mirroring diffusers) and `schedulers`; `weights` turns files into a named tensor store;
//! `registry` maps model ids to where their files are; `engine` queues jobs onto one worker
//! thread per device, each with its own model cache; `store` keeps images and job records; `api`
//! serves the four dialects over HTTP and WebSocket, configured by `config`.

pub mod api;
pub mod bench;
pub mod config;
pub mod engine;
pub mod error;
pub mod models;
pub mod pipeline;
pub mod preprocess;
pub mod registry;
pub mod schedulers;
pub mod store;
pub mod weights;

pub use error::{Error, Result};
