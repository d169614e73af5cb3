//! L7 (HTTP/1.1 and 1.0) proxying: parse, route, balance per request, forward over pooled
//! upstream connections, stream bodies through.
//!
//! One task per client connection runs `serve`: read a request head (`parse` refuses anything
//! ambiguous), decide where it goes (`route`, the pool's selector, affinity), rewrite the head
//! (`rewrite`), send it over a kept-alive backend connection (`upstream`), and stream the
//! response back. Buffers come from the worker (`buf`) and go back when the request is done,
//! so an idle keep-alive connection holds no buffer.

pub mod buf;
pub mod chunked;
pub mod client;
pub mod io;
pub mod parse;
pub mod rewrite;
mod to_h2;
pub mod translate;
pub mod upstream;

use crate::balance::{hash_key, Pool};
use crate::config::HttpVersion;
use crate::h2::io::PREFACE;
use crate::l4::forward;
use crate::metrics::NO_ROUTE;
use crate::net::Conn;
use crate::proxy::compress::Encoding;
use crate::proxy::exchange::ProxyFacts;
use crate::proxy::header_rules::{HeaderRules, RouteRewrite};
use crate::proxy::outcome::{micros, ClientInfo, NOT_MEASURED};
use crate::proxy::route::{RequestView, Target};
use crate::proxy::split::GroupCookie;
use crate::proxy::tries::{self, Tries};
use crate::proxy::{self, record_refused, Attempt, Ended, HttpListener, Next, Outcome, RequestLog};
use crate::tables::ListenerEntry;
use crate::tls::SessionInfo;
use crate::worker::WorkerCtx;
use buf::{Buf, BufPool, BUF_SIZE};
use chunked::ChunkedDecoder;
use client::ClientSocket;
use io::{read_some, write_all, Deadline};
use parse::HeaderKind;
use parse::{BodyKind, HeadError, HeaderSpan, Limits, Method, RequestHead, Version};
use rewrite::AnswerFields;
use rewrite::{ClientConnection, View};
use rustls::pki_types::ServerName;
use std::cell::RefCell;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use upstream::UpstreamPool;

/// Largest response head accepted from a backend.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;

pub(crate) const RESPONSE_LIMITS: Limits = Limits {
    max_header_bytes: MAX_RESPONSE_HEAD,
    max_headers: 256,
};

/// What one worker keeps for all its http connections.
#[derive(Default)]
pub struct HttpWorker {
    pub bufs: BufPool,
    pub upstream: UpstreamPool,
    /// Header positions of the head being parsed; only used between two awaits.
    headers: RefCell<Vec<HeaderSpan>>,
}

/// Closes parked upstream connections that expired or were closed by their backend.
pub async fn sweep_loop(ctx: std::rc::Rc<WorkerCtx>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ctx.http.upstream.sweep();
        ctx.h2.upstreams.sweep();
    }
}

/// One client connection.
struct Client {
    stream: ClientSocket,
    /// The TLS session of an https connection.
    tls: Option<Box<SessionInfo>>,
    /// Who connected (after a PROXY header, who that names).
    peer: SocketAddr,
    /// The client of the current request: `peer`, or the hop its X-Forwarded-For names when
    /// `peer` is a trusted proxy (port 0 then). What routes, hashes, limits and logs go by.
    addr: SocketAddr,
    /// A request head that arrived in part, kept at its exact size while we wait for the rest.
    partial: Vec<u8>,
    /// Bytes of the next pipelined request(s), already read.
    pending: Option<Buf>,
    /// Requests read so far.
    requests: u32,
}

impl Client {
    /// What a PROXY header to a `send_proxy` pool names for the current request.
    fn proxy_facts(&self) -> ProxyFacts<'_> {
        ProxyFacts::of(self.stream.fd(), self.addr, self.tls.as_deref())
    }

    fn info(&self) -> ClientInfo<'_> {
        ClientInfo {
            peer: self.addr,
            tls: self.tls.as_deref(),
        }
    }
}

impl Drop for Client {
    /// A TLS connection ends with a close_notify (best effort, never waiting): a response
    /// delimited by the connection's end is then known complete, not truncated (curl reports a
    /// missing one as an error).
    fn drop(&mut self) {
        if let ClientSocket::Conn(c @ Conn::Tls(_)) = &mut self.stream {
            c.shutdown_write();
        }
    }
}

/// A client that opened its connection with the HTTP/2 preface, handed to `h2::server`.
pub struct H2cClient {
    pub conn: Conn,
    /// What was read of it (the preface, maybe more).
    pub preread: Vec<u8>,
}

/// Serves one accepted client connection to the end, or until it turns out to be h2c.
pub async fn serve(
    ctx: &WorkerCtx,
    stream: ClientSocket,
    tls: Option<Box<SessionInfo>>,
    peer: SocketAddr,
    accepted: &Arc<ListenerEntry>,
) -> Option<H2cClient> {
    // Each request uses the listener's tables as they are when its head arrives, so a reload
    // applies to open keep-alive connections at their next request.
    let mut generation = ctx.shared.tables.load().generation;
    let mut reloaded: Option<Arc<ListenerEntry>> = None;
    let timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut deadline = Deadline::new(timer);
    let mut client = Client {
        stream,
        tls,
        peer,
        addr: peer,
        partial: Vec::new(),
        pending: None,
        requests: 0,
    };
    loop {
        let listener = reloaded.as_deref().unwrap_or(&**accepted);
        let http = listener.http.as_ref()?;
        client.addr = client.peer;
        let (mut req, head) =
            match read_request(ctx, listener, http, &mut client, &mut deadline).await {
                Ok(r) => r,
                Err(Some(H2C)) => {
                    // An h2c client (prior knowledge): the connection is HTTP/2 from here on,
                    // served by the caller (so this future does not carry h2's state).
                    let stream = std::mem::replace(&mut client.stream, ClientSocket::Switching);
                    return Some(H2cClient {
                        conn: stream.into_conn().ok()?,
                        preread: std::mem::take(&mut client.partial),
                    });
                }
                Err(Some(CLOSED_IDLE)) => {
                    lingering_close(ctx, &mut client.stream, &mut deadline).await;
                    return None;
                }
                Err(Some(status)) => {
                    record_refused(ctx, listener, status, true);
                    if let Some(log) = ctx.shared.access_log.load().as_ref() {
                        let outcome = Outcome {
                            status,
                            ..Outcome::default()
                        };
                        log.send(proxy::outcome::access_line(
                            listener,
                            client.info(),
                            &outcome,
                            status,
                            0,
                        ));
                    }
                    refuse_and_close(ctx, &mut client, status, &mut deadline).await;
                    return None;
                }
                Err(None) => return None,
            };
        client.requests = client.requests.saturating_add(1);
        let tables = ctx.shared.tables.load();
        if tables.generation != generation {
            generation = tables.generation;
            if let Some(entry) = tables.listeners.get(&accepted.cfg.name) {
                reloaded = Some(entry.clone());
            }
        }
        drop(tables);
        let listener = reloaded.as_deref().unwrap_or(&**accepted);
        let http = listener.http.as_ref()?;
        if http.trusted.is_some() {
            client.addr =
                request_client(http, client.peer, req.filled(), &ctx.http.headers.borrow());
        }
        let next = exchange(
            ctx,
            listener,
            http,
            &mut client,
            &mut req,
            head,
            &mut deadline,
        )
        .await;
        let closing = ctx.stopping.get() || listener.closing.load(Relaxed);
        if next == Next::Close || closing {
            // Requests pipelined behind the last one are left unanswered: closing with them
            // unread would reset the connection and could destroy the answer just sent. So
            // would a next request from a client told keep-alive before a stop began.
            let unread = !req.is_empty() || next == Next::KeepAlive;
            ctx.http.bufs.give(req);
            if unread {
                lingering_close(ctx, &mut client.stream, &mut deadline).await;
            }
            return None;
        }
        if req.is_empty() {
            ctx.http.bufs.give(req);
        } else {
            client.pending = Some(req);
        }
    }
}

