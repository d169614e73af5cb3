//! Read buffers a worker lends to connections only while a request is in flight: an idle
//! keep-alive connection owns no buffer (idle RSS per client connection is a target).

use std::cell::RefCell;

/// Size of a pooled buffer: a typical request head, a chunk of body or a response head plus
/// the start of its body in one read.
pub const BUF_SIZE: usize = 16 * 1024;

/// Buffers kept per worker beyond those in use; more are freed when returned.
const POOL_MAX: usize = 1024;

/// A byte buffer with a filled window `start..end`.
pub struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(size: usize) -> Buf {
        Buf {
            data: vec![0u8; size].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The bytes read and not consumed yet.
    #[inline]
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Drops the first `n` filled bytes.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Free space after the filled bytes, moving them to the front first when that makes
    /// room; grows the buffer up to `max_len` when it is full. Empty when `max_len` is reached.
    pub fn spare(&mut self, max_len: usize) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.data.len() && self.data.len() < max_len {
            let mut bigger = vec![0u8; (self.data.len() * 2).min(max_len)].into_boxed_slice();
            bigger[..self.end - self.start].copy_from_slice(self.filled());
            self.end -= self.start;
            self.start = 0;
            self.data = bigger;
        }
        &mut self.data[self.end..]
    }

    /// Makes an empty buffer at least `len` long, so one read can take that much (a buffer
    /// grown beyond BUF_SIZE is freed, not pooled, when given back).
    pub fn grow_empty_to(&mut self, len: usize) {
        if self.is_empty() && self.data.len() < len {
            self.data = vec![0u8; len].into_boxed_slice();
            self.clear();
        }
    }

    /// Marks `n` bytes of `spare()` as filled.
    #[inline]
    pub fn advance(&mut self, n: usize) {
        self.end += n;
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let spare = self.spare(usize::MAX);
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            self.advance(n);
            rest = &rest[n..];
        }
    }
}

/// A worker's free buffers (single-threaded: the worker's tasks share it).
#[derive(Default)]
pub struct BufPool {
    free: RefCell<Vec<Buf>>,
    /// Byte vectors for heads being written (request to a backend, response to a client).
    free_vecs: RefCell<Vec<Vec<u8>>>,
}

impl BufPool {
    pub fn take(&self) -> Buf {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Buf::new(BUF_SIZE))
    }

    pub fn give(&self, mut buf: Buf) {
        let mut free = self.free.borrow_mut();
        // A buffer grown for a large head goes back to the allocator.
        if buf.data.len() == BUF_SIZE && free.len() < POOL_MAX {
            buf.clear();
            free.push(buf);
        }
    }

    pub fn take_vec(&self) -> Vec<u8> {
        self.free_vecs
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(1024))
    }

    pub fn give_vec(&self, mut v: Vec<u8>) {
        let mut free = self.free_vecs.borrow_mut();
        if v.capacity() <= BUF_SIZE * 4 && free.len() < POOL_MAX {
            v.clear();
            free.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_compacts_then_grows_to_the_limit() {
        let mut b = Buf::new(8);
        b.extend_from_slice(b"abcdefgh");
        b.consume(3);
        assert_eq!(b.spare(8).len(), 3, "compacted");
        assert_eq!(b.filled(), b"defgh");
        b.extend_from_slice(b"123");
        assert_eq!(b.spare(8).len(), 0, "full at the limit");
        assert_eq!(b.spare(16).len(), 8, "grown");
        assert_eq!(b.filled(), b"defgh123");
    }

    #[test]
    fn only_an_empty_buffer_grows_for_a_bulk_read() {
        let pool = BufPool::default();
        let mut b = pool.take();
        b.extend_from_slice(b"x");
        b.grow_empty_to(4 * BUF_SIZE);
        assert_eq!(
            b.spare(4 * BUF_SIZE).len(),
            BUF_SIZE - 1,
            "not empty: left as it is"
        );
        b.clear();
        b.grow_empty_to(4 * BUF_SIZE);
        assert_eq!(b.spare(4 * BUF_SIZE).len(), 4 * BUF_SIZE);
        pool.give(b);
        assert!(pool.free.borrow().is_empty(), "grown buffer freed");
    }

    #[test]
    fn pool_reuses_standard_buffers_only() {
        let pool = BufPool::default();
        let mut b = pool.take();
        b.extend_from_slice(&vec![1u8; BUF_SIZE + 1]);
        pool.give(b);
        assert!(pool.free.borrow().is_empty(), "grown buffer freed");
        pool.give(pool.take());
        assert_eq!(pool.free.borrow().len(), 1);
        assert!(pool.take().is_empty());
    }
}
