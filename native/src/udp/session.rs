//! A worker's udp sessions: a slab (slot index and generation make the epoll token of the
//! session's upstream socket) and an index by flow.

use crate::balance::BackendState;
use crate::tables::ListenerEntry;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

/// A flow: the client's address on one listener, and in per-packet mode the backend too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub listener: u16,
    pub client: SocketAddr,
    /// The backend's slot in per-packet mode, else `crate::metrics::NO_BACKEND`.
    pub backend: u32,
}

/// A listening socket as its sessions reply through it.
pub struct ListenSocket {
    pub fd: AsyncFd<std::net::UdpSocket>,
    /// Bound to a wildcard address: replies name the address each flow reached.
    pub wildcard: bool,
}

impl ListenSocket {
    pub fn raw(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

/// Why a session ended (the access log's `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Responses,
    Idle,
    Unreachable,
    Evicted,
    Rebalanced,
    Closed,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::Responses => "responses",
            End::Idle => "idle",
            End::Unreachable => "unreachable",
            End::Evicted => "evicted",
            End::Rebalanced => "rebalanced",
            End::Closed => "closed",
        }
    }
}

pub struct Session {
    pub key: FlowKey,
    /// The connected upstream socket; closing it takes it out of the worker's epoll set.
    pub upstream: OwnedFd,
    pub socket: Rc<ListenSocket>,
    /// The listener as the session's first datagram found it (its pool and settings).
    pub entry: Arc<ListenerEntry>,
    pub backend: Arc<BackendState>,
    /// The address `upstream` is connected to.
    pub addr: SocketAddr,
    /// The session ended when its replies were in, but its slot and socket wait a moment for
    /// the flow's next datagram (see `udp::PARK_FOR`); it holds no session place meanwhile.
    pub parked: bool,
    /// Where replies leave from on a wildcard bind.
    pub local: Option<IpAddr>,
    pub started: Instant,
    /// The last datagram either way.
    pub last: Instant,
    /// The first client datagram still waiting for a reply (a latency sample for peak_ewma).
    pub waiting_since: Option<Instant>,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

struct Slot {
    generation: u32,
    session: Option<Session>,
}

#[derive(Default)]
pub struct Sessions {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_flow: HashMap<FlowKey, u32, Xxh3DefaultBuilder>,
}

/// A session's epoll token: its slot, and the slot's generation so that an event for a session
/// that ended earlier in the same batch cannot reach the one that took its slot.
pub fn token(index: u32, generation: u32) -> u64 {
    ((generation as u64) << 32) | index as u64
}

impl Sessions {
    pub fn is_empty(&self) -> bool {
        self.by_flow.is_empty()
    }

    pub fn find(&self, key: &FlowKey) -> Option<u32> {
        self.by_flow.get(key).copied()
    }

    /// The slot the next `insert` fills and its epoll token.
    pub fn vacant(&mut self) -> (u32, u64) {
        let index = match self.free.last() {
            Some(&i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    session: None,
                });
                self.free.push(self.slots.len() as u32 - 1);
                self.slots.len() as u32 - 1
            }
        };
        (index, token(index, self.slots[index as usize].generation))
    }

    /// Fills the slot `vacant` returned.
    pub fn insert(&mut self, session: Session) -> u32 {
        let index = self.free.pop().expect("vacant() first");
        self.by_flow.insert(session.key, index);
        self.slots[index as usize].session = Some(session);
        index
    }

    pub fn get_mut(&mut self, index: u32) -> Option<&mut Session> {
        self.slots.get_mut(index as usize)?.session.as_mut()
    }

    /// The session an epoll token names, if it is still the one the token was made for.
    pub fn by_token(&mut self, token: u64) -> Option<(u32, &mut Session)> {
        let (index, generation) = (token as u32, (token >> 32) as u32);
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.session.as_mut().map(|s| (index, s))
    }

    pub fn remove(&mut self, index: u32) -> Option<Session> {
        let slot = self.slots.get_mut(index as usize)?;
        let session = slot.session.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.by_flow.remove(&session.key);
        self.free.push(index);
        Some(session)
    }

    /// Slots of the sessions for which `pred` holds.
    pub fn matching(&self, mut pred: impl FnMut(&Session) -> bool, out: &mut Vec<u32>) {
        out.clear();
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.session.as_ref().is_some_and(&mut pred) {
                out.push(i as u32);
            }
        }
    }

    /// Of up to `probes` random slots, the session of `listener` idle the longest, if it has
    /// been idle since `before` (a flood's one-datagram flows make room for new ones; an active
    /// flow is never picked).
    pub fn eviction_candidate(&self, listener: u16, before: Instant, probes: usize) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mut best: Option<(u32, Instant)> = None;
        for _ in 0..probes {
            let i = fastrand::usize(..self.slots.len());
            let Some(s) = &self.slots[i].session else {
                continue;
            };
            if s.key.listener == listener
                && !s.parked
                && s.last <= before
                && best.is_none_or(|(_, last)| s.last < last)
            {
                best = Some((i as u32, s.last));
            }
        }
        best.map(|(i, _)| i)
    }
}
