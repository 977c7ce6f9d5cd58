//! Log lines that reach `apiary task logs`: each goes to the task's stderr as one JSON object
//! on a line, `{"log":"info","msg":"…","t_us":…}`, counted against its output limit. Always
//! allowed, like stderr itself; a line that cannot be written is dropped.

use crate::sys;

/// How much a line matters, as the ABI numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Emits one line at `level`.
pub fn emit(level: Level, message: &str) {
    // SAFETY: the pointer and length describe a live slice for the length of the call.
    let _ = unsafe { sys::log(level as u32, message.as_ptr(), message.len()) };
}

pub fn trace(message: &str) {
    emit(Level::Trace, message);
}

pub fn debug(message: &str) {
    emit(Level::Debug, message);
}

pub fn info(message: &str) {
    emit(Level::Info, message);
}

pub fn warn(message: &str) {
    emit(Level::Warn, message);
}

pub fn error(message: &str) {
    emit(Level::Error, message);
}
