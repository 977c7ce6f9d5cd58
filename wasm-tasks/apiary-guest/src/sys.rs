//! The raw `apiary` imports and their status codes, as apiary's docs/PROTOCOL.md ("Host APIs
//! for guests") defines them. Prefer the safe wrappers of the crate's other modules.
//!
//! Every function returns 0 (or a count) on success and a negative status on failure.
//! Pointers and lengths are into the module's exported `memory`. Off `wasm32` (this crate's
//! own tests) every call returns [`UNAVAILABLE`].
#![allow(unsafe_code)]

pub const OK: i32 = 0;
pub const NOT_GRANTED: i32 = -1;
pub const NOT_FOUND: i32 = -2;
pub const CONFLICT: i32 = -3;
pub const INVALID_NAME: i32 = -4;
pub const TOO_LARGE: i32 = -5;
pub const BUFFER_TOO_SMALL: i32 = -6;
pub const UNAVAILABLE: i32 = -7;
pub const BAD_POINTER: i32 = -8;
pub const INVALID_ARGUMENT: i32 = -9;

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "apiary")]
unsafe extern "C" {
    pub fn kv_get(
        key: *const u8,
        key_len: usize,
        buf: *mut u8,
        buf_cap: usize,
        len_out: *mut u32,
        revision_out: *mut u64,
    ) -> i32;
    pub fn kv_put(
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
        revision_out: *mut u64,
    ) -> i32;
    pub fn kv_create(
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
        revision_out: *mut u64,
    ) -> i32;
    pub fn kv_update(
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
        expected_revision: u64,
        revision_out: *mut u64,
    ) -> i32;
    pub fn kv_delete(key: *const u8, key_len: usize) -> i32;
    pub fn kv_keys(
        prefix: *const u8,
        prefix_len: usize,
        after: *const u8,
        after_len: usize,
        buf: *mut u8,
        buf_cap: usize,
        len_out: *mut u32,
    ) -> i32;
    pub fn publish(
        topic: *const u8,
        topic_len: usize,
        payload: *const u8,
        payload_len: usize,
    ) -> i32;
    pub fn log(level: u32, message: *const u8, message_len: usize) -> i32;
}

#[cfg(not(target_arch = "wasm32"))]
mod off_wasm {
    use super::UNAVAILABLE;

    pub unsafe fn kv_get(
        _: *const u8,
        _: usize,
        _: *mut u8,
        _: usize,
        _: *mut u32,
        _: *mut u64,
    ) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn kv_put(_: *const u8, _: usize, _: *const u8, _: usize, _: *mut u64) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn kv_create(_: *const u8, _: usize, _: *const u8, _: usize, _: *mut u64) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn kv_update(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u64,
        _: *mut u64,
    ) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn kv_delete(_: *const u8, _: usize) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn kv_keys(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *mut u8,
        _: usize,
        _: *mut u32,
    ) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn publish(_: *const u8, _: usize, _: *const u8, _: usize) -> i32 {
        UNAVAILABLE
    }
    pub unsafe fn log(_: u32, _: *const u8, _: usize) -> i32 {
        UNAVAILABLE
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use off_wasm::*;