/// Bytes and time a refused client's leftover input is read for before the socket closes.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Answers `status` and closes the connection (malformed input: nothing more is read from it).
async fn refuse_and_close(
    ctx: &WorkerCtx,
    client: &mut Client,
    status: u16,
    deadline: &mut Deadline<'_>,
) {
    if answer(
        ctx,
        client,
        status,
        true,
        false,
        AnswerFields::default(),
        deadline,
    )
    .await
    .is_ok()
    {
        lingering_close(ctx, &mut client.stream, deadline).await;
    }
}

/// Closes after an error answer the way nginx's lingering close does: send FIN, then read and
/// discard what the client still sends for a moment. Closing with unread input would make the
/// kernel send a reset, which can destroy the answer before the client reads it. Nothing read
/// here is ever parsed.
async fn lingering_close(ctx: &WorkerCtx, stream: &mut ClientSocket, deadline: &mut Deadline<'_>) {
    stream.shutdown_write();
    let mut sink = ctx.http.bufs.take();
    deadline.set(LINGER_TIME);
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        match stream.try_read(sink.spare(BUF_SIZE)) {
            Ok(0) => break,
            Ok(n) => discarded += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stream.readable(deadline).await.is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
        sink.clear();
    }
    ctx.http.bufs.give(sink);
}

/// A new backend connection that begins with a PROXY header naming `facts` (`send_proxy`).
async fn connect_proxied(
    addr: SocketAddr,
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    facts: ProxyFacts<'_>,
    version: crate::config::ProxyVersion,
) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = crate::net::connect(addr, timer).await?;
    crate::net::write_first(tcp, &facts.header(version)).await
}

/// The client a request from `peer` names in its X-Forwarded-For fields (`trusted_proxies`).
fn request_client(
    http: &HttpListener,
    peer: SocketAddr,
    buf: &[u8],
    headers: &[HeaderSpan],
) -> SocketAddr {
    let xff = headers
        .iter()
        .filter(|h| h.kind == HeaderKind::XForwardedFor)
        .map(|h| h.value.get(buf));
    http.client_addr(peer, xff)
}

/// Not a status: `read_request` found the HTTP/2 preface (its bytes are left in
/// `client.partial`).
const H2C: u16 = 0;
/// Not a status either: a stop or the listener's removal closed this idle connection
/// (`track::close_idle_clients`); what the client sent since is read away, unanswered.
const CLOSED_IDLE: u16 = 1;

/// Reads until a whole request head is buffered. Err(None): the client left or idled out;
/// Err(Some(H2C)): the client speaks HTTP/2; Err(Some(CLOSED_IDLE)): closed by this side;
/// Err(Some(status)): answer that status and close.
async fn read_request(
    ctx: &WorkerCtx,
    listener: &ListenerEntry,
    http: &HttpListener,
    client: &mut Client,
    deadline: &mut Deadline<'_>,
) -> Result<(Buf, RequestHead), Option<u16>> {
    let bufs = &ctx.http.bufs;
    let cfg = &listener.cfg;
    let max_len = http.limits.max_header_bytes.saturating_add(1).max(BUF_SIZE);
    // Try a read before waiting: a new connection's request is usually there already, and a
    // registered idle one answers WouldBlock from tokio's readiness without a syscall.
    let mut buf = match client.pending.take() {
        Some(b) => b,
        None => restore(bufs, &mut client.partial),
    };
    let mut head_clock_started = false;
    // Bytes already known not to end the head: a head trickling in a byte at a time is parsed
    // once per line end, not once per read (httparse starts over each time).
    let mut scanned = 0;
    loop {
        if client.requests == 0 && buf.filled().first() == Some(&b'P') {
            let b = buf.filled();
            let n = b.len().min(PREFACE.len());
            if b[..n] == PREFACE[..n] {
                if n == PREFACE.len() {
                    client.partial.extend_from_slice(b);
                    bufs.give(buf);
                    return Err(Some(H2C));
                }
                // A preface in part: read on, without parsing it as HTTP/1.
                scanned = buf.len();
            }
        }
        if !buf.is_empty() && may_end_head(buf.filled(), scanned) {
            let parsed = {
                let mut headers = ctx.http.headers.borrow_mut();
                parse::parse_request(buf.filled(), &http.limits, &mut headers)
            };
            match parsed {
                Ok(Some(head)) => return Ok((buf, head)),
                Ok(None) => {}
                Err(e) => {
                    bufs.give(buf);
                    return Err(Some(e.status()));
                }
            }
            if !head_clock_started {
                head_clock_started = true;
                deadline.set(Duration::from_millis(cfg.header_read_ms));
            }
        }
        scanned = buf.len();
        let spare = buf.spare(max_len);
        if spare.is_empty() {
            bufs.give(buf);
            return Err(Some(HeadError::TooLarge.status()));
        }
        match client.stream.try_read(spare) {
            Ok(0) => {
                bufs.give(buf);
                return Err(None);
            }
            Ok(n) => buf.advance(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Wait without holding a pooled buffer: keep just the bytes we have.
                client.partial.extend_from_slice(buf.filled());
                bufs.give(buf);
                if client.partial.is_empty() {
                    // Between requests the keep-alive timeout applies; before the first one,
                    // `header_read` (nginx's client_header_timeout, HAProxy's http-request).
                    let wait = if client.requests == 0 {
                        cfg.header_read_ms
                    } else {
                        cfg.client_idle_ms
                    };
                    deadline.set(Duration::from_millis(wait));
                }
                // Registered while idle between requests, so a stop or the listener's removal
                // can close it. Not before the first: a client that has just connected cannot
                // know its request would cross the close, so its request is waited for and
                // answered (with `Connection: close`), within `header_read`.
                let tracked = (client.partial.is_empty() && client.requests > 0)
                    .then(|| crate::track::idle_client(client.stream.fd(), listener));
                let woke = client.stream.readable(deadline).await;
                if tracked
                    .as_ref()
                    .is_some_and(crate::track::Tracked::was_shut)
                {
                    return Err(Some(CLOSED_IDLE));
                }
                drop(tracked);
                if woke.is_err() {
                    let timed_out_mid_head = !client.partial.is_empty();
                    client.partial = Vec::new();
                    return Err(timed_out_mid_head.then_some(408));
                }
                buf = restore(bufs, &mut client.partial);
            }
            Err(_) => {
                bufs.give(buf);
                return Err(None);
            }
        }
    }
}

