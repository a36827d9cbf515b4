//! A team of threads: one closure runs on every worker of the current rayon pool, and the
//! members meet at a spinning barrier between phases.
//!
//! A decoding step is a few hundred short phases (a matmul of 576 rows takes microseconds);
//! forking and joining rayon tasks for each, or waking a sleeping thread, costs as much as the
//! phase. A team is started once per forward pass, and inside it every phase ends at a barrier
//! that spins (then yields, so a busy machine degrades instead of stalling).

use std::cell::Cell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins before a waiting member starts yielding its core.
const SPINS_BEFORE_YIELD: u32 = 1 << 14;

struct Shared {
    n: usize,
    count: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
    /// One work counter per dynamically scheduled phase.
    counters: Vec<AtomicUsize>,
}

/// One member's view of the team.
pub struct Team<'a> {
    id: usize,
    shared: &'a Shared,
    /// Phases this member has scheduled dynamically so far (the same sequence on every member).
    phase: Cell<usize>,
}

impl Team<'_> {
    /// This member's index, `0..n()`.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Members in the team.
    pub fn n(&self) -> usize {
        self.shared.n
    }

    /// Waits until every member has reached this barrier.
    pub fn barrier(&self) {
        let s = self.shared;
        if s.n == 1 {
            return;
        }
        let gen = s.generation.load(Ordering::Acquire);
        if s.count.fetch_add(1, Ordering::AcqRel) + 1 == s.n {
            s.count.store(0, Ordering::Relaxed);
            s.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == gen {
            if s.poisoned.load(Ordering::Relaxed) {
                panic!("another member of the thread team panicked");
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// This member's share of `0..len`, split evenly in multiples of `align`.
    pub fn split(&self, len: usize, align: usize) -> Range<usize> {
        split(len, align, self.id, self.n())
    }

    /// Hands out `0..len` in chunks of `chunk` to whichever member asks first, calling `f` on
    /// each chunk this member gets. Every member must call it (in the same order as the other
    /// phases); it does not end with a barrier.
    pub fn for_chunks(&self, len: usize, chunk: usize, mut f: impl FnMut(Range<usize>)) {
        let chunk = chunk.max(1);
        let slot = self.phase.get();
        self.phase.set(slot + 1);
        let Some(counter) = self.shared.counters.get(slot) else {
            // More phases than counters: fall back to an even static split.
            let r = self.split(len, chunk);
            if !r.is_empty() {
                f(r);
            }
            return;
        };
        loop {
            let start = counter.fetch_add(chunk, Ordering::Relaxed);
            if start >= len {
                return;
            }
            f(start..(start + chunk).min(len));
        }
    }
}

/// Part `id` of `n` of `0..len`, in multiples of `align` (the last part takes the remainder).
pub fn split(len: usize, align: usize, id: usize, n: usize) -> Range<usize> {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let per = units / n;
    let extra = units % n;
    let start = (id * per + id.min(extra)) * align;
    let end = start + (per + usize::from(id < extra)) * align;
    start.min(len)..end.min(len)
}

/// Runs `f` once on every thread of the current rayon pool (the caller's pool, or the global
/// one), each with its own [`Team`] member; returns when all have finished. `phases` is the
/// number of [`Team::for_chunks`] calls each member will make (more are split statically).
///
/// `f` must not start rayon work of its own (members spin at barriers while waiting).
pub fn run<F: Fn(&Team) + Sync>(phases: usize, f: F) {
    let n = rayon::current_num_threads().max(1);
    let shared = Shared {
        n,
        count: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        poisoned: AtomicBool::new(false),
        counters: (0..phases).map(|_| AtomicUsize::new(0)).collect(),
    };
    let member = |id: usize| {
        let team = Team {
            id,
            shared: &shared,
            phase: Cell::new(0),
        };
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(&team))) {
            shared.poisoned.store(true, Ordering::Relaxed);
            resume_unwind(e);
        }
    };
    if n == 1 {
        member(0);
    } else {
        rayon::broadcast(|ctx| member(ctx.index()));
    }
}

/// A raw pointer to a buffer whose disjoint parts are written by different team members.
#[derive(Clone, Copy)]
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: members write disjoint index ranges (each phase's split guarantees it) and read
// only after a barrier; the pointer is valid for the duration of `run`.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(buf: &mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` elements from `start`, mutable.
    ///
    /// # Safety
    /// No other member may access the range until the next barrier; `start + len ≤ self.len()`
    /// (checked, panics otherwise).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "SharedMut range out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// No other member accesses element `i` until the next barrier (bounds are checked).
    #[inline(always)]
    pub unsafe fn set(&self, i: usize, v: T) {
        assert!(i < self.len, "SharedMut index out of bounds");
        *self.ptr.add(i) = v;
    }

    /// Reads element `i`.
    ///
    /// # Safety
    /// No other member writes element `i` until the next barrier (bounds are checked).
    #[inline(always)]
    pub unsafe fn get(&self, i: usize) -> T
    where
        T: Copy,
    {
        assert!(i < self.len, "SharedMut index out of bounds");
        *self.ptr.add(i)
    }

    /// `len` elements from `start`, shared.
    ///
    /// # Safety
    /// No member may write the range until the next barrier; bounds as for `slice_mut`.
    pub unsafe fn slice(&self, start: usize, len: usize) -> &[T] {
        assert!(start + len <= self.len, "SharedMut range out of bounds");
        std::slice::from_raw_parts(self.ptr.add(start), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything_once() {
        for len in [0, 1, 31, 32, 33, 576, 1536, 49152] {
            for n in 1..5 {
                for align in [1, 4, 32] {
                    let parts: Vec<_> = (0..n).map(|i| split(len, align, i, n)).collect();
                    let mut next = 0;
                    for p in &parts {
                        assert_eq!(p.start, next.min(len), "{len} {n} {align}");
                        assert!(p.start % align == 0 || p.is_empty());
                        next = p.end.max(next);
                    }
                    assert_eq!(next, len);
                }
            }
        }
    }

    #[test]
    fn phases_see_each_others_writes() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let mut a = vec![0usize; 1000];
        let mut b = vec![0usize; 1000];
        let (pa, pb) = (SharedMut::new(&mut a), SharedMut::new(&mut b));
        pool.install(|| {
            run(64, |team| {
                for round in 1..50 {
                    team.for_chunks(1000, 7, |r| {
                        let s = unsafe { pa.slice_mut(r.start, r.len()) };
                        for (i, v) in s.iter_mut().enumerate() {
                            *v = round * (r.start + i);
                        }
                    });
                    team.barrier();
                    // Read what other members wrote, in a statically split phase.
                    let r = team.split(1000, 1);
                    let src = unsafe { pa.slice(0, 1000) };
                    let dst = unsafe { pb.slice_mut(r.start, r.len()) };
                    for (i, v) in dst.iter_mut().enumerate() {
                        *v = src[999 - (r.start + i)];
                    }
                    team.barrier();
                }
            })
        });
        for (i, v) in b.iter().enumerate() {
            assert_eq!(*v, 49 * (999 - i));
        }
    }

    #[test]
    fn a_panicking_member_does_not_hang_the_team() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool.install(|| {
                run(0, |team| {
                    if team.id() == 1 {
                        panic!("boom");
                    }
                    team.barrier();
                })
            })
        }));
        assert!(r.is_err());
    }
}
