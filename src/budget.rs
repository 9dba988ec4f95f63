//! A memory budget while a pipeline file loads.
//!
//! Templates are bounded in steps (fuel) and in the text they render, but a few bytes of
//! template can still build a huge value before anything is written: each `{% set b = a ~ a %}`
//! doubles a string, and minijinja has no allocation limit. While a pipeline loads and is
//! planned, the process's data limit (RLIMIT_DATA) is lowered to what it uses now plus
//! [`LOAD_BUDGET`], and the global allocator turns a failed allocation in that window into a
//! clear error and exit code 2 instead of an abort, or, without the limit, a machine out of
//! memory. Nothing has run at that point, so exiting at once loses nothing.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

/// Memory a pipeline file may take to load and plan, beyond what fpipe used before. The
/// largest seed pipeline takes a few megabytes.
pub const LOAD_BUDGET: u64 = 1 << 30;

static LOADING: AtomicBool = AtomicBool::new(false);

/// mimalloc, with an allocation failure during [`while_loading`] reported as bad input.
pub struct Allocator;

// SAFETY: every call is forwarded to mimalloc unchanged; only a null result is looked at.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        checked(unsafe { mimalloc::MiMalloc.alloc(layout) })
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        checked(unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) })
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        checked(unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) })
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

fn checked(ptr: *mut u8) -> *mut u8 {
    if ptr.is_null() && LOADING.load(Ordering::Relaxed) {
        // No allocation is possible here: write a fixed message and leave.
        const MSG: &[u8] = b"error: the pipeline file needed more than 1 GiB of memory to load (a template that builds huge values?); nothing ran\n  hint: templates are for parameters and short loops over them; generate very large pipelines with a script instead\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe and take plain arguments.
        #[cfg(unix)]
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(2);
        }
    }
    ptr
}

/// Runs `f` (loading and planning a pipeline) with the data limit lowered to the current use
/// plus [`LOAD_BUDGET`], restoring the limit afterwards.
pub fn while_loading<T>(f: impl FnOnce() -> T) -> T {
    let restore = lower_limit();
    LOADING.store(true, Ordering::Relaxed);
    let out = f();
    LOADING.store(false, Ordering::Relaxed);
    if let Some(old) = restore {
        // SAFETY: setrlimit with a valid struct; raising the soft limit back to its old value
        // is allowed (it never exceeds the hard limit).
        #[cfg(target_os = "linux")]
        unsafe {
            libc::setrlimit(libc::RLIMIT_DATA, &old);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = old;
    }
    out
}

/// Lowers RLIMIT_DATA's soft limit to the data now in use plus the budget; returns the old
/// limit to restore, or `None` where that is not possible (not Linux, no /proc).
#[cfg(target_os = "linux")]
fn lower_limit() -> Option<libc::rlimit> {
    // /proc/self/statm: size resident shared text lib data dt, in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let data_pages: u64 = statm.split_whitespace().nth(5)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_DATA, &mut old) } != 0 {
        return None;
    }
    let want = (data_pages * page).saturating_add(LOAD_BUDGET);
    if want >= old.rlim_cur {
        return None; // already as low as that
    }
    let lowered = libc::rlimit {
        rlim_cur: want,
        rlim_max: old.rlim_max,
    };
    // SAFETY: setrlimit with a valid struct; lowering the soft limit is always allowed.
    (unsafe { libc::setrlimit(libc::RLIMIT_DATA, &lowered) } == 0).then_some(old)
}

#[cfg(not(target_os = "linux"))]
fn lower_limit() -> Option<()> {
    None
}
