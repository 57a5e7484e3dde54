//! [`ReuseAlloc`]: a global allocator for programs that run the models on the CPU.
//!
//! A forward pass allocates the same large activations (tens to hundreds of MiB) block after
//! block and step after step. The system allocator hands each one back to the kernel when it is
//! freed and takes fresh pages for the next, so every pass pays a page fault and a page clear
//! per 4 KiB of activations (about 5–8 % of a CPU forward in `cargo xtask bench`).
//! `ReuseAlloc` keeps freed large blocks and hands them out again for a request that fits them
//! (same alignment, at most half of the block unused).
//!
//! New large blocks are advised onto transparent huge pages on Linux (one fault per 2 MiB).
//!
//! Memory stays near the program's own peak: a freed block is kept only while the live plus
//! kept large blocks stay within the most the program has held at once (its high-water mark),
//! and kept blocks are released before a new block would take the total past that mark. The
//! one cost is the unused part of a block lent to a smaller request, which can raise the mark
//! once (in `cargo xtask bench`, peak RSS rose by at most 5 %). Small requests go straight to
//! the system allocator.
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: flux_kernels::ReuseAlloc = flux_kernels::ReuseAlloc::new();
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Requests of at least this many bytes are tracked and kept for reuse.
const LARGE: usize = 1 << 20;
/// How many freed blocks are kept at most.
const SLOTS: usize = 48;

#[derive(Clone, Copy)]
struct Kept {
    ptr: *mut u8,
    size: usize,
    align: usize,
}

struct State {
    /// Bytes in large blocks handed out and not yet freed.
    live: usize,
    /// Bytes in kept blocks.
    kept: usize,
    /// The most `live + kept` has been by the program's own demand.
    high: usize,
    /// Kept blocks, oldest first; `len` of them are valid.
    slots: [Kept; SLOTS],
    len: usize,
    /// Blocks handed out for a smaller request than their size (`size` is the block's own);
    /// `lent` of them are valid.
    loans: [Kept; SLOTS],
    lent: usize,
}

// SAFETY: the raw pointers in `State` are blocks owned by the allocator itself, only ever
// touched under the mutex.
unsafe impl Send for State {}

/// A global allocator that reuses freed large blocks without raising the process's peak
/// memory; see the [module docs](self).
pub struct ReuseAlloc {
    state: Mutex<State>,
}

