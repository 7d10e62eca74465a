//! Where a customer's password comes from, read afresh before every use.

use std::path::PathBuf;

use crate::fs::{self, ReadError};
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    File(PathBuf),
    Env(String),
}

/// The most a password file may hold: a password and a newline, with room to spare.
pub const MAX_PASSWORD_FILE: usize = 4 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password_file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    /// Not a regular file, or too large: `is a FIFO, not a regular file`.
    #[error("password_file {path} {why}")]
    Refused { path: PathBuf, why: ReadError },
    #[error("password_file {0}: the file is empty")]
    EmptyFile(PathBuf),
    #[error("password_file {0}: not UTF-8 text")]
    NotText(PathBuf),
    #[error("password_env {0}: not set")]
    EnvMissing(String),
    #[error("password_env {0}: empty")]
    EnvEmpty(String),
    /// The customer has no password: `auth.method` obtains its tokens otherwise.
    #[error("no password is configured: auth.method obtains this customer's tokens without one")]
    NoPassword,
}

impl PasswordSource {
    /// Reads the password afresh: a mounted Secret may have been rotated since the last login.
    /// One trailing newline is stripped, nothing else.
    ///
    /// A password file is opened without blocking and must be a regular file of at most
    /// [`MAX_PASSWORD_FILE`] bytes: a FIFO would stop the daemon waiting for a writer, and a
    /// device or a huge file would be read whole into memory (and sent). Symbolic links are
    /// followed: Kubernetes mounts a Secret's keys as links through `..data`.
    pub fn read(&self) -> Result<Secret, PasswordError> {
        match self {
            PasswordSource::File(path) => {
                let (bytes, _) = fs::read_regular(path, MAX_PASSWORD_FILE, true).map_err(|e| match e {
                    ReadError::Io(source) => PasswordError::File { path: path.clone(), source },
                    why => PasswordError::Refused { path: path.clone(), why },
                })?;
                let text = std::str::from_utf8(&bytes).map_err(|_| PasswordError::NotText(path.clone()))?;
                let text = text.strip_suffix('\n').unwrap_or(text);
                if text.is_empty() {
                    return Err(PasswordError::EmptyFile(path.clone()));
                }
                Ok(Secret::new(text.to_owned()))
            }
            PasswordSource::Env(var) => match std::env::var(var) {
                Ok(v) if v.is_empty() => Err(PasswordError::EnvEmpty(var.clone())),
                Ok(v) => Ok(Secret::new(v)),
                Err(_) => Err(PasswordError::EnvMissing(var.clone())),
            },
        }
    }
}

impl PasswordError {
    /// This error with the keys of another secret's source (`auth.admin.password_file`,
    /// `auth.ims.client_secret_env`) in place of a customer's.
    pub fn keyed(&self, file_key: &str, env_key: &str) -> String {
        let text = self.to_string();
        if let Some(rest) = text.strip_prefix("password_file") {
            format!("{file_key}{rest}")
        } else if let Some(rest) = text.strip_prefix("password_env") {
            format!("{env_key}{rest}")
        } else {
            text
        }
    }
}