/// Whether `buf` may hold a whole head, looking only at what came after its first `scanned`
/// bytes: a head ends with an empty line, so some new LF must be followed by LF or CRLF.
fn may_end_head(buf: &[u8], scanned: usize) -> bool {
    let from = scanned.saturating_sub(2);
    buf[from..]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && matches!(&buf[from + i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
        // A parse also catches a malformed request line before its end: let the first bytes
        // through once.
        || scanned == 0
}

/// A pooled buffer holding `partial`'s bytes; `partial` is freed.
fn restore(bufs: &BufPool, partial: &mut Vec<u8>) -> Buf {
    let mut buf = bufs.take();
    if !partial.is_empty() {
        buf.extend_from_slice(partial);
        *partial = Vec::new();
    }
    buf
}

/// Writes an answer of fastlb's own.
#[allow(clippy::too_many_arguments)]
async fn answer(
    ctx: &WorkerCtx,
    client: &mut Client,
    status: u16,
    close: bool,
    http10_keep_alive: bool,
    fields: AnswerFields<'_>,
    deadline: &mut Deadline<'_>,
) -> std::io::Result<()> {
    let mut out = ctx.http.bufs.take_vec();
    rewrite::error_response(
        &mut out,
        status,
        ClientConnection {
            close,
            http10_keep_alive,
        },
        fields,
    );
    deadline.set(Duration::from_secs(10));
    let r = if close {
        client.stream.write_last(&out, deadline).await
    } else {
        client.stream.write_all(&out, deadline).await
    };
    ctx.http.bufs.give_vec(out);
    r
}

/// Why fastlb answers a request itself rather than a backend.
enum Refusal {
    Status(u16),
    /// A redirect route matched; the plan's output holds the `Location`.
    Redirect(u16),
}

/// Where a request goes, decided synchronously from its head.
struct Plan {
    pool: Arc<Pool>,
    /// Index of the route that matched, and the id its requests are counted under; NO_ROUTE
    /// for both: the listener's default pool (u16s keep the connection's future small).
    route: u16,
    route_id: u16,
    /// `split_affinity`: the group cookie to give a client the split placed just now.
    group: Option<Box<GroupCookie>>,
    key: u64,
    /// The backend the affinity cookie names, if usable.
    pinned: Option<usize>,
    method: Method,
    version: Version,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    /// TLS pools: the name sent to and verified against the backend (the pool's `sni`, else
    /// the request's host), and a tag of the name and the pool's TLS config, which keeps parked
    /// connections apart by both.
    sni: Option<Box<ServerName<'static>>>,
    sni_tag: u64,
    /// The response encoding the client accepts best of the listener's `compression`.
    compress: Option<Encoding>,
}

/// Body bytes still to come from a peer, and how to tell where the body ends.
enum BodyLeft {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl BodyLeft {
    fn new(kind: BodyKind) -> Self {
        match kind {
            BodyKind::None => BodyLeft::Length(0),
            BodyKind::Length(n) => BodyLeft::Length(n),
            BodyKind::Chunked => BodyLeft::Chunked(ChunkedDecoder::new()),
            BodyKind::UntilClose => BodyLeft::UntilClose,
        }
    }

    fn done(&self) -> bool {
        match self {
            BodyLeft::Length(n) => *n == 0,
            BodyLeft::Chunked(d) => d.is_done(),
            BodyLeft::UntilClose => false,
        }
    }

    /// How many of `data`'s first bytes belong to the body; Err on a malformed chunk.
    fn take(&mut self, data: &[u8]) -> Result<usize, chunked::ChunkError> {
        match self {
            BodyLeft::Length(n) => {
                let k = (*n).min(data.len() as u64);
                *n -= k;
                Ok(k as usize)
            }
            BodyLeft::Chunked(d) => d.feed(data).map(|(k, _)| k),
            BodyLeft::UntilClose => Ok(data.len()),
        }
    }

    /// Like `take`, with the body's data (chunk framing removed) appended to `out`.
    fn dechunk(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, chunked::ChunkError> {
        if let BodyLeft::Chunked(d) = self {
            return d
                .dechunk(data, |b| out.extend_from_slice(b))
                .map(|(k, _)| k);
        }
        let k = self.take(data)?;
        out.extend_from_slice(&data[..k]);
        Ok(k)
    }
}

/// Which side failed while a body streamed through.
enum CopyError {
    /// The source closed or failed before the body ended.
    Source,
    Destination,
    /// A malformed chunked body.
    Framing,
}

/// Streams the rest of a body from `src` to `dst`, using `buf` (which may already hold
/// bytes); bytes after the body's end stay in `buf`. A body of known length with at least the
/// splice threshold left, or one that runs until the backend closes, moves by `splice(2)` once
/// `buf` is empty, as L4 bulk transfers do (chunked bodies are scanned, so they are copied).
#[allow(clippy::too_many_arguments)]
async fn copy_body(
    relay: &forward::RelayBuffers,
    src: &mut Conn,
    dst: &mut Conn,
    buf: &mut Buf,
    left: &mut BodyLeft,
    read_timeout: Duration,
    write_timeout: Duration,
    deadline: &mut Deadline<'_>,
) -> Result<u64, CopyError> {
    let mut moved = 0;
    while !left.done() {
        let bulk = match left {
            BodyLeft::Length(n) => *n >= relay.splice_threshold() as u64,
            BodyLeft::UntilClose => true,
            BodyLeft::Chunked(_) => false,
        };
        if let (true, true, Conn::Plain(src), Conn::Plain(dst)) =
            (bulk, buf.is_empty(), &*src, &*dst)
        {
            let limit = match left {
                BodyLeft::Length(n) => *n,
                _ => u64::MAX,
            };
            let n = splice_body(
                relay,
                src,
                dst,
                limit,
                read_timeout,
                write_timeout,
                deadline,
            )
            .await?;
            moved += n;
            match left {
                BodyLeft::Length(rest) => *rest -= n,
                _ => return Ok(moved),
            }
            continue;
        }
        if buf.is_empty() {
            deadline.set(read_timeout);
            // A bulk body through TLS (no splice) reads up to 64 KiB at a time: a quarter of the
            // reads, and rustls writes the four records in one writev. The grown buffer is
            // freed, not pooled: one allocation per large body.
            let most = if bulk { BULK_READ } else { BUF_SIZE };
            buf.grow_empty_to(most);
            match read_some(src, buf.spare(most), deadline).await {
                Ok(0) if matches!(left, BodyLeft::UntilClose) => return Ok(moved),
                Ok(0) | Err(_) => return Err(CopyError::Source),
                Ok(n) => buf.advance(n),
            }
        }
        let k = left.take(buf.filled()).map_err(|_| CopyError::Framing)?;
        deadline.set(write_timeout);
        write_all(dst, &buf.filled()[..k], deadline)
            .await
            .map_err(|_| CopyError::Destination)?;
        buf.consume(k);
        moved += k as u64;
    }
    Ok(moved)
}

/// The most one read of a bulk body takes when it cannot be spliced (TLS on either side).
const BULK_READ: usize = 64 * 1024;

/// Splices up to `limit` bytes (until EOF for `u64::MAX`) from `src` to `dst` through a
/// pooled pipe; returns how many moved. The pipe is only ever filled when empty, so splice's
/// EAGAIN from the socket can only mean "socket empty" and clearing readiness on it is safe.
async fn splice_body(
    relay: &forward::RelayBuffers,
    src: &TcpStream,
    dst: &TcpStream,
    limit: u64,
    read_timeout: Duration,
    write_timeout: Duration,
    deadline: &mut Deadline<'_>,
) -> Result<u64, CopyError> {
    use crate::l4::pipe::splice;
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let mut pipe = relay.pipes.take().map_err(|_| CopyError::Destination)?;
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut moved = 0u64;
    let result = loop {
        if moved == limit {
            break Ok(moved);
        }
        let want = (limit - moved).min(pipe.capacity as u64) as usize;
        deadline.set(read_timeout);
        let n = loop {
            match src.try_io(Interest::READABLE, || splice(src_fd, pipe.write_fd(), want)) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if io::wait_ready(src, deadline, true).await.is_err() {
                        break Err(CopyError::Source);
                    }
                }
                Err(_) => break Err(CopyError::Source),
                Ok(n) => break Ok(n),
            }
        };
        let n = match n {
            Ok(0) if limit == u64::MAX => break Ok(moved),
            Ok(0) | Err(_) => break Err(CopyError::Source),
            Ok(n) => n,
        };
        pipe.len = n;
        deadline.set(write_timeout);
        while pipe.len > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read_fd(), dst_fd, pipe.len)
            }) {
                Ok(m) => pipe.len -= m,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if io::wait_ready(dst, deadline, false).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if pipe.len > 0 {
            break Err(CopyError::Destination);
        }
        moved += n as u64;
    };
    if pipe.len == 0 {
        relay.pipes.give(pipe);
    }
    result
}

