//! Worker threads: one per CPU, each pinned, each running a tokio current_thread runtime with its
//! own SO_REUSEPORT listening socket per listener. Workers share nothing but `Shared` (tables
//! behind arc-swap and atomics); the control plane talks to them through a command channel.

use crate::balance::BackendState;
use crate::config::Protocol;
use crate::h1::client::ClientSocket;
use crate::h1::{self, HttpWorker};
use crate::l4;
use crate::l4::forward::RelayBuffers;
use crate::metrics::WorkerMetrics;
use crate::net::{proxy_header, Conn};
use crate::tables::{ListenerEntry, Shared};
use crate::tls::{self, HandshakeResult, SessionInfo};
use crate::track;
use crate::udp::{self, UdpSlot};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, LocalSet};

/// How long a stop waits at most for udp replies still on their way (within the drain's grace):
/// a DNS answer takes milliseconds; a backend that never answers should not hold the exit.
const UDP_REPLY_GRACE: Duration = Duration::from_secs(2);

/// What the control plane asks of a worker.
pub enum WorkerCmd {
    /// Start accepting on this worker's sockets of listener `name` (bound by the caller, so
    /// bind errors surface synchronously in Python), in place of any it had for that name.
    /// Usually one; more after a binary upgrade from a process with more workers.
    Listen {
        name: String,
        sockets: Vec<ListenSocket>,
    },
    /// Stop accepting on listener `name`; its open connections carry on, idle keep-alive ones
    /// are closed (its entries were marked `closing` first).
    Unlisten { name: String },
    /// Close this worker's connections to a backend whose drain timed out, and its parked
    /// keep-alive connections there (at `addr`, where the current config has it).
    CloseBackend {
        backend: Arc<BackendState>,
        addr: SocketAddr,
    },
    /// Close parked keep-alive connections to `addr` (a backend drained or disabled).
    DropIdle { addr: SocketAddr },
    /// Send a copy of this worker's metrics, tagged with `index`.
    Snapshot {
        index: usize,
        reply: std::sync::mpsc::Sender<(usize, WorkerMetrics)>,
    },
    /// Stop accepting everywhere, let open connections finish for up to `grace`, then close
    /// the rest and end the thread.
    Stop { grace: Duration },
}

/// A listening socket bound by the engine for one worker.
pub enum ListenSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl ListenSocket {
    /// A second descriptor for the same socket (kept by the engine for a binary upgrade).
    pub fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        match self {
            ListenSocket::Tcp(s) => s.as_fd().try_clone_to_owned(),
            ListenSocket::Udp(s) => s.as_fd().try_clone_to_owned(),
        }
    }
}

/// State of one worker thread, shared by its tasks (never crosses threads).
pub struct WorkerCtx {
    pub shared: Arc<Shared>,
    pub relay: RelayBuffers,
    pub http: HttpWorker,
    pub h2: crate::h2::H2Worker,
    /// Sessions of udp listeners (started with the first).
    pub udp: UdpSlot,
    /// This worker's counters and histograms; borrowed only between two awaits.
    pub metrics: RefCell<WorkerMetrics>,
    /// Client connections open on this worker.
    open: Cell<usize>,
    /// Signalled when `open` drops to zero.
    idle: Notify,
    /// A stop is under way: http answers with `Connection: close` and closes.
    pub stopping: Cell<bool>,
}

impl WorkerCtx {
    pub fn new(shared: Arc<Shared>) -> Self {
        WorkerCtx {
            relay: RelayBuffers::new(shared.splice_threshold),
            http: HttpWorker::default(),
            h2: Default::default(),
            udp: UdpSlot::default(),
            metrics: RefCell::default(),
            shared,
            open: Cell::new(0),
            idle: Notify::new(),
            stopping: Cell::new(false),
        }
    }
}

/// Decrements the process-wide and the worker's connection counts when a connection ends,
/// however it ends.
struct ConnGuard<'a> {
    ctx: &'a WorkerCtx,
    listener: &'a ListenerEntry,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.ctx.shared.connections.fetch_sub(1, Relaxed);
        self.ctx.metrics.borrow_mut().record_close(self.listener.id);
        let open = self.ctx.open.get() - 1;
        self.ctx.open.set(open);
        if open == 0 {
            self.ctx.idle.notify_waiters();
        }
    }
}

