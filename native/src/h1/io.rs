//! Socket reads and writes with deadlines, on the connection's one timer.
//!
//! `Deadline` re-arms tokio's timer only when a deadline moves *earlier*; a later deadline is
//! just recorded and the timer, when it fires early, is re-armed once. A keep-alive request
//! sets several deadlines (idle, send, response read, next idle) and usually resets no timer
//! and reads the clock once.

use crate::l4::forward::write_now;
use crate::net::Conn;
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

pub struct Deadline<'t> {
    timer: Pin<&'t mut Sleep>,
    /// The timeout asked for by the last `set`; None: no deadline now.
    after: Option<Duration>,
    /// When it expires; computed the first time something actually waits, so an operation
    /// that completes at once never reads the clock.
    due: Option<Instant>,
    /// Where the timer is armed now (None: never, or unknown after `timer()`).
    armed: Option<Instant>,
}

impl<'t> Deadline<'t> {
    pub fn new(timer: Pin<&'t mut Sleep>) -> Self {
        Deadline {
            timer,
            after: None,
            due: None,
            armed: None,
        }
    }

    /// Sets the deadline `after` from now (from the first wait, strictly); zero means none.
    #[inline]
    pub fn set(&mut self, after: Duration) {
        self.after = (!after.is_zero()).then_some(after);
        self.due = None;
    }

    /// Sets the deadline `after` from `start`, an instant the caller has just read.
    #[inline]
    pub fn set_from(&mut self, start: std::time::Instant, after: Duration) {
        self.after = (!after.is_zero()).then_some(after);
        self.due = self.after.map(|a| Instant::from_std(start) + a);
    }

    /// Ready when the deadline has passed; registers the waker otherwise. The timer is only
    /// re-armed when the deadline is earlier than where it is armed (a new connection's first
    /// wait) or when it fires early; resetting it to an earlier time can make tokio wake its
    /// driver through an eventfd write, a syscall per request.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(after) = self.after else {
            return Poll::Pending;
        };
        let due = *self.due.get_or_insert_with(|| Instant::now() + after);
        if self.armed.is_none_or(|armed| armed > due) {
            self.timer.as_mut().reset(due);
            self.armed = Some(due);
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(due);
            self.armed = Some(due);
        }
        Poll::Pending
    }

    /// Lends the timer out (connect, WebSocket relay); it is re-armed on the next wait.
    pub fn timer(&mut self) -> Pin<&mut Sleep> {
        self.after = None;
        self.due = None;
        self.armed = None;
        self.timer.as_mut()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(ErrorKind::TimedOut, "timed out")
}

/// One read of at most `buf.len()` bytes; waits for data until the deadline (`TimedOut`).
/// Ok(0) is EOF.
pub async fn read_some(
    conn: &mut Conn,
    buf: &mut [u8],
    deadline: &mut Deadline<'_>,
) -> io::Result<usize> {
    loop {
        match conn.try_read(buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => return other,
        }
        wait_ready(conn.tcp(), deadline, true).await?;
    }
}

/// Waits until the deadline or until `stream` is readable (or writable).
pub async fn wait_ready(
    stream: &TcpStream,
    deadline: &mut Deadline<'_>,
    readable: bool,
) -> io::Result<()> {
    poll_fn(|cx| {
        let ready = if readable {
            stream.poll_read_ready(cx)
        } else {
            stream.poll_write_ready(cx)
        };
        if let Poll::Ready(r) = ready {
            return Poll::Ready(r);
        }
        if deadline.poll_expired(cx).is_ready() {
            return Poll::Ready(Err(timed_out()));
        }
        Poll::Pending
    })
    .await
}

/// Writes all of `data` (and flushes a TLS session); waits for the peer to take it until the
/// deadline (`TimedOut`).
pub async fn write_all(
    conn: &mut Conn,
    mut data: &[u8],
    deadline: &mut Deadline<'_>,
) -> io::Result<()> {
    if let Conn::Plain(stream) = conn {
        let fd = stream.as_raw_fd();
        loop {
            let n = write_now(stream, fd, data)?;
            data = &data[n..];
            if data.is_empty() {
                return Ok(());
            }
            wait_ready(stream, deadline, false).await?;
        }
    }
    poll_fn(|cx| {
        while !data.is_empty() {
            match conn.poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => data = &data[n..],
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return expired_or_pending(cx, deadline),
            }
        }
        match conn.poll_flush(cx) {
            Poll::Pending => expired_or_pending(cx, deadline),
            done => done,
        }
    })
    .await
}

fn expired_or_pending<T>(cx: &mut Context<'_>, deadline: &mut Deadline<'_>) -> Poll<io::Result<T>> {
    match deadline.poll_expired(cx) {
        Poll::Ready(()) => Poll::Ready(Err(timed_out())),
        Poll::Pending => Poll::Pending,
    }
}