/// Decides the pool, key and affinity of a request and writes the head for the backend into
/// `out`. Err(status) when fastlb answers itself.
fn plan(
    ctx: &WorkerCtx,
    listener: &ListenerEntry,
    http: &HttpListener,
    buf: &[u8],
    head: &RequestHead,
    client: &Client,
    out: &mut Vec<u8>,
) -> Result<Plan, Refusal> {
    let tls = client.tls.as_deref();
    let headers = ctx.http.headers.borrow();
    let via = &ctx.shared.via_token;
    if rewrite::has_looped(buf, &headers, via) {
        return Err(Refusal::Status(508));
    }
    let view = View {
        buf,
        head,
        headers: &headers,
        peer: client.addr,
    };
    let (route, pool, group) = match http.routes.select(&view) {
        Some((i, Target::Pool(pool, group))) => (Some(i), pool.clone(), group.map(Box::new)),
        Some((_, Target::Redirect(r))) => {
            rewrite::redirect_location(out, r, &view, tls.is_some());
            return Err(Refusal::Redirect(r.code));
        }
        None => (None, listener.pool.clone(), None),
    };
    let key = proxy::request_key(&pool.hash_key, &view);
    let pinned = proxy::pinned_backend(&pool, &view);
    // `Upgrade: h2c` is not taken up (as nginx): h2c is spoken with prior knowledge only, and
    // a backend must not switch a connection fastlb thinks is HTTP/1.1.
    let upgrade = head.conn_upgrade
        && head
            .upgrade
            .is_some_and(|u| !u.get(buf).eq_ignore_ascii_case(b"h2c"));
    let sni = pool
        .tls
        .as_ref()
        .and_then(|t| t.sni.clone().or_else(|| view.host().and_then(host_name)))
        .map(Box::new);
    let sni_tag = match (&pool.tls, &sni) {
        (Some(t), Some(n)) => t.id ^ hash_key(n.to_str().as_bytes()),
        (Some(t), None) => t.id,
        (None, _) => 0,
    } ^ pool.send_proxy.map_or(0, |_| client.proxy_facts().tag());
    let origin = rewrite::Origin {
        peer: client.peer, // X-Forwarded-For gets the hop that connected
        via_token: via,
        tls,
    };
    let route_rewrite = route.and_then(|i| http.routes.rewrite(i));
    rewrite::request_head(out, buf, head, &headers, origin, upgrade, route_rewrite);
    Ok(Plan {
        key,
        pinned,
        method: head.method,
        version: head.version,
        // Stopping, or the listener was removed by a reload: answer, then close.
        keep_alive: head.keep_alive() && !ctx.stopping.get() && !listener.closing.load(Relaxed),
        expect_continue: head.expect_continue && head.version == Version::Http11,
        upgrade,
        pool,
        route: route.map_or(NO_ROUTE, |i| i as u16),
        route_id: route.map_or(NO_ROUTE, |i| http.routes.id(i)),
        group,
        sni,
        sni_tag,
        compress: http.compression.as_ref().and_then(|c| {
            let accept = headers.iter().find(|h| {
                h.kind == HeaderKind::Other
                    && h.name.get(buf).eq_ignore_ascii_case(b"accept-encoding")
            });
            c.negotiate(accept.map(|h| h.value.get(buf)))
        }),
    })
}