/// Body of a worker thread.
pub fn run(
    index: usize,
    cpu: Option<usize>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<WorkerCmd>,
) {
    struct Alive(Arc<Shared>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.live_workers.fetch_sub(1, Relaxed);
        }
    }
    // Counted in by the engine before the thread was spawned.
    let _alive = Alive(shared.clone());
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fastlb: worker {index}: cannot start runtime: {e}");
            return;
        }
    };
    let ctx = Rc::new(WorkerCtx::new(shared));
    LocalSet::new().block_on(&runtime, command_loop(ctx, commands));
    // Dropping the runtime here aborts whatever connections outlived the grace period.
}

async fn command_loop(ctx: Rc<WorkerCtx>, mut commands: mpsc::UnboundedReceiver<WorkerCmd>) {
    let sweeper = tokio::task::spawn_local(h1::sweep_loop(ctx.clone()));
    let mut accepting: HashMap<String, Vec<JoinHandle<()>>> = HashMap::new();
    while let Some(cmd) = commands.recv().await {
        match cmd {
            WorkerCmd::Listen { name, sockets } => {
                let tasks = sockets
                    .into_iter()
                    .filter_map(|socket| serve_socket(&ctx, &name, socket))
                    .collect();
                for old in accepting.insert(name, tasks).into_iter().flatten() {
                    old.abort();
                }
            }
            WorkerCmd::Unlisten { name } => {
                for task in accepting.remove(&name).into_iter().flatten() {
                    task.abort();
                }
                track::close_idle_clients(|l| l.closing.load(Relaxed));
                ctx.h2.goaway.notify_waiters();
                ctx.udp.close_where(&ctx, |s| s.entry.cfg.name == name);
            }
            WorkerCmd::CloseBackend { backend, addr } => {
                ctx.http.upstream.drop_idle(addr);
                ctx.h2.upstreams.retire(addr);
                track::close_backend(&backend);
                ctx.udp
                    .close_where(&ctx, |s| Arc::ptr_eq(&s.backend, &backend));
            }
            WorkerCmd::DropIdle { addr } => {
                ctx.http.upstream.drop_idle(addr);
                ctx.h2.upstreams.retire(addr);
            }
            WorkerCmd::Snapshot { index, reply } => {
                let _ = reply.send((index, ctx.metrics.borrow().clone()));
            }
            WorkerCmd::Stop { grace } => {
                for task in accepting.drain().flat_map(|(_, tasks)| tasks) {
                    task.abort();
                }
                ctx.stopping.set(true);
                track::close_idle_clients(|_| true);
                ctx.h2.goaway.notify_waiters();
                // At a binary upgrade the new process reads the same udp sockets from now on;
                // a session whose reply is still on its way keeps its socket for it.
                ctx.udp
                    .close_where(&ctx, |s| s.waiting_since.is_none() || s.parked);
                let drained = async {
                    while ctx.open.get() > 0 {
                        let notified = ctx.idle.notified();
                        if ctx.open.get() == 0 {
                            break;
                        }
                        notified.await;
                    }
                };
                let replies = tokio::time::timeout(UDP_REPLY_GRACE, async {
                    while ctx.udp.awaiting_replies() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
                let _ = tokio::time::timeout(grace, async { tokio::join!(drained, replies) }).await;
                ctx.udp.close_where(&ctx, |_| true);
                sweeper.abort();
                ctx.http.upstream.clear();
                return;
            }
        }
    }
}

/// The task that accepts (tcp) or receives (udp) on one listening socket.
fn serve_socket(ctx: &Rc<WorkerCtx>, name: &str, socket: ListenSocket) -> Option<JoinHandle<()>> {
    match socket {
        // SAFETY: the AsyncFd owns the listening socket, so its fd stays open and the same for
        // the AsyncFd's whole life.
        ListenSocket::Tcp(socket) => {
            match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
                Ok(listener) => Some(tokio::task::spawn_local(accept_loop(
                    ctx.clone(),
                    name.to_string(),
                    listener,
                ))),
                Err(e) => {
                    eprintln!("fastlb: listener {name}: {e}");
                    None
                }
            }
        }
        ListenSocket::Udp(socket) => Some(tokio::task::spawn_local(udp::listen_loop(
            ctx.clone(),
            name.to_string(),
            socket,
        ))),
    }
}

async fn accept_loop(ctx: Rc<WorkerCtx>, name: String, listener: AsyncFd<std::net::TcpListener>) {
    loop {
        let (stream, peer) = match accept(&listener).await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: back off instead of spinning (mini-redis does too).
                if !is_transient_accept_error(&e) {
                    eprintln!("fastlb: listener {name}: accept: {e}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let tables = ctx.shared.tables.load();
        let Some(entry) = tables.listeners.get(&name).cloned() else {
            continue;
        };
        drop(tables);
        if entry.cfg.protocol == Protocol::Udp {
            continue; // the engine rebinds a listener that changes to udp; until then, refuse
        }
        let limit = ctx.shared.max_connections;
        let open_before = ctx.shared.connections.fetch_add(1, Relaxed);
        let refused = limit > 0 && open_before >= limit;
        ctx.metrics.borrow_mut().record_accept(entry.id, refused);
        if refused {
            ctx.shared.connections.fetch_sub(1, Relaxed);
            continue; // dropping `stream` closes it
        }
        ctx.open.set(ctx.open.get() + 1);
        let ctx = ctx.clone();
        // One spawn per protocol: a task is as large as its future, and an L4 connection's is a
        // fraction of an http one's (idle RSS per connection is a target).
        match entry.cfg.protocol {
            Protocol::Tcp => tokio::task::spawn_local(async move {
                let _guard = ConnGuard {
                    ctx: &ctx,
                    listener: &entry,
                };
                let Some((stream, peer)) = proxied(&ctx, &entry, stream, peer).await else {
                    return;
                };
                match TcpStream::from_std(stream) {
                    Ok(stream) => l4::serve(&ctx, Conn::Plain(stream), peer, &entry).await,
                    Err(e) => eprintln!("fastlb: listener {}: {e}", entry.cfg.name),
                }
            }),
            // Registered with the reactor only if it ever has to wait (h1::client).
            Protocol::Http => tokio::task::spawn_local(async move {
                let _guard = ConnGuard {
                    ctx: &ctx,
                    listener: &entry,
                };
                let Some((stream, peer)) = proxied(&ctx, &entry, stream, peer).await else {
                    return;
                };
                let client = ClientSocket::new(stream);
                if let Some(h2c) = h1::serve(&ctx, client, None, peer, &entry).await {
                    // Boxed: an HTTP/1 connection's task should not carry h2's state.
                    let session =
                        crate::h2::server::serve(&ctx, h2c.conn, h2c.preread, None, peer, &entry);
                    Box::pin(session).await
                }
            }),
            Protocol::Udp => unreachable!("refused above"),
            Protocol::Https | Protocol::Tls => tokio::task::spawn_local(async move {
                let _guard = ConnGuard {
                    ctx: &ctx,
                    listener: &entry,
                };
                let Some((stream, peer)) = proxied(&ctx, &entry, stream, peer).await else {
                    return;
                };
                let Some(tls) = accept_tls(&ctx, &entry, stream).await else {
                    return;
                };
                if entry.cfg.protocol == Protocol::Https {
                    let info = Box::new(SessionInfo::of(tls.get_ref().1));
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let conn = Conn::Tls(Box::new(tls.into()));
                    // Boxed: an HTTP/1 connection's task should not carry h2's state.
                    if h2 {
                        let session = crate::h2::server::serve(
                            &ctx,
                            conn,
                            Vec::new(),
                            Some(info),
                            peer,
                            &entry,
                        );
                        Box::pin(session).await
                    } else if let Some(h2c) =
                        h1::serve(&ctx, ClientSocket::Conn(conn), Some(info), peer, &entry).await
                    {
                        // h2 with prior knowledge over TLS without ALPN: h2 too.
                        let session = crate::h2::server::serve(
                            &ctx,
                            h2c.conn,
                            h2c.preread,
                            None,
                            peer,
                            &entry,
                        );
                        Box::pin(session).await
                    }
                } else {
                    l4::serve(&ctx, Conn::Tls(Box::new(tls.into())), peer, &entry).await
                }
            }),
        };
    }
}

/// PROXY protocol: the connection and the client its header names (the peer itself without a
/// header, or with a LOCAL one); None: refused and counted (missing where required, malformed,
/// late, or sent by a source not in `from`). Listeners without it pay one branch.
#[inline]
async fn proxied(
    ctx: &WorkerCtx,
    entry: &ListenerEntry,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) -> Option<(std::net::TcpStream, SocketAddr)> {
    let Some(accept) = &entry.proxy else {
        return Some((stream, peer));
    };
    // Boxed: the reading state is freed once the header is in, not carried by the connection.
    let read = Box::pin(read_proxy_header(accept, &entry.cfg, stream, peer));
    match read.await {
        Ok(accepted) => Some(accepted),
        Err(why) => {
            ctx.metrics.borrow_mut().record_proxy_refused(entry.id);
            if std::env::var_os("FASTLB_DEBUG_PROXY").is_some() {
                eprintln!(
                    "fastlb: listener {}: {peer}: PROXY header refused: {why:?}",
                    entry.cfg.name
                );
            }
            None
        }
    }
}

async fn read_proxy_header(
    accept: &crate::tables::ProxyAccept,
    cfg: &crate::config::ListenerConfig,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) -> Result<(std::net::TcpStream, SocketAddr), proxy_header::Refused> {
    use proxy_header::{Header, Refused};
    let trusted = accept.from.iter().any(|c| c.contains(peer.ip()));
    if !trusted && accept.required {
        return Err(Refused::Bad("source not in proxy_protocol.from"));
    }
    let mut tcp = TcpStream::from_std(stream).map_err(Refused::Io)?;
    let limit = match cfg.header_read_ms {
        0 => PROXY_HEADER_MAX,
        ms => Duration::from_millis(ms),
    };
    let header = proxy_header::read(&mut tcp, accept.required, limit).await?;
    let client = match header {
        Some(_) if !trusted => return Err(Refused::Bad("a PROXY header from an untrusted source")),
        Some(Header::Proxied(client)) => client,
        Some(Header::Local) | None => peer,
    };
    Ok((tcp.into_std().map_err(Refused::Io)?, client))
}

/// How long a PROXY header may take on a listener without `header_read`.
const PROXY_HEADER_MAX: Duration = Duration::from_secs(10);

/// Runs the server side of a TLS handshake within the listener's `header_read` timeout, and
/// counts how it ended. None: it failed (the connection is closed).
async fn accept_tls(
    ctx: &WorkerCtx,
    entry: &ListenerEntry,
    stream: std::net::TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let acceptor = entry.tls.as_ref()?;
    let stream = TcpStream::from_std(stream).ok()?;
    let limit = match entry.cfg.header_read_ms {
        0 => TLS_HANDSHAKE_MAX,
        ms => Duration::from_millis(ms),
    };
    // Boxed: the handshake's state (the session, mid-handshake) is freed once it is done rather
    // than held in the connection's task for its whole life.
    let handshake = Box::pin(acceptor.accept(stream));
    let (result, version, tls) = match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(tls)) => {
            let conn = tls.get_ref().1;
            let version = tls::version_index(conn.protocol_version());
            (tls::server::completed(conn), version, Some(tls))
        }
        Ok(Err(e)) => (HandshakeResult::of_error(&e), 0, None),
        Err(_) => (HandshakeResult::Timeout, 0, None),
    };
    ctx.metrics
        .borrow_mut()
        .record_tls_handshake(entry.id, result as usize, version);
    tls
}

/// A handshake's limit on a listener without `header_read`.
const TLS_HANDSHAKE_MAX: Duration = Duration::from_secs(60);

/// Accepts one connection without registering it with the reactor (the caller decides when),
/// non-blocking and close-on-exec in the one accept4 call. TCP_NODELAY is inherited from the
/// listening socket.
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        let fd = listener.get_ref().as_raw_fd();
        let accepted = ready.try_io(|_| {
            // SAFETY: accept4 fills at most `len` bytes of the storage socket2 provides.
            let (client, addr) = unsafe {
                socket2::SockAddr::try_init(|storage, len| {
                    let client = libc::accept4(
                        fd,
                        storage.cast(),
                        len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    );
                    if client < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(client)
                    }
                })?
            };
            // SAFETY: accept4 returned a new socket this function now owns.
            let stream = unsafe { std::net::TcpStream::from_raw_fd(client) };
            let peer = addr
                .as_socket()
                .ok_or_else(|| io::Error::other("accepted a non-IP socket"))?;
            Ok((stream, peer))
        });
        match accepted {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "fastlb: cannot pin worker to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}
