//! The crate's error type. Each variant carries a message a user can act on.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A model file or folder that is missing, unreadable or of an unexpected layout.
    #[error("model: {0}")]
    Model(String),
    /// A model id the registry does not know.
    #[error("{0}")]
    UnknownModel(String),
    /// A request value outside what the pipeline accepts (field named, limit stated).
    #[error("{0}")]
    InvalidRequest(String),
    /// A scheduler name or option that is not accepted.
    #[error("{0}")]
    Scheduler(String),
    /// A device that cannot be opened (not in this build, absent, or refused by the driver).
    #[error("{0}")]
    Device(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("image: {0}")]
    Image(String),
    /// The job was cancelled (its client went away) between two denoising steps.
    #[error("cancelled")]
    Cancelled,
    /// A fault inside sd-serve (a job that panicked); the message is for the server's logs.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }
}
