//! Write an apiary task as a plain Rust function from its input bytes to its output bytes.
//!
//! ```no_run
//! // The whole of a task's `main`:
//! apiary_guest::run(|input| Ok(input.to_ascii_uppercase()));
//! ```
//!
//! Build for `wasm32-wasip1` and submit the `.wasm` (`apiary task submit`). [`run`] reads
//! the input from stdin, writes the output to stdout, and turns an error into a message on
//! stderr and exit code 1.
//!
//! A task sees nothing of its node unless its submission grants it; what it was granted is
//! found with [`grants`], and the host APIs are in [`kv`], [`publish`] and [`log`]. A call to
//! an API the task was not granted returns [`ErrorKind::NotGranted`]. The ABI under these
//! wrappers (the `apiary` import module) is in apiary's docs/PROTOCOL.md, "Host APIs for
//! guests", for other languages.

use std::fmt;
use std::io::{self, Read, Write};

pub mod grants;
pub mod kv;
pub mod log;
pub mod sys;

/// Runs `task` on the input and writes what it returns as the output. An error goes to
/// stderr and the task exits with code 1.
pub fn run<F, O>(task: F)
where
    F: FnOnce(&[u8]) -> Result<O, Error>,
    O: AsRef<[u8]>,
{
    let mut input = Vec::new();
    if let Err(err) = io::stdin().read_to_end(&mut input) {
        fail(&Error::from(err));
    }
    match task(&input) {
        Ok(output) => {
            let mut stdout = io::stdout().lock();
            if stdout
                .write_all(output.as_ref())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                std::process::exit(2);
            }
        }
        Err(err) => fail(&err),
    }
}

fn fail(err: &Error) -> ! {
    let _ = writeln!(io::stderr(), "error: {err}");
    std::process::exit(1);
}

/// Publishes `payload` on `topic` of the namespace the task was granted (`publish` grant).
/// Subscribers see it on the namespace's topic, as the SDK's `PubSub::publish` sends it.
pub fn publish(topic: &str, payload: &[u8]) -> Result<(), Error> {
    // SAFETY: the pointers and lengths describe live slices for the length of the call.
    let status =
        unsafe { sys::publish(topic.as_ptr(), topic.len(), payload.as_ptr(), payload.len()) };
    check(status).map(drop)
}

/// How a host API call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The task's submission did not grant this API.
    NotGranted,
    /// No value under the key.
    NotFound,
    /// The key already has a value (`create`), or is at another revision (`update`).
    Conflict,
    /// The key, prefix or topic is not valid: dot-joined tokens of `[A-Za-z0-9_=/-]`.
    InvalidName,
    /// The value or message is larger than the namespace or the server takes.
    TooLarge,
    /// The store or the bus did not answer in time.
    Unavailable,
    /// A status this crate does not know, or an I/O or task error.
    Other,
}

/// A failed host API call, or a task's own error.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// A task's own error, with its message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Other,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    fn from_status(status: i32) -> Self {
        let (kind, message) = match status {
            sys::NOT_GRANTED => (
                ErrorKind::NotGranted,
                "the task was not granted this host API",
            ),
            sys::NOT_FOUND => (ErrorKind::NotFound, "no value under the key"),
            sys::CONFLICT => (
                ErrorKind::Conflict,
                "the key exists or is at another revision",
            ),
            sys::INVALID_NAME => (ErrorKind::InvalidName, "not a valid key, prefix or topic"),
            sys::TOO_LARGE => (
                ErrorKind::TooLarge,
                "larger than the namespace or server takes",
            ),
            sys::UNAVAILABLE => (
                ErrorKind::Unavailable,
                "the store or the bus is unavailable",
            ),
            _ => (ErrorKind::Other, "the host API call failed"),
        };
        Self {
            kind,
            message: format!("{message} (status {status})"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Self::new(err.to_string())
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

/// A status as a `Result`: non-negative is success (a count), negative an error.
fn check(status: i32) -> Result<u32, Error> {
    u32::try_from(status).map_err(|_| Error::from_status(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_their_kinds() {
        assert_eq!(check(3).ok(), Some(3));
        let kinds = [
            (sys::NOT_GRANTED, ErrorKind::NotGranted),
            (sys::NOT_FOUND, ErrorKind::NotFound),
            (sys::CONFLICT, ErrorKind::Conflict),
            (sys::INVALID_NAME, ErrorKind::InvalidName),
            (sys::TOO_LARGE, ErrorKind::TooLarge),
            (sys::UNAVAILABLE, ErrorKind::Unavailable),
            (-99, ErrorKind::Other),
        ];
        for (status, kind) in kinds {
            assert_eq!(check(status).map_err(|err| err.kind()), Err(kind));
        }
    }
}
