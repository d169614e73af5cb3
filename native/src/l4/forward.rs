//! Moving bytes both ways between two connected sockets.
//!
//! Each direction starts every readiness round with one plain `read` into the worker's shared
//! scratch buffer and writes it straight out: for request/response traffic that is two
//! syscalls and no pipe. Only when a read fills the whole buffer (a bulk transfer) does the rest
//! of the round go through `splice(2)` socket -> pipe -> socket, zero-copy.
//! `SPLICE_THRESHOLD` is where splice starts to cost less CPU than read/write (bench/README).
//!
//! Syscall economy: a read shorter than the buffer means the socket's receive queue was empty
//! at that moment, so the readiness tokio holds is cleared right there (the closure reports
//! WouldBlock to `try_io`) instead of paying a second `read` that returns EAGAIN. Any byte that
//! arrives later raises a new edge, which the reactor records with a newer tick, so no wake-up is
//! lost. The same rule keeps splice's ambiguous EAGAIN safe: we only splice into an *empty* pipe,
//! so EAGAIN there can only mean "socket empty".
//!
//! Memory: the relay is one hand-written poll loop over `poll_read_ready`/`poll_write_ready`
//! rather than two `async` copy loops, so an idle connection's task holds two small direction
//! states and one timer (idle RSS per connection is a benchmark target). Bytes a slow peer has
//! not taken yet go to a boxed stash that exists only while they wait.

use super::pipe::{splice, Pipe, PipePool};
use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Reads up to this size use read/write through the scratch buffer; a read that fills it
/// switches the rest of the round to splice. `bench/splice_threshold.py` (proxy CPU per
/// keep-alive response, one worker): read/write is cheaper up to 16 KiB (splice costs 1.2-1.3x),
/// splice wins from 64 KiB (0.9x) and by far beyond (0.3-0.6x at 256 KiB-1 MiB).
pub const SPLICE_THRESHOLD: usize = 64 * 1024;

/// Buffers one worker thread shares between all its connections. A connection only owns memory
/// of its own while a write to a slow peer is pending.
pub struct RelayBuffers {
    /// As long as the splice threshold: a read that fills it switches to splice.
    pub(crate) scratch: RefCell<Box<[u8]>>,
    pub(crate) pipes: PipePool,
}

impl RelayBuffers {
    /// Reads of this size or more switch a transfer to splice.
    pub fn splice_threshold(&self) -> usize {
        self.scratch.borrow().len()
    }

    pub fn new(splice_threshold: usize) -> Self {
        RelayBuffers {
            scratch: RefCell::new(vec![0u8; splice_threshold.max(1024)].into_boxed_slice()),
            pipes: PipePool::default(),
        }
    }
}

/// Why a relay ended early.
#[derive(Debug)]
pub enum RelayEnd {
    /// No byte moved either way for the idle timeout.
    Idle,
    /// A socket error on either side (reset, broken pipe, ...).
    Error(io::Error),
}

/// Byte counts of a relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Client to backend.
    pub upstream: u64,
    /// Backend to client.
    pub downstream: u64,
}

/// Most pipe-fulls one direction splices before letting other connections run.
const SPLICE_ROUNDS_PER_POLL: usize = 16;

/// Bytes read from one side that the other side has not taken yet.
enum Stash {
    Bytes { buf: Vec<u8>, sent: usize },
    Pipe(Pipe),
}

/// One direction of a relay.
#[derive(Default)]
struct Direction {
    /// EOF seen on the source and forwarded.
    done: bool,
    stash: Option<Box<Stash>>,
    moved: u64,
}

/// Relays until both directions have seen EOF (each half-close is forwarded with
/// `shutdown(SHUT_WR)`), a socket fails, or nothing moves for `idle` (zero = no limit).
/// `timer` is the connection's one timer, reused here for the idle timeout.
pub async fn relay(
    bufs: &RelayBuffers,
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    mut timer: Pin<&mut Sleep>,
) -> Result<Moved, (RelayEnd, Moved)> {
    let mut up = Direction::default();
    let mut down = Direction::default();
    let mut last_activity = Instant::now();
    if !idle.is_zero() {
        timer.as_mut().reset(last_activity + idle);
    }
    let result = poll_fn(|cx| {
        let mut active = false;
        if let Err(e) = step(cx, bufs, client, backend, &mut up, down.done, &mut active) {
            return Poll::Ready(Err(RelayEnd::Error(e)));
        }
        if let Err(e) = step(cx, bufs, backend, client, &mut down, up.done, &mut active) {
            return Poll::Ready(Err(RelayEnd::Error(e)));
        }
        if up.done && down.done {
            return Poll::Ready(Ok(()));
        }
        idle_check(cx, timer.as_mut(), idle, &mut last_activity, active)
    })
    .await;
    let moved = Moved {
        upstream: up.moved,
        downstream: down.moved,
    };
    match result {
        Ok(()) => Ok(moved),
        Err(end) => Err((end, moved)),
    }
}

/// A relay's idle timeout, after a round of both directions: Pending while something moved
/// within `idle` (zero: no limit), Ready(Idle) once nothing has. `last_activity` is only stamped
/// here; the timer is re-armed lazily, once per idle period.
pub(crate) fn idle_check(
    cx: &mut Context<'_>,
    mut timer: Pin<&mut Sleep>,
    idle: Duration,
    last_activity: &mut Instant,
    active: bool,
) -> Poll<Result<(), RelayEnd>> {
    if idle.is_zero() {
        return Poll::Pending;
    }
    if active {
        *last_activity = Instant::now();
    }
    while timer.as_mut().poll(cx).is_ready() {
        let due = *last_activity + idle;
        if due <= Instant::now() {
            return Poll::Ready(Err(RelayEnd::Idle));
        }
        timer.as_mut().reset(due);
    }
    Poll::Pending
}