/// The request's side of its access log line, from the request line and head.
fn request_log(ctx: &WorkerCtx, buf: &[u8], head: &RequestHead) -> RequestLog {
    // From the request line, which may start after an empty line (RFC 9112 2.2).
    let method = head
        .line()
        .get(buf)
        .split(|&b| b == b' ')
        .next()
        .unwrap_or_default()
        .to_vec();
    let request_id = ctx
        .http
        .headers
        .borrow()
        .iter()
        .find(|h| h.kind == HeaderKind::XRequestId)
        .map(|h| h.value.get(buf).to_vec())
        .unwrap_or_default();
    RequestLog {
        method,
        target: head.target.get(buf).to_vec(),
        request_id,
        protocol: match head.version {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        },
        ..RequestLog::default()
    }
}

/// The X-Request-Id fastlb generated into the backend's head (the client sent none).
fn generated_request_id(backend_head: &[u8]) -> Vec<u8> {
    const FIELD: &[u8] = b"\r\nX-Request-Id: ";
    match backend_head.windows(FIELD.len()).position(|w| w == FIELD) {
        Some(i) => {
            let v = &backend_head[i + FIELD.len()..];
            let end = v.iter().position(|&b| b == b'\r').unwrap_or(v.len());
            v[..end].to_vec()
        }
        None => Vec::new(),
    }
}

/// A Host value (`name[:port]`) as a TLS server name.
fn host_name(host: &[u8]) -> Option<ServerName<'static>> {
    crate::net::server_name(std::str::from_utf8(host).ok()?)
}

/// Proxies one request (its head parsed at the start of `req`) and its response, and counts
/// it.
async fn exchange(
    ctx: &WorkerCtx,
    listener: &ListenerEntry,
    http: &HttpListener,
    client: &mut Client,
    req: &mut Buf,
    head: RequestHead,
    deadline: &mut Deadline<'_>,
) -> Next {
    let started = Instant::now();
    let mut outcome = Outcome::default();
    // One look at the access log per request: a request it did not see start is not logged.
    let logging = ctx.shared.access_log.load().is_some();
    let next = exchange_counted(
        ctx,
        listener,
        http,
        client,
        req,
        head,
        deadline,
        &mut outcome,
        logging,
    )
    .await;
    let took = started.elapsed().as_micros() as u64;
    proxy::finish(ctx, listener, client.info(), &outcome, took);
    next
}

#[allow(clippy::too_many_arguments)]
async fn exchange_counted(
    ctx: &WorkerCtx,
    listener: &ListenerEntry,
    http: &HttpListener,
    client: &mut Client,
    req: &mut Buf,
    head: RequestHead,
    deadline: &mut Deadline<'_>,
    outcome: &mut Outcome,
    logging: bool,
) -> Next {
    if logging {
        outcome.log = Some(Box::new(request_log(ctx, req.filled(), &head)));
    }
    if let Some(limiter) = &http.rate_limit {
        if let Err(after) = limiter.check(client.addr.ip(), crate::balance::now_ns()) {
            ctx.metrics.borrow_mut().record_rate_limited(listener.id);
            outcome.status = 429;
            let fields = AnswerFields {
                retry_after: after,
                ..AnswerFields::default()
            };
            return refuse(ctx, client, req, &head, 429, fields, deadline).await;
        }
    }
    let mut out = ctx.http.bufs.take_vec();
    let plan = match plan(ctx, listener, http, req.filled(), &head, client, &mut out) {
        Ok(p) => p,
        Err(refusal) => {
            let (status, location) = match refusal {
                Refusal::Status(status) => (status, &[][..]),
                Refusal::Redirect(status) => (status, &out[..]),
            };
            outcome.status = status;
            let fields = AnswerFields {
                location,
                ..AnswerFields::default()
            };
            let next = refuse(ctx, client, req, &head, status, fields, deadline).await;
            ctx.http.bufs.give_vec(out);
            return next;
        }
    };
    outcome.pool = plan.pool.id;
    outcome.route = plan.route_id;
    if let Some(log) = outcome.log.as_deref_mut() {
        log.route = (plan.route != NO_ROUTE).then_some(plan.route as usize);
        log.pool = plan.pool.name.clone();
        if log.request_id.is_empty() {
            log.request_id = generated_request_id(&out);
        }
    }
    // A response to compress goes through the http-parts path too (proxy::compress), for a
    // request without a large body to buffer (uploads keep the byte path, uncompressed).
    let compressible = plan.compress.is_some()
        && plan.pool.send_proxy.is_none()
        && matches!(
            head.body,
            BodyKind::None | BodyKind::Length(0..=COMPRESS_MAX_BODY)
        );
    if (plan.pool.http_version == HttpVersion::Http2 || compressible) && !plan.upgrade {
        ctx.http.bufs.give_vec(out);
        // Boxed: only requests to HTTP/2 pools (or compressed) carry the translation's state.
        let h2 = to_h2::exchange(ctx, listener, client, req, &head, plan, outcome, deadline);
        return Box::pin(h2).await;
    }
    // The body bytes that came with the head go out with it. A small body still on its way
    // is read first (nginx's request buffering), so the whole request can go to another
    // backend if the first fails; a large one streams through once a backend is chosen.
    req.consume(head.len);
    let mut body = BodyLeft::new(head.body);
    let expect_continue = plan.expect_continue;
    let mut sent_continue = false;
    let buffered = buffer_body(
        client,
        req,
        &mut body,
        &mut out,
        expect_continue,
        &mut sent_continue,
        Duration::from_millis(listener.cfg.client_idle_ms),
        deadline,
    )
    .await;
    match buffered {
        Ok(()) => {}
        Err(CopyError::Framing) => {
            ctx.http.bufs.give_vec(out);
            ctx.metrics.borrow_mut().record_bad_request(listener.id);
            outcome.status = 400;
            refuse_and_close(ctx, client, 400, deadline).await;
            return Next::Close;
        }
        Err(_) => {
            ctx.http.bufs.give_vec(out);
            return Next::Close;
        }
    }
    let mut exchange = Exchange {
        ctx,
        listener,
        client,
        req,
        plan,
        out,
        replayable: body.done(),
        body,
        sent_continue,
        client_must_close: false,
        fresh_connection: false,
        deadline,
        outcome,
    };
    let next = exchange.run().await;
    ctx.http.bufs.give_vec(exchange.out);
    next
}

/// Request bodies up to this size are read whole before a backend is chosen.
const BUFFERED_BODY_MAX: usize = 64 * 1024;

