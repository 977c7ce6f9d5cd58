//! The app store of the namespace the task was granted (`kv` grant): the same keys the SDK's
//! `Client::kv(namespace)` and `apiary kv` see.
//!
//! Keys are dot-joined tokens of `[A-Za-z0-9_=/-]`. Every write returns the key's new
//! revision; [`update`] writes only over the revision it is given, which makes a
//! read-modify-write safe against other tasks doing the same (see the `kv-counter` example).

use crate::{Error, check, sys};

/// A key's value and its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// The value under `key`, if it has one.
pub fn get(key: &str) -> Result<Option<Entry>, Error> {
    let mut buffer = vec![0u8; 1024];
    loop {
        let mut len = 0u32;
        let mut revision = 0u64;
        // SAFETY: the pointers describe live, writable memory of the stated sizes.
        let status = unsafe {
            sys::kv_get(
                key.as_ptr(),
                key.len(),
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut len,
                &mut revision,
            )
        };
        match status {
            sys::NOT_FOUND => return Ok(None),
            // The value grew past the buffer: ask again with room for it.
            sys::BUFFER_TOO_SMALL => buffer.resize(len as usize, 0),
            status => {
                check(status)?;
                buffer.truncate(len as usize);
                return Ok(Some(Entry {
                    value: buffer,
                    revision,
                }));
            }
        }
    }
}

/// Sets `key` to `value`; returns the new revision.
pub fn put(key: &str, value: &[u8]) -> Result<u64, Error> {
    // SAFETY: as in `get`.
    write(|revision| unsafe {
        sys::kv_put(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            revision,
        )
    })
}

/// Sets `key` to `value` only if it has no value ([`crate::ErrorKind::Conflict`] if it has).
pub fn create(key: &str, value: &[u8]) -> Result<u64, Error> {
    // SAFETY: as in `get`.
    write(|revision| unsafe {
        sys::kv_create(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            revision,
        )
    })
}

/// Sets `key` to `value` only if its latest revision is `revision` (compare-and-swap;
/// [`crate::ErrorKind::Conflict`] if it has moved on).
pub fn update(key: &str, value: &[u8], revision: u64) -> Result<u64, Error> {
    // SAFETY: as in `get`.
    write(|new_revision| unsafe {
        sys::kv_update(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            revision,
            new_revision,
        )
    })
}

/// Deletes `key`'s value.
pub fn delete(key: &str) -> Result<(), Error> {
    // SAFETY: as in `get`.
    check(unsafe { sys::kv_delete(key.as_ptr(), key.len()) }).map(drop)
}

/// The keys with a value that start with `prefix` (`""` for all), in order.
pub fn keys(prefix: &str) -> Result<Vec<String>, Error> {
    let mut keys: Vec<String> = Vec::new();
    let mut buffer = vec![0u8; 4096];
    loop {
        let after = keys.last().map_or("", String::as_str);
        let mut len = 0u32;
        // SAFETY: as in `get`.
        let status = unsafe {
            sys::kv_keys(
                prefix.as_ptr(),
                prefix.len(),
                after.as_ptr(),
                after.len(),
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut len,
            )
        };
        if status == sys::BUFFER_TOO_SMALL {
            buffer.resize(len as usize, 0);
            continue;
        }
        if check(status)? == 0 {
            return Ok(keys);
        }
        let page = String::from_utf8_lossy(&buffer[..len as usize]).into_owned();
        keys.extend(page.lines().map(str::to_owned));
    }
}

fn write(call: impl FnOnce(*mut u64) -> i32) -> Result<u64, Error> {
    let mut revision = 0u64;
    check(call(&mut revision))?;
    Ok(revision)
}
