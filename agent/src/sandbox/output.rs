//! stdout and stderr of a run: in-memory pipes that trap the guest at the output limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::async_trait;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// stdout or stderr of one run, kept in memory up to the task's output limit. A write that
/// would pass the limit keeps what fits and traps the guest: WASI would otherwise report a
/// failed write, which a careless (or hostile) guest ignores and writes again, spinning
/// until its timeout while it holds a slot.
#[derive(Clone)]
pub(crate) struct CappedOutput {
    buffer: Arc<Mutex<BytesMut>>,
    limit: usize,
    cut: Arc<AtomicBool>,
}

/// The error a write past the output limit traps with.
#[derive(Debug, thiserror::Error)]
#[error("the task wrote more than its {limit} byte output limit")]
pub(crate) struct OutputLimitExceeded {
    pub(crate) limit: usize,
}

/// The most a single write is offered at once; a longer write comes in several.
const OUTPUT_PERMIT: usize = 64 * 1024;

impl CappedOutput {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buffer: Arc::new(Mutex::new(BytesMut::new())),
            limit,
            cut: Arc::new(AtomicBool::new(false)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        // Every critical section is one append or one copy, which cannot panic halfway.
        self.buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the guest wrote, at most `limit` bytes.
    pub(crate) fn contents(&self) -> Bytes {
        Bytes::copy_from_slice(&self.lock())
    }

    /// How many bytes were kept, and whether the guest tried to write more.
    pub(crate) fn written(&self) -> (u64, bool) {
        let kept = self.lock().len() as u64;
        (kept, self.cut.load(Ordering::Relaxed))
    }
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        let mut buffer = self.lock();
        let room = self.limit.saturating_sub(buffer.len());
        if bytes.len() > room {
            buffer.extend_from_slice(&bytes[..room]);
            self.cut.store(true, Ordering::Relaxed);
            return Err(StreamError::Trap(wasmtime::Error::new(
                OutputLimitExceeded { limit: self.limit },
            )));
        }
        buffer.extend_from_slice(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready, and always offering a full permit: a write past the limit must reach
        // `write` to trap, not be cut down to a short write the guest could retry forever.
        Ok(OUTPUT_PERMIT)
    }
}

#[async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = OutputStream::write(&mut *self, Bytes::copy_from_slice(buf))
            .map(|()| buf.len())
            .map_err(|_| std::io::Error::other("output limit exceeded"));
        std::task::Poll::Ready(result)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl CappedOutput {
    /// Appends what the host writes on the guest's behalf (a log line), with the same limit
    /// as the guest's own writes: past it, the error the run traps with.
    pub(crate) fn append(&mut self, bytes: Bytes) -> wasmtime::Result<()> {
        match OutputStream::write(self, bytes) {
            Ok(()) => Ok(()),
            Err(StreamError::Trap(err)) => Err(err),
            Err(other) => Err(wasmtime::Error::msg(other.to_string())),
        }
    }
}
