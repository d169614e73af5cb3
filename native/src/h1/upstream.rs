//! Per-worker keep-alive pool of backend connections (nginx's `keepalive N` in an upstream).
//!
//! Per worker rather than shared: a connection is registered with its worker's reactor and
//! taking one needs no lock. Connections are taken newest first (the likeliest to be alive)
//! and checked before reuse: a backend that closed an idle connection has made it readable,
//! which tokio has already recorded, so the check costs a syscall only for those.

use crate::net::Conn;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

struct IdleConn {
    stream: Conn,
    /// Which TLS pool config and server name it was opened with (0: plain TCP).
    tag: u64,
    since: Instant,
    /// The pool's `timeouts.idle` when the connection was parked.
    max_idle: Duration,
}

impl IdleConn {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) >= self.max_idle
    }
}

pub struct UpstreamPool {
    idle: RefCell<HashMap<SocketAddr, Vec<IdleConn>>>,
    /// The time as of the last sweep: idle timeouts are seconds long, so a clock that moves
    /// once a second is precise enough and spares two clock reads per request.
    now: Cell<Instant>,
}

impl Default for UpstreamPool {
    fn default() -> Self {
        UpstreamPool {
            idle: RefCell::default(),
            now: Cell::new(Instant::now()),
        }
    }
}

/// Whether a parked connection still looks usable: nothing to read (a backend sends nothing
/// unasked; EOF or stray bytes both mean it is unusable).
fn alive(stream: &mut Conn) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

impl UpstreamPool {
    /// An idle connection to `addr` opened with `tag`, if one is parked and alive.
    pub fn take(&self, addr: SocketAddr, tag: u64) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(&addr)?;
        let now = self.now.get();
        while let Some(i) = conns.iter().rposition(|c| c.tag == tag) {
            let mut c = conns.remove(i);
            if !c.expired(now) && alive(&mut c.stream) {
                return Some(c.stream);
            }
        }
        None
    }

    /// Parks a connection after a complete exchange; beyond `max` per backend the oldest goes.
    pub fn put(&self, addr: SocketAddr, tag: u64, stream: Conn, max: usize, max_idle: Duration) {
        if max == 0 || max_idle.is_zero() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let conns = idle.entry(addr).or_default();
        if conns.len() >= max {
            conns.remove(0);
        }
        conns.push(IdleConn {
            stream,
            tag,
            since: self.now.get(),
            max_idle,
        });
    }

    /// Closes expired connections and those the backend closed; run periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.now.set(now);
        let mut idle = self.idle.borrow_mut();
        for conns in idle.values_mut() {
            conns.retain_mut(|c| !c.expired(now) && alive(&mut c.stream));
        }
        idle.retain(|_, conns| !conns.is_empty());
    }

    /// Closes the parked connections to `addr`.
    pub fn drop_idle(&self, addr: SocketAddr) {
        self.idle.borrow_mut().remove(&addr);
    }

    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}