/// Drives one direction; on EOF forwards the half-close.
fn step(
    cx: &mut Context<'_>,
    bufs: &RelayBuffers,
    src: &TcpStream,
    dst: &TcpStream,
    dir: &mut Direction,
    other_done: bool,
    active: &mut bool,
) -> io::Result<()> {
    if dir.done {
        return Ok(());
    }
    if let Poll::Ready(result) = pump(cx, bufs, src, dst, dir, active) {
        result?;
        dir.done = true;
        // When the other way is finished too, close() sends the FIN: skip a syscall.
        if !other_done {
            shutdown_write(dst.as_raw_fd());
        }
    }
    Ok(())
}

/// Moves what `src` has to `dst` until one of them would block (Pending, wakers registered) or
/// `src` reaches EOF (Ready(Ok)).
fn pump(
    cx: &mut Context<'_>,
    bufs: &RelayBuffers,
    src: &TcpStream,
    dst: &TcpStream,
    dir: &mut Direction,
    active: &mut bool,
) -> Poll<io::Result<()>> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    loop {
        if let Some(stash) = dir.stash.as_deref_mut() {
            ready!(flush(cx, dst, dst_fd, stash))?;
            if let Some(stash) = dir.stash.take() {
                if let Stash::Pipe(pipe) = *stash {
                    bufs.pipes.give(pipe);
                }
            }
        }
        // Also spends tokio's cooperative budget, so a busy transfer yields to other tasks.
        ready!(src.poll_read_ready(cx))?;
        let mut scratch = bufs.scratch.borrow_mut();
        let want = scratch.len();
        let n = match read_clearing(src, src_fd, &mut scratch[..want]) {
            Ok(0) => return Poll::Ready(Ok(())),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        };
        *active = true;
        dir.moved += n as u64;
        let written = write_now(dst, dst_fd, &scratch[..n])?;
        if written < n {
            // The peer is slow: keep the rest in a buffer of this connection's own.
            let buf = scratch[written..n].to_vec();
            dir.stash = Some(Box::new(Stash::Bytes { buf, sent: 0 }));
        } else if n == want {
            drop(scratch);
            if let Some(pipe) = splice_round(bufs, src, dst, dir)? {
                dir.stash = Some(Box::new(Stash::Pipe(pipe)));
            }
        }
    }
}

/// Splices `src` into `dst` through a pooled pipe until `src` is empty for now, at EOF, or the
/// round's budget is spent. Returns the pipe if `dst` stopped taking bytes with some still in it.
fn splice_round(
    bufs: &RelayBuffers,
    src: &TcpStream,
    dst: &TcpStream,
    dir: &mut Direction,
) -> io::Result<Option<Pipe>> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut pipe = bufs.pipes.take()?;
    for _ in 0..SPLICE_ROUNDS_PER_POLL {
        debug_assert_eq!(pipe.len, 0);
        // The pipe is empty, so EAGAIN here means the socket is empty: clear readiness. EOF
        // (0) leaves readiness set, and the caller's next read sees it.
        let n = match src.try_io(Interest::READABLE, || {
            splice(src_fd, pipe.write_fd(), pipe.capacity)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        };
        pipe.len = n;
        dir.moved += n as u64;
        while pipe.len > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read_fd(), dst_fd, pipe.len)
            }) {
                Ok(m) => pipe.len -= m,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Some(pipe)),
                Err(e) => return Err(e),
            }
        }
    }
    bufs.pipes.give(pipe);
    Ok(None)
}

/// Writes a stash out as `dst` takes it; Ready(Ok) once it is empty.
fn flush(
    cx: &mut Context<'_>,
    dst: &TcpStream,
    dst_fd: RawFd,
    stash: &mut Stash,
) -> Poll<io::Result<()>> {
    loop {
        ready!(dst.poll_write_ready(cx))?;
        let emptied = match stash {
            Stash::Bytes { buf, sent } => {
                let n = write_now(dst, dst_fd, &buf[*sent..])?;
                *sent += n;
                *sent == buf.len()
            }
            Stash::Pipe(pipe) => match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read_fd(), dst_fd, pipe.len)
            }) {
                Ok(m) => {
                    pipe.len -= m;
                    pipe.len == 0
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(e) => return Poll::Ready(Err(e)),
            },
        };
        if emptied {
            return Poll::Ready(Ok(()));
        }
    }
}

/// One `recv` (rather than `read`: a socket call skips the VFS layers, ~1% of a proxied
/// request in perf). A short read clears tokio's readiness (see the module doc), saving the
/// EAGAIN read that would otherwise follow.
#[inline]
pub(crate) fn read_clearing(src: &TcpStream, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let got = Cell::new(None);
    let r = src.try_io(Interest::READABLE, || {
        // SAFETY: buf is valid for buf.len() bytes for the duration of the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > 0 && n < buf.len() {
            got.set(Some(n));
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, got.get()) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

/// As much of `buf` as the socket takes now (possibly 0); `send` with MSG_NOSIGNAL, so a peer
/// gone away is an EPIPE error, never a signal.
#[inline]
pub(crate) fn write_now(dst: &TcpStream, fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        match dst.try_io(Interest::WRITABLE, || {
            // SAFETY: rest is valid for rest.len() bytes for the duration of the call.
            let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown on a socket we hold open; an error (peer gone) changes nothing here.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}