/// Moves the body bytes already read into `out` and, while the body is small, reads the rest
/// from the client too (answering `Expect: 100-continue` first). Leaves `body` with what is
/// still to stream.
#[allow(clippy::too_many_arguments)]
async fn buffer_body(
    client: &mut Client,
    req: &mut Buf,
    body: &mut BodyLeft,
    out: &mut Vec<u8>,
    expect_continue: bool,
    sent_continue: &mut bool,
    client_timeout: Duration,
    deadline: &mut Deadline<'_>,
) -> Result<(), CopyError> {
    let head_len = out.len();
    loop {
        let k = body.take(req.filled()).map_err(|_| CopyError::Framing)?;
        out.extend_from_slice(&req.filled()[..k]);
        req.consume(k);
        let small = match body {
            BodyLeft::Length(n) => out.len() - head_len + (*n as usize) <= BUFFERED_BODY_MAX,
            BodyLeft::Chunked(_) => out.len() - head_len <= BUFFERED_BODY_MAX,
            BodyLeft::UntilClose => false,
        };
        if body.done() || !small {
            return Ok(());
        }
        if expect_continue && !*sent_continue {
            *sent_continue = true;
            deadline.set(client_timeout);
            let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
            client
                .stream
                .write_all(interim, deadline)
                .await
                .map_err(|_| CopyError::Source)?;
        }
        match client.stream.try_read(req.spare(BUF_SIZE)) {
            Ok(0) => return Err(CopyError::Source),
            Ok(n) => req.advance(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                deadline.set(client_timeout);
                client
                    .stream
                    .readable(deadline)
                    .await
                    .map_err(|_| CopyError::Source)?;
            }
            Err(_) => return Err(CopyError::Source),
        }
    }
}

/// Answers a request fastlb refuses before any backend is involved; the connection stays open
/// only when the request had no body left unread.
async fn refuse(
    ctx: &WorkerCtx,
    client: &mut Client,
    req: &mut Buf,
    head: &RequestHead,
    status: u16,
    fields: AnswerFields<'_>,
    deadline: &mut Deadline<'_>,
) -> Next {
    let mut keep = head.keep_alive();
    match head.body {
        BodyKind::None | BodyKind::Length(0) => req.consume(head.len),
        BodyKind::Length(n) if (req.len() - head.len) as u64 >= n => {
            req.consume(head.len + n as usize)
        }
        _ => keep = false,
    }
    let http10 = keep && head.version == Version::Http10;
    match answer(ctx, client, status, !keep, http10, fields, deadline).await {
        Ok(()) if keep => Next::KeepAlive,
        Ok(()) => {
            lingering_close(ctx, &mut client.stream, deadline).await;
            Next::Close
        }
        Err(_) => Next::Close,
    }
}

/// One request on its way to a backend: what each try needs.
struct Exchange<'a, 't> {
    ctx: &'a WorkerCtx,
    listener: &'a ListenerEntry,
    client: &'a mut Client,
    /// The client's read buffer: the rest of the request body, then pipelined requests.
    req: &'a mut Buf,
    plan: Plan,
    /// The head (and first body bytes) for the backend; then the response head.
    out: Vec<u8>,
    body: BodyLeft,
    /// The whole request is still in `out`, so another backend can be sent it.
    replayable: bool,
    sent_continue: bool,
    /// Skip the kept-alive connections: one was found closed, so its siblings likely are too.
    fresh_connection: bool,
    /// Part of the request body was read from the client but not delivered: the connection
    /// cannot carry another request.
    client_must_close: bool,
    deadline: &'a mut Deadline<'t>,
    outcome: &'a mut Outcome,
}

/// What route `route` (NO_ROUTE: none) of `listener` rewrites.
fn route_rewrite(listener: &ListenerEntry, route: u16) -> Option<&RouteRewrite> {
    let routes = &listener.http.as_ref()?.routes;
    (route != NO_ROUTE)
        .then(|| routes.rewrite(route as usize))
        .flatten()
}

/// The largest request body buffered to compress the response (see `exchange`).
const COMPRESS_MAX_BODY: u64 = 1 << 20;

/// Route `route`'s `response_headers`, if it has any.
fn response_rules(listener: &ListenerEntry, route: u16) -> Option<&HeaderRules> {
    route_rewrite(listener, route)?.response.as_ref()
}

impl Exchange<'_, '_> {
    /// Tries backends in turn until one answers or the retries are spent; then answers
    /// itself if none did.
    async fn run(&mut self) -> Next {
        let status = match tries::run(self).await {
            Ended::Done(next) => return next,
            Ended::Broken => return Next::Close,
            Ended::Answer { status, no_backend } => {
                if no_backend {
                    let mut m = self.ctx.metrics.borrow_mut();
                    m.record_no_backend(self.listener.id);
                }
                status
            }
        };
        let keep = self.plan.keep_alive && self.body.done() && !self.client_must_close;
        let http10 = keep && self.plan.version == Version::Http10;
        match answer(
            self.ctx,
            self.client,
            status,
            !keep,
            http10,
            AnswerFields::default(),
            self.deadline,
        )
        .await
        {
            Ok(()) if keep => Next::KeepAlive,
            _ => Next::Close,
        }
    }
}

impl Tries for Exchange<'_, '_> {
    fn target(&self) -> (&Arc<Pool>, u64, Option<usize>) {
        (&self.plan.pool, self.plan.key, self.plan.pinned)
    }

    fn outcome(&mut self) -> &mut Outcome {
        self.outcome
    }

    async fn queue_wait(&mut self, pool: &Pool, key: u64) -> Option<usize> {
        tries::queue_wait(pool, key, self.deadline).await
    }

