//! One error type for the whole crate. Every variant names what was wrong so a
//! user can fix their input without reading our source.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// A config field holds a value we cannot use. `field` is a JSON path such as
    /// `layers[3].hip.stages[0].chunk_size`.
    #[error("invalid config field `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// The JSON itself did not parse.
    #[error("config is not valid JSON: {0}")]
    ConfigJson(#[from] serde_json::Error),

    /// A tensor had the wrong shape or length.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    #[error("unsupported dtype {got} for {what} (supported: {supported})")]
    Dtype {
        what: String,
        got: String,
        supported: String,
    },

    /// Retaining-head or centroid weights that are missing, malformed or do
    /// not match the model shape.
    #[error("weights file {path}: {reason}")]
    Weights { path: String, reason: String },

    #[error("unknown sequence id {0}")]
    UnknownSequence(u64),

    #[error("sequence id {0} already exists")]
    DuplicateSequence(u64),

    #[error("index out of range: {0}")]
    OutOfRange(String),

    /// The KV pool has no free page left (its capacity is fixed at creation).
    #[error("KV pool out of pages: capacity {capacity} pages, {needed} more needed")]
    OutOfPages { capacity: usize, needed: usize },

    #[error("invalid argument: {0}")]
    Invalid(String),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub fn shape(what: impl Into<String>, expected: impl ToString, got: impl ToString) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
    pub fn weights(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
