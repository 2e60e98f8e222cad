//! The HTTP dialects and what they share.

pub mod media;
