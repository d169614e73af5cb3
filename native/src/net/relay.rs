//! Relaying a stream both ways: splice when both ends are plain TCP (l4::forward), a copy loop
//! through the worker's scratch buffer when either end is TLS.
//!
//! The copy loop owns memory only while a peer is slow: what the destination did not take stays
//! in a stash of the connection's own; an idle TLS relay holds no buffer of fastlb's (memory per
//! idle TLS connection is a benchmark target).

use super::Conn;
use crate::l4::forward::{self, idle_check, Moved, RelayBuffers, RelayEnd};
use std::future::poll_fn;
use std::io::{self, ErrorKind};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Relays until both directions have seen EOF (each forwarded as a half-close), either side
/// fails, or nothing moves for `idle` (zero: no limit). `timer` is the connection's one timer.
pub async fn relay(
    bufs: &RelayBuffers,
    a: &mut Conn,
    b: &mut Conn,
    idle: Duration,
    timer: Pin<&mut Sleep>,
) -> Result<Moved, (RelayEnd, Moved)> {
    match (a, b) {
        (Conn::Plain(a), Conn::Plain(b)) => forward::relay(bufs, a, b, idle, timer).await,
        (a, b) => Box::pin(copy_relay(bufs, a, b, idle, timer)).await,
    }
}

/// One direction of a copy relay.
#[derive(Default)]
struct Direction {
    /// Bytes read that the destination has not taken yet.
    stash: Vec<u8>,
    sent: usize,
    /// EOF read from the source; forwarded once the stash is out.
    eof: bool,
    /// EOF forwarded.
    done: bool,
    moved: u64,
}

/// The relay when either side is TLS.
pub async fn copy_relay(
    bufs: &RelayBuffers,
    a: &mut Conn,
    b: &mut Conn,
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
        if let Err(e) = step(cx, bufs, a, b, &mut up, &mut active) {
            return Poll::Ready(Err(RelayEnd::Error(e)));
        }
        if let Err(e) = step(cx, bufs, b, a, &mut down, &mut active) {
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
    result.map(|()| moved).map_err(|end| (end, moved))
}

/// Moves what `src` has to `dst` until one of them has to wait (wakers registered) or the
/// direction is done.
fn step(
    cx: &mut Context<'_>,
    bufs: &RelayBuffers,
    src: &mut Conn,
    dst: &mut Conn,
    dir: &mut Direction,
    active: &mut bool,
) -> io::Result<()> {
    while !dir.done {
        while dir.sent < dir.stash.len() {
            match dst.poll_write(cx, &dir.stash[dir.sent..])? {
                Poll::Ready(0) => return Err(ErrorKind::WriteZero.into()),
                Poll::Ready(n) => dir.sent += n,
                Poll::Pending => return Ok(()),
            }
        }
        if !dir.stash.is_empty() {
            dir.stash = Vec::new();
            dir.sent = 0;
        }
        if dst.poll_flush(cx)?.is_pending() {
            return Ok(());
        }
        if dir.eof {
            dst.shutdown_write();
            dir.done = true;
            return Ok(());
        }
        let mut scratch = bufs.scratch.borrow_mut();
        // One TLS record's worth: a read never returns more than one record's plaintext.
        let want = scratch.len().min(16 * 1024);
        let n = match src.poll_read(cx, &mut scratch[..want])? {
            Poll::Ready(0) => {
                dir.eof = true;
                continue;
            }
            Poll::Ready(n) => n,
            Poll::Pending => return Ok(()),
        };
        *active = true;
        dir.moved += n as u64;
        let mut written = 0;
        while written < n {
            match dst.poll_write(cx, &scratch[written..n])? {
                Poll::Ready(0) => return Err(ErrorKind::WriteZero.into()),
                Poll::Ready(k) => written += k,
                Poll::Pending => break,
            }
        }
        if written < n {
            dir.stash = scratch[written..n].to_vec();
        }
    }
    Ok(())
}
