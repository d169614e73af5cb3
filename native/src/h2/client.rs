//! HTTP/2 to the backends: multiplexed connections per backend per worker, and one request's
//! exchange over them.
//!
//! A worker keeps, per backend address (and TLS tag), the connections it opened; a request
//! takes the first whose open streams are below the backend's SETTINGS_MAX_CONCURRENT_STREAMS
//! and opens a new connection when all are full. Each connection has a driver task that pings
//! it while idle (a backend that stops answering PINGs is dropped before a request finds it
//! dead) and closes it after the pool's `timeouts.idle` without a stream. A backend's GOAWAY
//! retires the connection; streams it never started (REFUSED_STREAM, or above the GOAWAY's
//! last stream id) are retried like a stale HTTP/1 connection.

use super::io::H2Io;
use super::{recv_chunk, send_all, CONNECTION_WINDOW, STREAM_WINDOW};
use crate::metrics::H2Event;
use crate::net::Conn;
use crate::proxy::exchange::{
    connect_backend, connect_failed, RequestBody, ResponseSink, UpstreamRequest,
};
use crate::proxy::outcome::micros;
use crate::proxy::{Attempt, Next, Outcome};
use crate::worker::WorkerCtx;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, Reason, RecvStream, SendStream};
use http::Request;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often an idle backend connection is pinged, and how long a PONG may take.
const PING_EVERY: Duration = Duration::from_secs(10);
const PONG_WITHIN: Duration = Duration::from_secs(5);

/// One HTTP/2 connection to a backend.
struct Backend2 {
    send: SendRequest<Bytes>,
    /// Streams this worker has open on it.
    open: Rc<Cell<usize>>,
    /// The driver saw the connection end (closed, GOAWAY, or no PONG).
    closed: Rc<Cell<bool>>,
}

/// A worker's HTTP/2 connections to backends.
#[derive(Default)]
pub struct H2Upstreams {
    conns: RefCell<HashMap<(SocketAddr, u64), Vec<Backend2>>>,
    /// Connections being opened, by backend: requests that found every open connection full
    /// wait for one of these (up to `WAITERS_PER_CONNECT` each) instead of opening another.
    opening: RefCell<HashMap<(SocketAddr, u64), Rc<Opening>>>,
}

/// Streams that may wait for one connection being opened: SETTINGS_MAX_CONCURRENT_STREAMS is
/// not known before it is, and 100 is what servers commonly allow.
const WAITERS_PER_CONNECT: usize = 99;

struct Opening {
    done: tokio::sync::Notify,
    waiters: Cell<usize>,
}

/// Marks a connection being opened until dropped (connected or failed); wakes its waiters.
pub(crate) struct OpeningGuard<'a> {
    upstreams: &'a H2Upstreams,
    key: (SocketAddr, u64),
    opening: Rc<Opening>,
}

impl Drop for OpeningGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.upstreams.opening.borrow_mut();
        if map
            .get(&self.key)
            .is_some_and(|o| Rc::ptr_eq(o, &self.opening))
        {
            map.remove(&self.key);
        }
        self.opening.done.notify_waiters();
    }
}

/// A stream slot on a connection, given back when the exchange ends.
struct Slot(Rc<Cell<usize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl H2Upstreams {
    /// A connection to `addr` with a free stream, if one is open.
    fn take(&self, addr: SocketAddr, tag: u64) -> Option<(SendRequest<Bytes>, Slot)> {
        let mut conns = self.conns.borrow_mut();
        let list = conns.get_mut(&(addr, tag))?;
        list.retain(|c| !c.closed.get());
        let c = list
            .iter()
            .find(|c| c.open.get() < c.send.current_max_send_streams().max(1))?;
        c.open.set(c.open.get() + 1);
        Some((c.send.clone(), Slot(c.open.clone())))
    }

    /// A connection with a free stream; when there is none but one is being opened with room
    /// for another waiter, waits for it first.
    async fn take_or_wait(&self, addr: SocketAddr, tag: u64) -> Option<(SendRequest<Bytes>, Slot)> {
        if let Some(s) = self.take(addr, tag) {
            return Some(s);
        }
        let opening = self.opening.borrow().get(&(addr, tag)).cloned()?;
        if opening.waiters.get() >= WAITERS_PER_CONNECT {
            return None;
        }
        opening.waiters.set(opening.waiters.get() + 1);
        opening.done.notified().await;
        self.take(addr, tag)
    }

    /// Marks a connection to `addr` as being opened, for as long as the guard lives.
    pub(crate) fn opening(&self, addr: SocketAddr, tag: u64) -> OpeningGuard<'_> {
        let opening = Rc::new(Opening {
            done: tokio::sync::Notify::new(),
            waiters: Cell::new(0),
        });
        self.opening
            .borrow_mut()
            .insert((addr, tag), opening.clone());
        OpeningGuard {
            upstreams: self,
            key: (addr, tag),
            opening,
        }
    }

    fn add(
        &self,
        addr: SocketAddr,
        tag: u64,
        send: SendRequest<Bytes>,
        closed: Rc<Cell<bool>>,
    ) -> Slot {
        let open = Rc::new(Cell::new(1));
        self.conns
            .borrow_mut()
            .entry((addr, tag))
            .or_default()
            .push(Backend2 {
                send,
                open: open.clone(),
                closed,
            });
        Slot(open)
    }

    /// Retires every connection to `addr` (its backend was drained or removed): no new stream
    /// goes on them, and each closes once its streams are done.
    pub fn retire(&self, addr: SocketAddr) {
        self.conns.borrow_mut().retain(|(a, _), list| {
            if *a == addr {
                for c in list.iter() {
                    c.closed.set(true);
                }
            }
            *a != addr
        });
    }

    /// Forgets the connections that ended.
    pub fn sweep(&self) {
        self.conns.borrow_mut().retain(|_, list| {
            list.retain(|c| !c.closed.get());
            !list.is_empty()
        });
    }
}

