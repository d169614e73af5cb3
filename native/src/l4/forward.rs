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

use super::pipe::{splice, Pipe, PipePool};
use std::cell::{Cell, RefCell};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Reads up to this size use read/write through the scratch buffer; a read that fills it
/// switches the rest of the round to splice. Measured in bench/splice_threshold.py.
pub const SPLICE_THRESHOLD: usize = 16 * 1024;

/// Buffers one worker thread shares between all its connections. A connection only owns memory
/// of its own while a write to a slow peer is pending.
pub struct RelayBuffers {
    scratch: RefCell<Box<[u8]>>,
    pipes: PipePool,
    splice_threshold: usize,
}

impl RelayBuffers {
    pub fn new(splice_threshold: usize) -> Self {
        RelayBuffers {
            scratch: RefCell::new(vec![0u8; splice_threshold.max(1024)].into_boxed_slice()),
            pipes: PipePool::default(),
            splice_threshold,
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

/// Byte counts of a finished relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Client to backend.
    pub upstream: u64,
    /// Backend to client.
    pub downstream: u64,
}

/// Relays until both directions have seen EOF (each half-close is forwarded with
/// `shutdown(SHUT_WR)`), a socket fails, or nothing moves for `idle` (zero = no limit).
pub async fn relay(
    bufs: &RelayBuffers,
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
) -> Result<Moved, (RelayEnd, Moved)> {
    let last_activity = Cell::new(Instant::now());
    let up_bytes = Cell::new(0u64);
    let down_bytes = Cell::new(0u64);
    let up = one_way(bufs, client, backend, &last_activity, &up_bytes);
    let down = one_way(bufs, backend, client, &last_activity, &down_bytes);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let idle_watch = idle_timer(idle, &last_activity);
    tokio::pin!(idle_watch);
    let moved = || Moved {
        upstream: up_bytes.get(),
        downstream: down_bytes.get(),
    };
    while !(up_done && down_done) {
        let result = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r }
            r = &mut down, if !down_done => { down_done = true; r }
            _ = &mut idle_watch => return Err((RelayEnd::Idle, moved())),
        };
        if let Err(e) = result {
            return Err((RelayEnd::Error(e), moved()));
        }
    }
    Ok(moved())
}

/// Completes once `last_activity` is `idle` old; never when `idle` is zero.
async fn idle_timer(idle: Duration, last_activity: &Cell<Instant>) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    let mut deadline = last_activity.get() + idle;
    loop {
        tokio::time::sleep_until(deadline).await;
        // Re-armed lazily: activity only stamps a Cell, the timer moves once per period.
        let due = last_activity.get() + idle;
        if due <= Instant::now() {
            return;
        }
        deadline = due;
    }
}

/// Forwards `src` to `dst` until EOF on `src`, then half-closes `dst`.
async fn one_way(
    bufs: &RelayBuffers,
    src: &TcpStream,
    dst: &TcpStream,
    last_activity: &Cell<Instant>,
    moved: &Cell<u64>,
) -> io::Result<()> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    loop {
        src.readable().await?;
        last_activity.set(Instant::now());
        let filled = {
            let mut scratch = bufs.scratch.borrow_mut();
            let want = bufs.splice_threshold.min(scratch.len());
            let n = match read_clearing(src, src_fd, &mut scratch[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            moved.set(moved.get() + n as u64);
            match write_now(dst, dst_fd, &scratch[..n])? {
                w if w == n => n == want,
                w => {
                    // The peer is slow: keep the rest in a buffer of this connection's own.
                    let rest = scratch[w..n].to_vec();
                    drop(scratch);
                    write_all(dst, dst_fd, &rest).await?;
                    n == want
                }
            }
        };
        if filled {
            splice_round(bufs, src, dst, moved).await?;
        }
    }
    shutdown_write(dst_fd);
    Ok(())
}

/// Splices `src` into `dst` until `src` has nothing more for now. Returns at EOF too: the
/// caller's next read sees it.
async fn splice_round(
    bufs: &RelayBuffers,
    src: &TcpStream,
    dst: &TcpStream,
    moved: &Cell<u64>,
) -> io::Result<()> {
    let mut pipe = bufs.pipes.take()?;
    let result = splice_through(&mut pipe, src, dst, moved).await;
    if result.is_ok() {
        bufs.pipes.give(pipe);
    }
    result
}

async fn splice_through(
    pipe: &mut Pipe,
    src: &TcpStream,
    dst: &TcpStream,
    moved: &Cell<u64>,
) -> io::Result<()> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    loop {
        debug_assert_eq!(pipe.len, 0);
        // The pipe is empty, so EAGAIN here means the socket is empty: clear readiness.
        let n = match src.try_io(Interest::READABLE, || {
            splice(src_fd, pipe.write_fd(), pipe.capacity)
        }) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        pipe.len = n;
        moved.set(moved.get() + n as u64);
        while pipe.len > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read_fd(), dst_fd, pipe.len)
            }) {
                Ok(m) => pipe.len -= m,
                Err(e) if e.kind() == ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
}

/// One `read`. A short read clears tokio's readiness (see the module doc), saving the EAGAIN
/// read that would otherwise follow.
#[inline]
fn read_clearing(src: &TcpStream, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let got = Cell::new(None);
    let r = src.try_io(Interest::READABLE, || {
        // SAFETY: buf is valid for buf.len() bytes for the duration of the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
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

/// As much of `buf` as the socket takes now (possibly 0).
#[inline]
fn write_now(dst: &TcpStream, fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: rest is valid for rest.len() bytes for the duration of the call.
        match dst.try_io(Interest::WRITABLE, || {
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
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

async fn write_all(dst: &TcpStream, fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
        let n = write_now(dst, fd, buf)?;
        buf = &buf[n..];
    }
    Ok(())
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown on a socket we hold open; an error (peer gone) changes nothing here.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}