    /// One try at backend `i`: connection, request, response.
    async fn attempt(&mut self, i: usize) -> Attempt {
        let backend = &self.plan.pool.backends[i];
        let addr = self.plan.pool.settings[i].addr;
        let t = self.plan.pool.timeouts;
        let pooled = self
            .ctx
            .http
            .upstream
            .take(addr, self.plan.sni_tag)
            .filter(|_| !self.plan.upgrade && !self.fresh_connection);
        let (mut upstream, reused) = match pooled {
            Some(s) => {
                self.outcome.connect_us = NOT_MEASURED;
                (s, true)
            }
            None => {
                let connect_timeout = Duration::from_millis(t.connect_ms.max(1));
                let t0 = Instant::now();
                let mut timer = self.deadline.timer();
                timer.as_mut().reset((t0 + connect_timeout).into());
                let tcp = match self.plan.pool.send_proxy {
                    None => crate::net::connect(addr, timer.as_mut()).await,
                    // Boxed: only send_proxy pools pay for the header's state.
                    Some(v) => {
                        let facts = self.client.proxy_facts();
                        Box::pin(connect_proxied(addr, timer.as_mut(), facts, v)).await
                    }
                };
                let connected = match (tcp, &self.plan.pool.tls) {
                    (Ok(tcp), Some(tls)) => {
                        let name = self.plan.sni.as_deref().cloned();
                        match name.or_else(|| crate::net::server_name(&backend.address)) {
                            // Boxed: only TLS pools pay for the handshake's future.
                            Some(name) => {
                                Box::pin(crate::net::tls_handshake(tls, name, tcp, timer)).await
                            }
                            None => Err(ErrorKind::InvalidInput.into()),
                        }
                    }
                    (tcp, _) => tcp.map(Conn::Plain),
                };
                self.outcome.connect_us = micros(t0.elapsed());
                match connected {
                    Ok(s) => {
                        self.ctx
                            .metrics
                            .borrow_mut()
                            .record_backend_connect(backend.slot);
                        (s, false)
                    }
                    Err(e) => {
                        if e.kind() == ErrorKind::TimedOut {
                            backend.fail_timeout();
                        } else {
                            backend.fail_connect();
                        }
                        // Nothing was sent: any request may go to the next backend.
                        return Attempt::Failed {
                            status: 502,
                            retryable: true,
                        };
                    }
                }
            }
        };
        // Registered for as long as this attempt holds it, so a drain that times out can close
        // it (crate::track).
        let _tracked = crate::track::upstream(upstream.fd(), self.client.stream.fd(), backend);
        let failed = |retryable: bool| Attempt::Failed {
            status: 502,
            retryable,
        };
        let client_timeout = Duration::from_millis(self.listener.cfg.client_idle_ms);
        let send_timeout = Duration::from_millis(t.send_ms);
        if self.plan.expect_continue && !self.body.done() && !self.sent_continue {
            self.sent_continue = true;
            self.deadline.set(client_timeout);
            let written = self
                .client
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n", self.deadline)
                .await;
            if written.is_err() {
                return Attempt::Broken;
            }
        }
        self.deadline.set(send_timeout);
        let mut sent = self.out.len() as u64;
        if write_all(&mut upstream, &self.out, self.deadline)
            .await
            .is_err()
        {
            if reused {
                return Attempt::Stale;
            }
            backend.fail_reset();
            return failed(self.replayable);
        }
        if !self.body.done() {
            let Ok(client_stream) = self.client.stream.registered() else {
                return Attempt::Broken;
            };
            let copied = copy_body(
                &self.ctx.relay,
                client_stream,
                &mut upstream,
                self.req,
                &mut self.body,
                client_timeout,
                send_timeout,
                self.deadline,
            )
            .await;
            match copied {
                Ok(n) => sent += n,
                Err(CopyError::Destination) => {
                    self.client_must_close = true;
                    return failed(false);
                }
                Err(CopyError::Source) => return Attempt::Broken,
                Err(CopyError::Framing) => {
                    self.ctx
                        .metrics
                        .borrow_mut()
                        .record_bad_request(self.listener.id);
                    self.outcome.status = 400;
                    refuse_and_close(self.ctx, self.client, 400, self.deadline).await;
                    return Attempt::Broken;
                }
            }
        }
        self.outcome.bytes_in += sent;
        let mut resp = self.ctx.http.bufs.take();
        let result = self.response(i, upstream, reused, &mut resp).await;
        self.ctx.http.bufs.give(resp);
        result
    }

    fn replayable(&self) -> bool {
        self.replayable
    }

    fn idempotent(&self) -> bool {
        self.plan.method.is_idempotent() && self.replayable
    }

    fn use_fresh_connection(&mut self) {
        self.fresh_connection = true;
    }
}

impl Exchange<'_, '_> {
    /// Reads the backend's response head and forwards the response.
    async fn response(
        &mut self,
        i: usize,
        mut upstream: Conn,
        reused: bool,
        resp: &mut Buf,
    ) -> Attempt {
        let retryable = self.idempotent();
        let ctx = self.ctx;
        let pool = &self.plan.pool;
        let backend = &pool.backends[i];
        let t = &pool.timeouts;
        let read_timeout = Duration::from_millis(t.read_ms);
        let client_timeout = Duration::from_millis(self.listener.cfg.client_idle_ms);
        let sent = Instant::now();
        self.deadline.set_from(sent, read_timeout);
        let mut forwarded_interim = false;
        let head = loop {
            if !resp.is_empty() {
                let parsed = {
                    let mut headers = ctx.http.headers.borrow_mut();
                    let method = self.plan.method;
                    parse::parse_response(resp.filled(), method, &RESPONSE_LIMITS, &mut headers)
                };
                match parsed {
                    Ok(None) => {}
                    Err(_) => {
                        return Attempt::Failed {
                            status: 502,
                            retryable: false,
                        }
                    }
                    Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                        // Interim responses (103 Early Hints, a backend's own 100) pass
                        // through to HTTP/1.1 clients; after one, no retry is possible.
                        if self.plan.version == Version::Http11 {
                            forwarded_interim = true;
                            self.deadline.set(client_timeout);
                            let interim = &resp.filled()[..h.len];
                            let written =
                                self.client.stream.write_all(interim, self.deadline).await;
                            if written.is_err() {
                                return Attempt::Broken;
                            }
                        }
                        resp.consume(h.len);
                        continue;
                    }
                    Ok(Some(h)) => break h,
                }
            }
            let stale = reused && resp.is_empty() && !forwarded_interim;
            match read_some(
                &mut upstream,
                resp.spare(MAX_RESPONSE_HEAD + 1),
                self.deadline,
            )
            .await
            {
                Ok(0) if stale => return Attempt::Stale,
                Ok(0) => {
                    // Closed without answering (or mid-head).
                    backend.fail_reset();
                    return Attempt::Failed {
                        status: 502,
                        retryable: retryable && !forwarded_interim,
                    };
                }
                Ok(n) => {
                    resp.advance(n);
                    // `timeouts.read` runs between two reads from the backend.
                    self.deadline.set(read_timeout);
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => {
                    backend.fail_timeout();
                    return Attempt::Failed {
                        status: 504,
                        retryable: false,
                    };
                }
                Err(_) if stale => return Attempt::Stale,
                Err(_) => {
                    backend.fail_reset();
                    return Attempt::Failed {
                        status: 502,
                        retryable: retryable && !forwarded_interim,
                    };
                }
            }
        };
        let first_byte = Instant::now();
        let ttfb = first_byte.saturating_duration_since(sent).as_nanos() as u64;
        self.outcome.ttfb_us = (ttfb / 1000).min(u32::MAX as u64 - 1) as u32;
        backend.observe_latency_at(ttfb, crate::balance::ns_at(first_byte));
        if matches!(head.status, 502..=504) && retryable && !forwarded_interim {
            backend.fail_5xx();
            return Attempt::Failed {
                status: head.status,
                retryable: true,
            };
        }
        if head.status >= 500 {
            backend.fail_5xx();
        } else {
            backend.record_success();
        }
        self.outcome.status = head.status;
        if head.status == 101 {
            if self.plan.upgrade {
                return self.tunnel(upstream, resp).await;
            }
            // Switching protocols nobody asked for: the connection can carry nothing more.
            return Attempt::Failed {
                status: 502,
                retryable: false,
            };
        }
        let mut left = BodyLeft::new(head.body);
        let close_after = !self.plan.keep_alive || matches!(left, BodyLeft::UntilClose);
        self.out.clear();
        {
            let set_cookies =
                proxy::set_cookies(pool, i, self.plan.pinned, self.plan.group.as_deref());
            let headers = ctx.http.headers.borrow();
            let rules = response_rules(self.listener, self.plan.route);
            rewrite::response_head(
                &mut self.out,
                resp.filled(),
                &headers,
                ClientConnection {
                    close: close_after,
                    http10_keep_alive: !close_after && self.plan.version == Version::Http10,
                },
                &set_cookies,
                rules,
            );
        }
        resp.consume(head.len);
        let Ok(k) = left.take(resp.filled()) else {
            return Attempt::Failed {
                status: 502,
                retryable: false,
            };
        };
        self.out.extend_from_slice(&resp.filled()[..k]);
        resp.consume(k);
        self.deadline.set(client_timeout);
        let written = if close_after && left.done() {
            self.client
                .stream
                .write_last(&self.out, self.deadline)
                .await
        } else {
            self.client.stream.write_all(&self.out, self.deadline).await
        };
        if written.is_err() {
            return Attempt::Broken;
        }
        self.outcome.bytes_out += self.out.len() as u64;
        let mut moved = 0;
        if !left.done() {
            let Ok(client_stream) = self.client.stream.registered() else {
                return Attempt::Broken;
            };
            let copied = copy_body(
                &ctx.relay,
                &mut upstream,
                client_stream,
                resp,
                &mut left,
                read_timeout,
                client_timeout,
                self.deadline,
            )
            .await;
            match copied {
                Ok(n) => moved += n,
                Err(_) => return Attempt::Broken,
            }
        }
        self.outcome.bytes_out += moved;
        let reusable = !head.conn_close
            && !matches!(left, BodyLeft::UntilClose)
            && resp.is_empty()
            && (head.version == Version::Http11 || head.conn_keep_alive);
        if reusable {
            let idle = Duration::from_millis(t.idle_ms);
            ctx.http.upstream.put(
                pool.settings[i].addr,
                self.plan.sni_tag,
                upstream,
                pool.keepalive,
                idle,
            );
        }
        Attempt::Done(if close_after {
            Next::Close
        } else {
            Next::KeepAlive
        })
    }