/// Opens an HTTP/2 connection to backend `i` and starts its driver.
async fn connect(
    ctx: &WorkerCtx,
    req: &UpstreamRequest<'_>,
    outcome: &mut Outcome,
) -> Result<(SendRequest<Bytes>, Slot), Attempt> {
    let pool = req.pool;
    let i = req.backend;
    let backend = &pool.backends[i];
    let addr = pool.settings[i].addr;
    let t0 = Instant::now();
    let mut timer = pin!(tokio::time::sleep(Duration::from_millis(
        pool.timeouts.connect_ms.max(1)
    )));
    let conn = connect_backend(req, timer.as_mut()).await;
    let conn = conn.and_then(|c| match &c {
        // A TLS backend that did not agree to h2 would read our preface as garbage.
        Conn::Tls(s) if s.get_ref().1.alpn_protocol() != Some(b"h2") => {
            Err(std::io::Error::other("backend did not negotiate h2"))
        }
        _ => Ok(c),
    });
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            outcome.connect_us = micros(t0.elapsed());
            return Err(connect_failed(backend, &e));
        }
    };
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(256 * 1024)
        .enable_push(false);
    let handshake = builder.handshake::<_, Bytes>(H2Io::new(conn, Vec::new(), None));
    let handshake = tokio::time::timeout_at(
        (t0 + Duration::from_millis(pool.timeouts.connect_ms.max(1))).into(),
        handshake,
    )
    .await;
    outcome.connect_us = micros(t0.elapsed());
    let (send, connection) = match handshake {
        Ok(Ok(pair)) => pair,
        _ => {
            backend.fail_connect();
            return Err(Attempt::Failed {
                status: 502,
                retryable: true,
            });
        }
    };
    ctx.metrics
        .borrow_mut()
        .record_backend_connect(backend.slot);
    let closed = Rc::new(Cell::new(false));
    let idle = Duration::from_millis(pool.timeouts.idle_ms.max(1));
    let slot = ctx
        .h2
        .upstreams
        .add(addr, req.sni_tag, send.clone(), closed.clone());
    tokio::task::spawn_local(drive(connection, slot.0.clone(), closed, idle));
    Ok((send, slot))
}

/// Runs a backend connection: its I/O, PINGs while idle, and the close after `idle` without
/// streams.
async fn drive(
    mut connection: h2::client::Connection<H2Io, Bytes>,
    open: Rc<Cell<usize>>,
    closed: Rc<Cell<bool>>,
    idle: Duration,
) {
    let mut ping = connection.ping_pong();
    let mut idle_since = Instant::now();
    loop {
        let tick = PING_EVERY.min(idle);
        tokio::select! {
            _ = &mut connection => break,
            _ = tokio::time::sleep(tick) => {}
        }
        if open.get() > 0 {
            idle_since = Instant::now();
            continue;
        }
        if idle_since.elapsed() >= idle {
            break;
        }
        let Some(p) = ping.as_mut() else { continue };
        let pong = tokio::select! {
            _ = &mut connection => break,
            r = tokio::time::timeout(PONG_WITHIN, p.ping(Ping::opaque())) => r,
        };
        if !matches!(pong, Ok(Ok(_))) {
            break;
        }
    }
    closed.set(true);
}