impl Default for ReuseAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl ReuseAlloc {
    /// An allocator with nothing kept.
    pub const fn new() -> Self {
        const EMPTY: Kept = Kept {
            ptr: std::ptr::null_mut(),
            size: 0,
            align: 0,
        };
        ReuseAlloc {
            state: Mutex::new(State {
                live: 0,
                kept: 0,
                high: 0,
                slots: [EMPTY; SLOTS],
                len: 0,
                loans: [EMPTY; SLOTS],
                lent: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under the lock panics; a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes in large blocks now live (a block lent for a smaller request counts whole), and
    /// now kept for reuse.
    pub fn usage(&self) -> (usize, usize) {
        let s = self.lock();
        (s.live, s.kept)
    }

    /// Releases every kept block to the system.
    pub fn release(&self) {
        let mut s = self.lock();
        while s.len > 0 {
            s.evict_oldest();
        }
    }

    /// A large block for `layout`: the smallest kept one of the same alignment that fits it with
    /// at most half of it unused, else a new one.
    /// Returns it and whether it was reused.
    unsafe fn take(&self, layout: Layout, zeroed: bool) -> (*mut u8, bool) {
        let mut s = self.lock();
        let size = layout.size();
        // The smallest kept block that fits and wastes at most half of itself; a larger one
        // only while its true size can be recorded.
        let fits = |k: &Kept| {
            k.align == layout.align() && k.size >= size && (k.size == size || k.size / 2 < size)
        };
        let best = (0..s.len)
            .filter(|&i| fits(&s.slots[i]) && (s.slots[i].size == size || s.lent < SLOTS))
            .min_by_key(|&i| s.slots[i].size);
        if let Some(i) = best {
            let k = s.remove(i);
            s.kept -= k.size;
            s.live += k.size;
            if k.size != size {
                let n = s.lent;
                s.loans[n] = k;
                s.lent += 1;
            }
            return (k.ptr, true);
        }
        while s.len > 0 && s.live + s.kept + size > s.high {
            s.evict_oldest();
        }
        // SAFETY: `layout` has a non-zero size (it is large).
        let p = unsafe {
            if zeroed {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        };
        if !p.is_null() {
            huge_pages(p, size);
            s.live += size;
            s.high = s.high.max(s.live + s.kept);
        }
        (p, false)
    }

    /// Takes back a large block: kept when there is room under the high-water mark and a free
    /// slot, released otherwise.
    unsafe fn give(&self, ptr: *mut u8, layout: Layout) {
        let mut s = self.lock();
        // A block lent for a smaller request carries its own size.
        let layout = match (0..s.lent).find(|&i| s.loans[i].ptr == ptr) {
            Some(i) => {
                let (k, lent) = (s.loans[i], s.lent);
                s.loans.copy_within(i + 1..lent, i);
                s.lent -= 1;
                // SAFETY: the block's own size and alignment, as it was allocated.
                unsafe { Layout::from_size_align_unchecked(k.size, k.align) }
            }
            None => layout,
        };
        s.live -= layout.size();
        if s.len == SLOTS {
            s.evict_oldest();
        }
        if s.live + s.kept + layout.size() <= s.high {
            let len = s.len;
            s.slots[len] = Kept {
                ptr,
                size: layout.size(),
                align: layout.align(),
            };
            s.len += 1;
            s.kept += layout.size();
        } else {
            // SAFETY: `ptr` came from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) };
        }
    }
}

/// Asks the kernel to back the 2 MiB-aligned interior of a new block with transparent huge
/// pages: one fault and one clear per 2 MiB instead of per 4 KiB. Only advice: where huge
/// pages are off or unavailable nothing changes.
#[cfg(target_os = "linux")]
fn huge_pages(p: *mut u8, size: usize) {
    const HUGE: usize = 2 << 20;
    if size < 2 * HUGE {
        return;
    }
    let start = (p as usize).next_multiple_of(HUGE);
    let end = (p as usize + size) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside a block we own; madvise only changes how its pages
        // are backed, never their contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn huge_pages(_: *mut u8, _: usize) {}

impl State {
    fn remove(&mut self, i: usize) -> Kept {
        let (k, len) = (self.slots[i], self.len);
        self.slots.copy_within(i + 1..len, i);
        self.len -= 1;
        k
    }

    fn evict_oldest(&mut self) {
        let k = self.remove(0);
        self.kept -= k.size;
        // SAFETY: every kept block came from `System` with exactly this size and alignment.
        unsafe { System.dealloc(k.ptr, Layout::from_size_align_unchecked(k.size, k.align)) };
    }
}

// SAFETY: small requests are the system allocator's; large blocks are either handed out once
// (reused only after they were freed) or released to the system with their original layout.
unsafe impl GlobalAlloc for ReuseAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { System.alloc(layout) };
        }
        // SAFETY: as above.
        unsafe { self.take(layout, false).0 }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: as above; a reused block is cleared here, a new one comes zeroed.
        unsafe {
            let (p, reused) = self.take(layout, true);
            if reused {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < LARGE {
            // SAFETY: small blocks are the system's.
            return unsafe { System.dealloc(ptr, layout) };
        }
        // SAFETY: a large block of ours with its layout.
        unsafe { self.give(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < LARGE && new_size < LARGE {
            // SAFETY: small to small stays the system's.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size` forms a valid layout with this alignment.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a fresh block, the common prefix copied, the old one given back.
        unsafe {
            let p = self.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: usize = 1 << 20;

    fn layout(mb: usize) -> Layout {
        Layout::from_size_align(mb * MB, 64).unwrap()
    }

    #[test]
    fn reuses_a_freed_block_of_the_same_size() {
        let a = ReuseAlloc::new();
        unsafe {
            let p = a.alloc(layout(4));
            let q = a.alloc(layout(2));
            a.dealloc(p, layout(4));
            assert_eq!(a.usage(), (2 * MB, 4 * MB));
            let r = a.alloc(layout(4));
            assert_eq!(r, p, "the kept block is handed out again");
            assert_eq!(a.usage(), (6 * MB, 0));
            a.dealloc(q, layout(2));
            a.dealloc(r, layout(4));
            a.release();
            assert_eq!(a.usage(), (0, 0));
        }
    }

    #[test]
    fn lends_a_larger_block_and_takes_it_back_whole() {
        let a = ReuseAlloc::new();
        unsafe {
            let p = a.alloc(layout(8));
            a.dealloc(p, layout(8));
            let q = a.alloc(layout(5));
            assert_eq!(q, p, "5 MiB fits the kept 8 MiB block");
            assert_eq!(a.usage(), (8 * MB, 0));
            a.dealloc(q, layout(5));
            assert_eq!(a.usage(), (0, 8 * MB));
            let r = a.alloc(layout(8));
            assert_eq!(r, p, "taken back at its own size");
            a.dealloc(r, layout(8));
            a.release();
            assert_eq!(a.usage(), (0, 0));
        }
    }

    #[test]
    fn a_repeated_pass_settles_and_stays_near_its_first_peak() {
        let a = ReuseAlloc::new();
        let sizes = [15, 47, 15, 63, 110, 15, 79, 15, 3];
        let mut peaks = vec![];
        for _ in 0..5 {
            let mut peak = 0;
            let mut held = Vec::new();
            for (i, &mb) in sizes.iter().enumerate() {
                unsafe {
                    held.push((a.alloc(layout(mb)), mb));
                    // free every other block as a forward frees its temporaries
                    if i % 2 == 1 {
                        let (p, m) = held.remove(0);
                        a.dealloc(p, layout(m));
                    }
                }
                let (l, k) = a.usage();
                peak = peak.max(l + k);
            }
            for (p, m) in held {
                unsafe { a.dealloc(p, layout(m)) };
            }
            peaks.push(peak);
        }
        a.release();
        // lending a larger block can raise the peak once; then it is the same every pass
        assert!(peaks[1] * 2 <= peaks[0] * 3, "{peaks:?}");
        assert!(peaks[2..].iter().all(|&p| p == peaks[1]), "{peaks:?}");
    }

    #[test]
    fn zeroed_requests_are_zero_after_reuse() {
        let a = ReuseAlloc::new();
        unsafe {
            let p = a.alloc(layout(1));
            std::ptr::write_bytes(p, 0xab, MB);
            a.dealloc(p, layout(1));
            let q = a.alloc_zeroed(layout(1));
            assert_eq!(q, p);
            assert!(std::slice::from_raw_parts(q, MB).iter().all(|&b| b == 0));
            a.dealloc(q, layout(1));
            a.release();
        }
    }

    #[test]
    fn a_new_size_releases_kept_blocks_instead_of_growing() {
        let a = ReuseAlloc::new();
        unsafe {
            let p = a.alloc(layout(8));
            a.dealloc(p, layout(8));
            // 3 MiB does not match the kept 8 MiB; 8 + 3 would pass the high-water mark of 8.
            let q = a.alloc(layout(3));
            assert_eq!(a.usage(), (3 * MB, 0));
            a.dealloc(q, layout(3));
            a.release();
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_the_threshold() {
        let a = ReuseAlloc::new();
        unsafe {
            let small = Layout::from_size_align(1000, 8).unwrap();
            let p = a.alloc(small);
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            let q = a.realloc(p, small, 3 * MB);
            assert!((0..1000).all(|i| *q.add(i) == i as u8));
            let r = a.realloc(q, Layout::from_size_align(3 * MB, 8).unwrap(), 500);
            assert!((0..500).all(|i| *r.add(i) == i as u8));
            a.dealloc(r, Layout::from_size_align(500, 8).unwrap());
            a.release();
            assert_eq!(a.usage(), (0, 0));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random alloc/free sequences: live blocks never overlap and keep their contents, and
        /// live + kept stays within what lending blocks under half unused can cost.
        #[test]
        fn never_overlaps_and_never_grows_past_the_peak(
            ops in proptest::collection::vec((0usize..6, 1usize..5, any::<bool>()), 1..80)
        ) {
            let a = ReuseAlloc::new();
            let mut held: Vec<(*mut u8, Layout, u8)> = Vec::new();
            let (mut live, mut peak_live) = (0usize, 0usize);
            for (n, (pick, mb, free)) in ops.into_iter().enumerate() {
                unsafe {
                    if free && !held.is_empty() {
                        let (p, l, tag) = held.swap_remove(pick % held.len());
                        let s = std::slice::from_raw_parts(p, l.size());
                        prop_assert!(s[0] == tag && s[l.size() - 1] == tag);
                        a.dealloc(p, l);
                        live -= l.size();
                    } else {
                        let l = layout(mb);
                        let p = a.alloc(l);
                        prop_assert!(!p.is_null());
                        let tag = n as u8;
                        std::ptr::write_bytes(p, tag, l.size());
                        held.push((p, l, tag));
                        live += l.size();
                        peak_live = peak_live.max(live);
                    }
                }
                // a block lent for a smaller request counts whole, and wastes under half
                let (l, k) = a.usage();
                prop_assert!(l >= live && l < 2 * live.max(1));
                prop_assert!(l + k <= 2 * peak_live);
            }
            for (p, l, tag) in held {
                unsafe {
                    prop_assert!(*p == tag && *p.add(l.size() - 1) == tag);
                    a.dealloc(p, l);
                }
            }
            a.release();
            prop_assert_eq!(a.usage(), (0, 0));
        }
    }
}
