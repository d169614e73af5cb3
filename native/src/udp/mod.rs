//! The datagram proxy: a flow (client address and port) gets a session with its own connected
//! upstream socket; replies leave through the listening socket, from the listener's address.
//!
//! Per worker: one task per udp listener reads client datagrams a batch at a time (recvmmsg)
//! and sends each on its session's socket; one task waits on an epoll set of every session's
//! upstream socket and sends the replies back a batch at a time (sendmmsg); one task ends idle
//! sessions. No session has a task or a timer of its own, and no datagram allocates.

pub mod batch;
pub mod session;

use crate::accesslog::Line;
use crate::balance::{AdminState, BackendState};
use crate::config::UdpConfig;
use crate::metrics::{Direction, ResponseKey, UdpDrop, WorkerMetrics, NO_BACKEND};
use crate::tables::ListenerEntry;
use crate::worker::WorkerCtx;
use batch::Batch;
use session::{End, FlowKey, ListenSocket, Session, Sessions};
use std::cell::{OnceCell, RefCell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Datagrams one recvmmsg or sendmmsg moves at most.
const BATCH: usize = 32;
/// Batches a listener's task reads before it lets the worker's other tasks run.
const BATCHES_PER_TURN: usize = 8;
/// Replies read from one upstream socket per round, so one busy flow cannot starve the rest.
const REPLIES_PER_SOCKET: usize = 8;
/// epoll events taken per round.
const EVENTS: usize = 256;
/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// A full table makes room by ending a session idle at least this long.
const EVICT_IDLE: Duration = Duration::from_secs(1);
/// Random slots looked at for a session to evict.
const EVICT_PROBES: usize = 16;
/// How long a session that ended on its replies keeps its socket for the flow's next datagram
/// (at most `session_idle`). A DNS client that queries from one port again and again then
/// costs a reconnect at most, not socket + connect + epoll_ctl + close per query: at 10k q/s
/// from 20 ports half the queries made a new session, and those four calls were 4 of about 7.5
/// system calls per query.
const PARK_FOR: Duration = Duration::from_secs(1);

/// A udp listener as workers see it.
pub struct UdpListener {
    pub cfg: UdpConfig,
    /// This listener's sessions in the whole process (against `max_sessions`); kept across
    /// reloads by the engine.
    pub sessions: Arc<AtomicUsize>,
}

/// One worker's udp state, made when its first udp listener starts.
pub struct UdpWorker {
    sessions: RefCell<Sessions>,
    /// Client datagrams being read, replies being read and sent.
    inbound: RefCell<Batch>,
    replies: RefCell<Batch>,
    /// Every session's upstream socket, keyed by `session::token`.
    epoll: AsyncFd<OwnedFd>,
    /// Sessions to end after a batch (reused).
    ending: RefCell<Vec<(u32, End)>>,
}

/// The worker's udp state, started (with its reply and sweep tasks) on first use.
#[derive(Default)]
pub struct UdpSlot(OnceCell<Rc<UdpWorker>>);

impl UdpSlot {
    fn get_or_start(&self, ctx: &Rc<WorkerCtx>) -> io::Result<Rc<UdpWorker>> {
        if let Some(w) = self.0.get() {
            return Ok(w.clone());
        }
        // SAFETY: epoll_create1 returns a new descriptor this function owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let w = Rc::new(UdpWorker {
            sessions: RefCell::default(),
            inbound: RefCell::new(Batch::new(BATCH)),
            replies: RefCell::new(Batch::new(BATCH)),
            // SAFETY: as for the listening sockets: the AsyncFd owns the epoll descriptor.
            epoll: unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE)? },
            ending: RefCell::default(),
        });
        let _ = self.0.set(w.clone());
        tokio::task::spawn_local(reply_loop(ctx.clone(), w.clone()));
        tokio::task::spawn_local(sweep_loop(ctx.clone(), w.clone()));
        Ok(w)
    }

    /// Whether some session still waits for a reply to a datagram it forwarded (at a stop,
    /// those keep their socket a moment so the reply still reaches its client).
    pub fn awaiting_replies(&self) -> bool {
        let Some(w) = self.0.get() else {
            return false;
        };
        let mut waiting = Vec::new();
        w.sessions
            .borrow()
            .matching(|s| s.waiting_since.is_some() && !s.parked, &mut waiting);
        !waiting.is_empty()
    }

    /// Ends every session for which `pred` holds (a listener removed, a backend closed, stop).
    pub fn close_where(&self, ctx: &WorkerCtx, pred: impl FnMut(&Session) -> bool) {
        if let Some(w) = self.0.get() {
            let mut slots = Vec::new();
            w.sessions.borrow().matching(pred, &mut slots);
            let now = Instant::now();
            for i in slots {
                end(ctx, &w.sessions, i, End::Closed, now);
            }
        }
    }
}