    /// After a 101: the head goes to the client, then bytes flow both ways until both close.
    async fn tunnel(&mut self, mut upstream: Conn, resp: &mut Buf) -> Attempt {
        let idle = Duration::from_millis(self.listener.cfg.client_idle_ms);
        self.deadline.set(idle);
        // The 101 head is forwarded as the backend wrote it (Upgrade and Connection included),
        // with whatever the backend sent after it.
        let written = self
            .client
            .stream
            .write_all(resp.filled(), self.deadline)
            .await;
        if written.is_err() {
            return Attempt::Broken;
        }
        resp.clear();
        if !self.req.is_empty() {
            if write_all(&mut upstream, self.req.filled(), self.deadline)
                .await
                .is_err()
            {
                return Attempt::Broken;
            }
            self.req.clear();
        }
        let Ok(client_stream) = self.client.stream.registered() else {
            return Attempt::Broken;
        };
        let relay = &self.ctx.relay;
        let timer = self.deadline.timer();
        let _ = crate::net::relay::relay(relay, client_stream, &mut upstream, idle, timer).await;
        Attempt::Done(Next::Close)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::pool_config;
    use crate::config::ListenerConfig;
    use crate::config::{Algorithm, Protocol};
    use crate::tables::Shared;
    use std::collections::HashMap;

    #[test]
    fn a_head_is_parsed_again_only_when_an_empty_line_may_have_arrived() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut ends = Vec::new();
        for n in 1..=head.len() {
            // Fed one byte at a time: the previous n - 1 bytes were scanned already.
            if may_end_head(&head[..n], n - 1) {
                ends.push(n);
            }
        }
        assert_eq!(
            ends,
            vec![1, head.len()],
            "parsed at the first byte and at the end only"
        );
        assert!(
            may_end_head(b"GET / HTTP/1.1\n\n", 15),
            "bare LF heads reach the parser"
        );
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: x\r\n", 20));
    }

    /// Idle RSS per client connection is a target (<= 4 KB): the task holds this future, and
    /// a connection waiting for its next request (or the rest of a head) holds nothing else
    /// but its socket.
    #[test]
    fn per_connection_future_stays_small() {
        let listener = ListenerConfig {
            name: "web".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            protocol: Protocol::Http,
            pool: "app".into(),
            client_idle_ms: 1,
            header_read_ms: 1,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            rate_limit: None,
            routes: vec![],
            tls: None,
            udp: None,
            http2: None,
            proxy_protocol: None,
            trusted_proxies: vec![],
            compression: None,
        };
        let pool = Arc::new(Pool::with_fresh_states(&pool_config(
            "app",
            Algorithm::RoundRobin,
            &[1],
        )));
        let pools = HashMap::from([("app".to_string(), pool.clone())]);
        let entry = ListenerEntry {
            http: Some(HttpListener::build(&listener, &pools, &[], None).unwrap()),
            cfg: listener,
            pool,
            id: 0,
            tls: None,
            sni: None,
            udp: None,
            proxy: None,
            closing: Default::default(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ctx = WorkerCtx::new(Arc::new(Shared::new(0, None).unwrap()));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stream = TcpStream::connect(addr).await.unwrap().into_std().unwrap();
            let entry = Arc::new(entry);
            let fut = serve(&ctx, ClientSocket::new(stream), None, addr, &entry);
            let size = std::mem::size_of_val(&fut);
            // 2304 before per-request counting and the access log's fields (issue 5): +184;
            // the client's TLS session and a TLS pool's server name and its tag (issue 12): +24;
            // the request's client as X-Forwarded-For names it (trusted_proxies, issue 15): +24.
            assert!(size <= 2544, "serve future: {size} bytes");
        });
    }
}
