//! The static (musl) agent's memory allocator: the system allocator, except that large blocks
//! are mapped from the kernel directly.
//!
//! Why: musl's `calloc` fills even memory fresh from `mmap` with zeros, which makes every page
//! of a zeroed allocation resident at once. sled allocates about forty zeroed 512 KiB
//! histograms when it opens and writes few of their pages, so a static agent held about
//! 20 MiB of zero pages, twice the rest of it at idle (docs/BENCHMARKS.md). Pages fresh from
//! `mmap` are zero already and cost nothing until written; glibc's allocator knows that, and
//! so does this one. Blocks of 128 KiB and more (musl maps those itself, so the number of
//! system calls does not change) are mapped and unmapped here; everything else is the system
//! allocator's.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::{self, NonNull};

use rustix::mm::{MapFlags, MremapFlags, ProtFlags};

/// Blocks from this size on are mapped directly.
const LARGE: usize = 128 * 1024;
/// The alignment a fresh mapping always has.
const PAGE: usize = 4096;

/// The system allocator, with large blocks mapped directly (see the module's comment).
#[derive(Debug, Default)]
pub struct LargeBlocksMapped;

fn is_large(size: usize, align: usize) -> bool {
    size >= LARGE && align <= PAGE
}

/// A fresh private anonymous mapping: zeroed by the kernel, resident only once written.
fn map(size: usize) -> *mut u8 {
    // SAFETY: a new anonymous mapping aliases nothing.
    let mapped = unsafe {
        rustix::mm::mmap_anonymous(
            ptr::null_mut(),
            size,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    };
    mapped.map_or(ptr::null_mut(), |block| block.cast())
}

// SAFETY: large blocks are whole mappings made by `map`, handed out once and unmapped only
// through `dealloc` or `realloc` with the size they were made with (the layout's); every
// other block is the system allocator's, which `is_large` tells apart by the same layout.
unsafe impl GlobalAlloc for LargeBlocksMapped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            map(layout.size())
        } else {
            // SAFETY: forwarded as the caller gave it.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align()) {
            // A fresh mapping is zeroed already; nothing is written, nothing made resident.
            map(layout.size())
        } else {
            // SAFETY: forwarded as the caller gave it.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if is_large(layout.size(), layout.align()) {
            // SAFETY: a large block is a whole mapping of this size (see the impl's comment).
            // An unmapping cannot fail for a mapping made by `map`, and a dealloc has no way
            // to report it anyway.
            let _ = unsafe { rustix::mm::munmap(block.cast(), layout.size()) };
        } else {
            // SAFETY: forwarded as the caller gave it.
            unsafe { System.dealloc(block, layout) }
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (was_large, is_now_large) = (
            is_large(layout.size(), layout.align()),
            is_large(new_size, layout.align()),
        );
        if !was_large && !is_now_large {
            // SAFETY: forwarded as the caller gave it.
            return unsafe { System.realloc(block, layout, new_size) };
        }
        if was_large && is_now_large {
            // SAFETY: `block` is a whole mapping of `layout.size()` bytes; the kernel moves
            // it if it cannot grow in place, keeping its contents.
            let moved = unsafe {
                rustix::mm::mremap(block.cast(), layout.size(), new_size, MremapFlags::MAYMOVE)
            };
            return moved.map_or(ptr::null_mut(), |block| block.cast());
        }
        // From one kind of block to the other: a new block, the contents, the old one freed.
        // SAFETY: `new_size` with the old alignment is a valid layout (the caller's contract).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a valid, non-zero layout.
        let new_block = unsafe { self.alloc(new_layout) };
        if let Some(new_block) = NonNull::new(new_block) {
            // SAFETY: both blocks hold at least the smaller size and do not overlap; the old
            // block is freed with the layout it was allocated with.
            unsafe {
                ptr::copy_nonoverlapping(block, new_block.as_ptr(), layout.size().min(new_size));
                self.dealloc(block, layout);
            }
        }
        new_block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    #[test]
    fn large_zeroed_blocks_are_zero_and_usable() {
        let allocator = LargeBlocksMapped;
        let size = 512 * 1024;
        // SAFETY: a valid layout; the block is freed with it.
        unsafe {
            let block = allocator.alloc_zeroed(layout(size));
            assert!(!block.is_null());
            let bytes = std::slice::from_raw_parts_mut(block, size);
            assert!(bytes.iter().all(|byte| *byte == 0));
            bytes[size - 1] = 7;
            allocator.dealloc(block, layout(size));
        }
    }

    #[test]
    fn blocks_keep_their_contents_across_every_kind_of_realloc() {
        let allocator = LargeBlocksMapped;
        // Small, then large, then larger, then small again.
        let sizes = [1_000, 200_000, 900_000, 3_000];
        // SAFETY: every block is used within its size and freed with its layout.
        unsafe {
            let mut size = sizes[0];
            let mut block = allocator.alloc(layout(size));
            for (i, byte) in std::slice::from_raw_parts_mut(block, size)
                .iter_mut()
                .enumerate()
            {
                *byte = (i % 251) as u8;
            }
            // The bytes written at first, which every later block must still start with.
            let written = sizes[0];
            for &next in &sizes[1..] {
                let kept = written.min(next);
                block = allocator.realloc(block, layout(size), next);
                assert!(!block.is_null());
                let bytes = std::slice::from_raw_parts(block, kept);
                assert!(
                    bytes
                        .iter()
                        .enumerate()
                        .all(|(i, byte)| *byte == (i % 251) as u8),
                    "contents lost going from {size} to {next} bytes"
                );
                size = next;
            }
            allocator.dealloc(block, layout(size));
        }
    }
}