/// Why a stream failed before the backend answered: not started (retry it like a stale
/// connection), or failed at the backend.
fn unstarted(e: &h2::Error) -> bool {
    e.reason() == Some(Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// One request to backend `req.backend` over HTTP/2, its response to `sink`.
pub(crate) async fn exchange(
    ctx: &WorkerCtx,
    req: &UpstreamRequest<'_>,
    body: &mut impl RequestBody,
    sink: &mut impl ResponseSink,
    outcome: &mut Outcome,
) -> Attempt {
    let pool = req.pool;
    let backend = &pool.backends[req.backend];
    let addr = pool.settings[req.backend].addr;
    let pooled = match req.fresh {
        true => None,
        false => ctx.h2.upstreams.take_or_wait(addr, req.sni_tag).await,
    };
    let reused = pooled.is_some();
    let (send, _slot) = match pooled {
        Some(s) => s,
        None => {
            // Requests arriving meanwhile wait for this connection rather than open their own
            // (a burst of streams would otherwise open a connection each).
            let _opening = ctx.h2.upstreams.opening(addr, req.sni_tag);
            match connect(ctx, req, outcome).await {
                Ok(s) => s,
                Err(a) => return a,
            }
        }
    };
    if reused {
        outcome.connect_us = crate::proxy::outcome::NOT_MEASURED;
    }
    let mut head = Request::new(());
    *head.method_mut() = req.parts.method.clone();
    *head.uri_mut() = upstream_uri(req);
    *head.headers_mut() = req.parts.headers.clone();
    let no_body = body.is_empty();
    let mut send = match send.ready().await {
        Ok(s) => s,
        Err(_) => return stale_or_failed(reused),
    };
    let (response, upload) = match send.send_request(head, no_body) {
        Ok(pair) => pair,
        Err(_) => return stale_or_failed(reused),
    };
    let sent = Instant::now();
    let read_timeout = Duration::from_millis(pool.timeouts.read_ms.max(1));
    let wait_until = match req.deadline {
        Some(d) => d.min(sent + read_timeout),
        None => sent + read_timeout,
    };
    let stall = Duration::from_millis(req.client_idle_ms.max(1));
    // The request body goes up while the response is awaited and read: gRPC streams both
    // ways at once. Returning early drops both halves of the backend's stream, which makes
    // the h2 crate reset it (CANCEL): a call the client gave up on ends at the backend too.
    let replayable = body.replayable();
    let uploaded = Cell::new(0u64);
    let upload_fut = upload_body(body, upload, no_body, stall, &uploaded);
    let mut upload_fut = pin!(upload_fut);
    let mut upload_done = no_body;
    let mut response = pin!(response);
    let head = loop {
        tokio::select! {
            r = &mut response => break r,
            ok = &mut upload_fut, if !upload_done => {
                upload_done = true;
                if !ok {
                    // The client went away or reset mid-body.
                    return Attempt::Broken;
                }
            }
            _ = sink.cancelled() => return Attempt::Broken,
            _ = tokio::time::sleep_until(wait_until.into()) => {
                backend.fail_timeout();
                return Attempt::Failed { status: 504, retryable: false };
            }
        }
    };
    let head = match head {
        Ok(h) => h,
        Err(e) if unstarted(&e) && replayable => return Attempt::Stale,
        Err(e) if e.is_reset() && e.is_remote() => {
            // The backend reset the stream before answering (a gRPC server cancelling the
            // call): the client's stream is reset the same way, not answered 502.
            count_reset(ctx, req.listener);
            sink.reset(e.reason().unwrap_or(Reason::INTERNAL_ERROR));
            return Attempt::Broken;
        }
        Err(_) => {
            backend.fail_reset();
            return Attempt::Failed {
                status: 502,
                retryable: false,
            };
        }
    };
    let ttfb = sent.elapsed();
    outcome.ttfb_us = micros(ttfb);
    backend.observe_latency_at(
        ttfb.as_nanos() as u64,
        crate::balance::ns_at(Instant::now()),
    );
    let status = head.status().as_u16();
    if status >= 500 {
        backend.fail_5xx();
    } else {
        backend.record_success();
    }
    outcome.status = status;
    let (mut parts, mut download) = head.into_parts();
    super::headers::strip_hop_by_hop(&mut parts.headers);
    crate::proxy::exchange::response_fields(&mut parts.headers, req);
    let end = download.is_end_stream();
    if sink.head(parts, end).await.is_err() {
        return Attempt::Broken;
    }
    let relayed = match end {
        true => Ok(()),
        false => {
            relay_response(
                ctx,
                req,
                &mut download,
                sink,
                &mut upload_fut,
                upload_done,
                outcome,
            )
            .await
        }
    };
    outcome.bytes_in += uploaded.get();
    match relayed {
        Ok(()) => Attempt::Done(Next::KeepAlive),
        Err(_) => Attempt::Broken,
    }
}

/// The URI for the backend: the client's path, with the scheme the pool speaks.
fn upstream_uri(req: &UpstreamRequest<'_>) -> http::Uri {
    let uri = &req.parts.uri;
    let scheme = if req.pool.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| req.pool.settings[req.backend].addr.to_string());
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(if pq.is_empty() { "/" } else { pq })
        .build()
        .unwrap_or_else(|_| uri.clone())
}

fn stale_or_failed(reused: bool) -> Attempt {
    if reused {
        Attempt::Stale
    } else {
        Attempt::Failed {
            status: 502,
            retryable: true,
        }
    }
}

/// Counts a stream a backend reset (the client's resets are counted from their frames).
fn count_reset(ctx: &WorkerCtx, listener: u16) {
    ctx.metrics
        .borrow_mut()
        .record_h2(listener, H2Event::BackendReset, 1);
}

/// Sends the request body (and trailers) up; false when the client went away or the
/// backend stopped taking it.
async fn upload_body(
    body: &mut impl RequestBody,
    mut upload: SendStream<Bytes>,
    no_body: bool,
    stall: Duration,
    uploaded: &Cell<u64>,
) -> bool {
    if no_body {
        return true;
    }
    loop {
        match body.data().await {
            Ok(Some(chunk)) => {
                uploaded.set(uploaded.get() + chunk.len() as u64);
                if send_all(&mut upload, chunk, false, stall).await.is_err() {
                    return false;
                }
            }
            Ok(None) => break,
            Err(()) => return false,
        }
    }
    match body.trailers().await {
        Ok(Some(t)) => upload.send_trailers(t).is_ok(),
        Ok(None) => upload.send_data(Bytes::new(), true).is_ok(),
        Err(()) => false,
    }
}

/// Relays the response body and trailers to the client while the upload may still run.
/// Err: the exchange broke, with the reason to reset the backend's stream with.
#[allow(clippy::too_many_arguments)]
async fn relay_response(
    ctx: &WorkerCtx,
    req: &UpstreamRequest<'_>,
    download: &mut RecvStream,
    sink: &mut impl ResponseSink,
    upload: &mut std::pin::Pin<&mut impl std::future::Future<Output = bool>>,
    mut upload_done: bool,
    outcome: &mut Outcome,
) -> Result<(), Reason> {
    // A gRPC call's deadline still holds once the backend answered (a stream that outlives
    // it ends with DEADLINE_EXCEEDED, as the client's own library would end it).
    let deadline = req
        .deadline
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
    loop {
        let next = tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()), if req.deadline.is_some() => {
                let _ = sink.trailers(super::grpc::status_trailers(4, "deadline exceeded")).await;
                return Err(Reason::CANCEL);
            }
            d = recv_chunk(download) => d,
            ok = upload.as_mut(), if !upload_done => {
                upload_done = true;
                if !ok {
                    return Err(Reason::CANCEL);
                }
                continue;
            }
            _ = sink.cancelled() => return Err(Reason::CANCEL),
        };
        match next {
            Ok(Some(chunk)) => {
                let end = download.is_end_stream();
                outcome.bytes_out += chunk.len() as u64;
                let n = chunk.len();
                if sink.data(chunk, end).await.is_err() {
                    return Err(Reason::CANCEL);
                }
                let _ = download.flow_control().release_capacity(n);
                if end {
                    return Ok(());
                }
            }
            Ok(None) => break,
            Err(e) => {
                // The backend reset its stream (a cancelled gRPC call): so does the client's.
                let reason = e.reason().unwrap_or(Reason::INTERNAL_ERROR);
                if e.is_reset() && e.is_remote() {
                    count_reset(ctx, req.listener);
                }
                sink.reset(reason);
                return Err(reason);
            }
        }
    }
    match download.trailers().await {
        Ok(Some(t)) => {
            if let Some(log) = outcome.log.as_deref_mut() {
                log.grpc_status = super::grpc::status_of(&t);
            }
            sink.trailers(t).await.map_err(|_| Reason::CANCEL)
        }
        Ok(None) => sink
            .data(Bytes::new(), true)
            .await
            .map_err(|_| Reason::CANCEL),
        Err(e) => {
            let reason = e.reason().unwrap_or(Reason::INTERNAL_ERROR);
            sink.reset(reason);
            Err(reason)
        }
    }
}
