//! Errors of the data methods.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option or input value out of its domain: which, and why.
    #[error("`{what}`: {why}")]
    Invalid { what: String, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;