/// Reads a udp listener's datagrams until the task is aborted (the listener removed).
pub async fn listen_loop(ctx: Rc<WorkerCtx>, name: String, socket: std::net::UdpSocket) {
    let wildcard = socket.local_addr().is_ok_and(|a| a.ip().is_unspecified());
    let (w, socket) = match ctx.udp.get_or_start(&ctx).and_then(|w| {
        // SAFETY: the AsyncFd owns the socket, so its fd stays open and the same for the
        // AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
        Ok((w, Rc::new(ListenSocket { fd, wildcard })))
    }) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("fastlb: listener {name}: {e}");
            return;
        }
    };
    loop {
        let Ok(mut ready) = socket.fd.readable().await else {
            return;
        };
        for _ in 0..BATCHES_PER_TURN {
            let mut batch = w.inbound.borrow_mut();
            match batch.recv(socket.raw(), 0, BATCH, true, wildcard) {
                Ok(n) => {
                    forward(&ctx, &w, &socket, &name, &batch, n);
                    if n < BATCH {
                        // A short batch emptied the queue: a datagram arriving from now on
                        // raises a fresh readiness event, so no recvmmsg just to hear EAGAIN.
                        ready.clear_ready();
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                // A previous reply's ICMP error, reported on this socket: nothing to do.
                Err(_) => {}
            }
        }
        drop(ready);
        tokio::task::yield_now().await;
    }
}

/// Sends each datagram of a batch from clients to its session's backend.
fn forward(
    ctx: &WorkerCtx,
    w: &UdpWorker,
    socket: &Rc<ListenSocket>,
    name: &str,
    batch: &Batch,
    n: usize,
) {
    let tables = ctx.shared.tables.load();
    let Some(entry) = tables.listeners.get(name) else {
        return;
    };
    let Some(udp) = &entry.udp else {
        return;
    };
    let now = Instant::now();
    let (mut bytes, mut sent) = (0, 0);
    let mut ending = w.ending.borrow_mut();
    ending.clear();
    let mut sessions = w.sessions.borrow_mut();
    for i in 0..n {
        let Some(client) = batch.source(i) else {
            continue;
        };
        let payload = batch.payload(i);
        bytes += payload.len() as u64;
        let local = socket.wildcard.then(|| batch.destination(i)).flatten();
        let index = match session_for(
            ctx,
            w,
            &mut sessions,
            entry,
            udp,
            socket,
            client,
            local,
            now,
        ) {
            Ok(index) => index,
            Err(reason) => {
                ctx.metrics.borrow_mut().record_udp_drop(entry.id, reason);
                continue;
            }
        };
        let s = sessions.get_mut(index).expect("just found");
        s.last = now;
        s.datagrams_in += 1;
        s.bytes_in += payload.len() as u64;
        match batch::send(s.upstream.as_raw_fd(), payload) {
            Ok(()) => {
                sent += 1;
                s.waiting_since.get_or_insert(now);
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                s.backend.fail_connect();
                ctx.metrics
                    .borrow_mut()
                    .record_udp_drop(entry.id, UdpDrop::Unreachable);
                ending.push((index, End::Unreachable));
            }
            Err(_) => ctx
                .metrics
                .borrow_mut()
                .record_udp_drop(entry.id, UdpDrop::SendError),
        }
    }
    drop(sessions);
    let mut metrics = ctx.metrics.borrow_mut();
    metrics.record_datagrams(entry.id, Direction::In, n as u64, bytes);
    metrics.record_datagrams(entry.id, Direction::ToBackend, sent, 0);
    drop(metrics);
    for (index, why) in ending.drain(..) {
        end(ctx, &w.sessions, index, why, now);
    }
}

/// The session a client datagram belongs to, made if the flow is new (or its backend went
/// away); Err: the datagram is dropped for that reason.
#[allow(clippy::too_many_arguments)]
fn session_for(
    ctx: &WorkerCtx,
    w: &UdpWorker,
    sessions: &mut Sessions,
    entry: &Arc<ListenerEntry>,
    udp: &UdpListener,
    socket: &Rc<ListenSocket>,
    client: SocketAddr,
    local: Option<IpAddr>,
    now: Instant,
) -> Result<u32, UdpDrop> {
    let pool = &entry.pool;
    let hash = crate::l4::connection_key(pool, client);
    let picked = match udp.cfg.per_packet {
        true => Some(pool.select(hash, &[]).ok_or(UdpDrop::NoBackend)?),
        false => None,
    };
    let key = FlowKey {
        listener: entry.id,
        client,
        backend: picked.map_or(NO_BACKEND, |i| pool.backends[i].slot),
    };
    let mut parked = None;
    if let Some(index) = sessions.find(&key) {
        let s = sessions.get_mut(index).expect("indexed");
        if s.parked {
            parked = Some(index);
        } else if serves(&s.backend) {
            return Ok(index);
        } else {
            // Down or disabled: the flow moves (a draining backend keeps its flows).
            drop_session(ctx, sessions, index, End::Rebalanced, now);
        }
    }
    let max = udp.cfg.max_sessions as usize;
    if !reserve(&udp.sessions, max) {
        let before = now.checked_sub(EVICT_IDLE).ok_or(UdpDrop::MaxSessions)?;
        let victim = sessions
            .eviction_candidate(entry.id, before, EVICT_PROBES)
            .ok_or(UdpDrop::MaxSessions)?;
        drop_session(ctx, sessions, victim, End::Evicted, now);
        if !reserve(&udp.sessions, max) {
            return Err(UdpDrop::MaxSessions); // another worker took the slot
        }
    }
    let unreserve = |why| {
        udp.sessions.fetch_sub(1, Relaxed);
        why
    };
    let i = match picked {
        Some(i) => i,
        None => pool
            .select(hash, &[])
            .ok_or_else(|| unreserve(UdpDrop::NoBackend))?,
    };
    let backend = &pool.backends[i];
    let addr = pool.settings[i].addr;
    let index = match parked {
        Some(index) => revive(sessions, index, entry, socket, backend, addr, local, now)
            .map_err(|_| unreserve(UdpDrop::SendError))?,
        None => {
            let (index, token) = sessions.vacant();
            // Only a local shortage (descriptors, memory) fails here: not the backend's.
            let upstream = connect(addr, w.epoll.get_ref().as_raw_fd(), token)
                .map_err(|_| unreserve(UdpDrop::SendError))?;
            let inserted = sessions.insert(Session {
                key,
                upstream,
                socket: socket.clone(),
                entry: entry.clone(),
                backend: backend.clone(),
                addr,
                parked: false,
                local,
                started: now,
                last: now,
                waiting_since: None,
                datagrams_in: 0,
                datagrams_out: 0,
                bytes_in: 0,
                bytes_out: 0,
            });
            debug_assert_eq!(inserted, index);
            index
        }
    };
    backend.acquire();
    {
        let mut metrics = ctx.metrics.borrow_mut();
        metrics.record_session(entry.id, true);
        metrics.record_backend_connect(backend.slot);
    }
    Ok(index)
}

/// Starts a new session in a parked one's slot, on its socket (reconnected if the flow's new
/// backend is another). On an error the parked session is gone.
#[allow(clippy::too_many_arguments)]
fn revive(
    sessions: &mut Sessions,
    index: u32,
    entry: &Arc<ListenerEntry>,
    socket: &Rc<ListenSocket>,
    backend: &Arc<BackendState>,
    addr: SocketAddr,
    local: Option<IpAddr>,
    now: Instant,
) -> io::Result<u32> {
    let s = sessions.get_mut(index).expect("parked");
    if s.addr != addr {
        if let Err(e) = reconnect(s.upstream.as_raw_fd(), addr) {
            sessions.remove(index);
            return Err(e);
        }
    }
    s.entry = entry.clone();
    s.socket = socket.clone();
    s.backend = backend.clone();
    s.addr = addr;
    s.parked = false;
    s.local = local;
    (s.started, s.last, s.waiting_since) = (now, now, None);
    (s.datagrams_in, s.datagrams_out, s.bytes_in, s.bytes_out) = (0, 0, 0, 0);
    Ok(index)
}

/// Points a connected udp socket at another peer (replies from the old one are refused).
fn reconnect(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let addr = socket2::SockAddr::from(addr);
    // SAFETY: addr is a valid socket address of addr.len() bytes.
    match unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Takes one of `max` session places, if one is free: one atomic step, so that two workers
/// cannot both take the last.
fn reserve(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
        .is_ok()
}

/// Whether a session may stay on its backend: up and not disabled (draining keeps its flows).
fn serves(b: &BackendState) -> bool {
    b.is_up() && b.admin() != AdminState::Disabled
}

/// A new upstream socket connected to `addr` and added to the worker's epoll set.
fn connect(addr: SocketAddr, epoll: RawFd, token: u64) -> io::Result<OwnedFd> {
    let addr = socket2::SockAddr::from(addr);
    // SAFETY: socket returns a new descriptor this function owns.
    let fd = unsafe {
        libc::socket(
            addr.family() as i32,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid socket address of addr.len() bytes; ev is plain data.
    unsafe {
        if libc::connect(fd, addr.as_ptr().cast(), addr.len()) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        if libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(owned)
}

/// Waits on the epoll set of upstream sockets and relays their replies to the clients.
async fn reply_loop(ctx: Rc<WorkerCtx>, w: Rc<UdpWorker>) {
    // SAFETY: epoll_event is plain data.
    let mut events = vec![unsafe { std::mem::zeroed::<libc::epoll_event>() }; EVENTS];
    loop {
        let Ok(mut ready) = w.epoll.readable().await else {
            return;
        };
        // SAFETY: events holds EVENTS entries.
        let n = unsafe {
            libc::epoll_wait(
                w.epoll.get_ref().as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS as i32,
                0,
            )
        };
        if n <= 0 {
            ready.clear_ready();
            continue;
        }
        let drained = relay_replies(&ctx, &w, &events[..n as usize]);
        if drained && (n as usize) < EVENTS {
            // Every ready socket was read empty and the ready list with them: a later reply
            // wakes the set again, so no epoll_wait just to hear that nothing is left.
            ready.clear_ready();
        } else {
            drop(ready);
            tokio::task::yield_now().await;
        }
    }
}

/// Reads the replies waiting on the sockets of `events` and sends them on, a batch at a time.
/// Returns whether every socket was read empty.
fn relay_replies(ctx: &WorkerCtx, w: &UdpWorker, events: &[libc::epoll_event]) -> bool {
    let mut drained = true;
    let now = Instant::now();
    let mut batch = w.replies.borrow_mut();
    let mut ending = w.ending.borrow_mut();
    ending.clear();
    let mut sessions = w.sessions.borrow_mut();
    // Slot i of the batch goes out through socket `through[i]`.
    let mut through: [(RawFd, u16); BATCH] = [(-1, 0); BATCH];
    let mut filled = 0;
    for ev in events {
        let token = ev.u64;
        let Some((index, s)) = sessions.by_token(token) else {
            continue;
        };
        if filled == BATCH {
            flush(ctx, &mut batch, &through, filled);
            filled = 0;
        }
        if s.parked {
            // A late reply after the flow had all it asked for: read into the free slots,
            // which the next reply overwrites, and dropped.
            let room = BATCH - filled;
            let got = batch.recv(s.upstream.as_raw_fd(), filled, room, false, false);
            drained &= got.map_or(true, |got| got < room);
            continue;
        }
        let room = REPLIES_PER_SOCKET.min(BATCH - filled);
        let got = match batch.recv(s.upstream.as_raw_fd(), filled, room, false, false) {
            Ok(got) => got,
            Err(e) => {
                if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                    s.backend.fail_connect();
                    ctx.metrics
                        .borrow_mut()
                        .record_udp_drop(s.entry.id, UdpDrop::Unreachable);
                    ending.push((index, End::Unreachable));
                }
                continue;
            }
        };
        let mut bytes = 0;
        for (slot, out) in through.iter_mut().enumerate().skip(filled).take(got) {
            bytes += batch.payload(slot).len() as u64;
            batch.address(slot, s.key.client, s.local);
            *out = (s.socket.raw(), s.entry.id);
        }
        drained &= got < room;
        filled += got;
        s.last = now;
        s.datagrams_out += got as u64;
        s.bytes_out += bytes;
        if let Some(since) = s.waiting_since.take() {
            s.backend
                .observe_latency((now.saturating_duration_since(since)).as_nanos() as u64);
        }
        ctx.metrics.borrow_mut().record_datagrams(
            s.entry.id,
            Direction::FromBackend,
            got as u64,
            0,
        );
        let responses = s.entry.udp.as_ref().map_or(0, |u| u.cfg.responses) as u64;
        if responses > 0 && s.datagrams_out >= s.datagrams_in * responses {
            ending.push((index, End::Responses));
        }
    }
    flush(ctx, &mut batch, &through, filled);
    drop(sessions);
    for (index, why) in ending.drain(..) {
        end(ctx, &w.sessions, index, why, now);
    }
    drained
}

/// Sends the first `filled` slots, each run through one listening socket in one sendmmsg; what
/// the kernel would not take (a full send buffer) is dropped and counted.
fn flush(ctx: &WorkerCtx, batch: &mut Batch, through: &[(RawFd, u16)], filled: usize) {
    let mut start = 0;
    while start < filled {
        let (fd, listener) = through[start];
        let mut stop = start + 1;
        while stop < filled && through[stop].0 == fd {
            stop += 1;
        }
        let mut sent = 0;
        let mut bytes = 0;
        let mut at = start;
        while at < stop {
            match batch.send(fd, at, stop) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    for slot in at..at + k {
                        bytes += batch.payload(slot).len() as u64;
                    }
                    sent += k;
                    at += k;
                }
            }
        }
        let mut metrics = ctx.metrics.borrow_mut();
        metrics.record_datagrams(listener, Direction::Out, sent as u64, bytes);
        for _ in sent..stop - start {
            metrics.record_udp_drop(listener, UdpDrop::SendError);
        }
        start = stop;
    }
}

/// Ends idle sessions, a few times a second while there are any.
async fn sweep_loop(ctx: Rc<WorkerCtx>, w: Rc<UdpWorker>) {
    let mut idle = Vec::new();
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        if w.sessions.borrow().is_empty() {
            continue;
        }
        let now = Instant::now();
        w.sessions.borrow().matching(
            |s| {
                let idle = s.entry.udp.as_ref().map_or(0, |u| u.cfg.session_idle_ms);
                let mut limit = Duration::from_millis(idle);
                if s.parked {
                    limit = limit.min(PARK_FOR);
                }
                now.saturating_duration_since(s.last) >= limit
            },
            &mut idle,
        );
        for &i in &idle {
            end(&ctx, &w.sessions, i, End::Idle, now);
        }
    }
}

fn end(ctx: &WorkerCtx, sessions: &RefCell<Sessions>, index: u32, why: End, now: Instant) {
    drop_session(ctx, &mut sessions.borrow_mut(), index, why, now);
}

/// Ends a session: its backend released, counted and logged, its socket closed, or parked
/// when the session ended on its replies. A parked one just closes.
fn drop_session(ctx: &WorkerCtx, sessions: &mut Sessions, index: u32, why: End, now: Instant) {
    let Some(s) = sessions.get_mut(index) else {
        return;
    };
    if !s.parked {
        finish(ctx, s, why, now);
    }
    if why == End::Responses {
        (s.parked, s.last) = (true, now);
    } else {
        sessions.remove(index);
    }
}

fn finish(ctx: &WorkerCtx, s: &Session, why: End, now: Instant) {
    let entry = &s.entry;
    if let Some(udp) = &entry.udp {
        udp.sessions.fetch_sub(1, Relaxed);
    }
    s.backend.release();
    if s.datagrams_out > 0 {
        s.backend.record_success();
    }
    let lifetime = now.saturating_duration_since(s.started).as_micros() as u64;
    record_end(&mut ctx.metrics.borrow_mut(), s, lifetime);
    if let Some(log) = ctx.shared.access_log.load().as_ref() {
        let mut line = Line::new();
        line.time()
            .quoted("client", s.key.client)
            .str("listener", entry.cfg.name.as_bytes())
            .str("protocol", b"udp")
            .str("pool", entry.pool.name.as_bytes())
            .str("backend", s.backend.address.as_bytes())
            .display("datagrams_in", s.datagrams_in)
            .display("datagrams_out", s.datagrams_out)
            .display("bytes_in", s.bytes_in)
            .display("bytes_out", s.bytes_out)
            .ms("duration_ms", Some(lifetime))
            .str("end", why.name().as_bytes());
        log.send(line.finish());
    }
}

fn record_end(metrics: &mut WorkerMetrics, s: &Session, lifetime_us: u64) {
    metrics.record_session(s.entry.id, false);
    metrics.record_backend_bytes(s.backend.slot, s.bytes_in, s.bytes_out);
    metrics.record_done(
        ResponseKey {
            listener: s.entry.id,
            pool: s.entry.pool.id,
            backend: s.backend.slot,
            code: 0,
        },
        lifetime_us,
    );
}
