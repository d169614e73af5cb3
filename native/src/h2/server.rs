//! The HTTP/2 client session: one task per connection, its streams polled together, each
//! stream handed to the request core (routing, tries, metrics, access log) on its own, so a
//! single long connection is balanced stream by stream.
//!
//! Limits (each ends a misbehaving connection with GOAWAY, never the service):
//! `max_concurrent_streams` and the header-list size from `[listeners.http2]`; the h2 crate's
//! guards against Rapid Reset before accept (`max_pending_accept_reset_streams`),
//! CONTINUATION floods (header-list size across CONTINUATION frames) and locally caused resets
//! (MadeYouReset: `max_local_error_reset_streams`); `io::FrameMeter` against SETTINGS, PING,
//! WINDOW_UPDATE, PRIORITY, empty DATA and RST_STREAM floods; a bounded send buffer per stream
//! and `client_idle` for a reader that leaves its window at zero.

use super::grpc;
use super::headers::{content_length, forward_request, has_looped, request_client, H2View};
use super::io::{FrameMeter, H2Io};
use super::{recv_chunk, send_all, CONNECTION_WINDOW, SEND_BUFFER, STREAM_WINDOW};
use crate::balance::Pool;
use crate::config::{Http2Config, HttpVersion};
use crate::h1::io::Deadline;
use crate::metrics::{H2Event, NO_ROUTE};
use crate::net::Conn;
use crate::proxy::compress::{CompressingSink, Compression, Encoding};
use crate::proxy::exchange::{ProxyFacts, RequestBody, ResponseSink, UpstreamRequest};
use crate::proxy::header_rules::HeaderRules;
use crate::proxy::outcome::ClientInfo;
use crate::proxy::route::{RequestView, Target};
use crate::proxy::split::GroupCookie;
use crate::proxy::tries::{self, Tries};
use crate::proxy::{self, Attempt, Ended, Outcome, RequestLog};
use crate::tables::ListenerEntry;
use crate::tls::SessionInfo;
use crate::worker::WorkerCtx;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{request, response, HeaderMap, HeaderValue, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Request bodies up to this size are read whole before a backend is chosen, so a failed try
/// can be replayed to another backend (as for HTTP/1).
const BUFFERED_BODY_MAX: u64 = 64 * 1024;
/// How long a flooding connection gets to take its GOAWAY before it is closed.
const GOAWAY_LINGER: Duration = Duration::from_secs(1);

/// Serves one HTTP/2 client connection to its end. `preread`: bytes the HTTP/1 code already
/// read (the h2c preface).
pub async fn serve(
    ctx: &WorkerCtx,
    conn: Conn,
    preread: Vec<u8>,
    tls: Option<Box<SessionInfo>>,
    peer: SocketAddr,
    accepted: &Arc<ListenerEntry>,
) {
    let settings = accepted.cfg.http2.unwrap_or_default();
    let local = conn.tcp().local_addr().ok();
    let meter = Rc::new(FrameMeter::server());
    let io = H2Io::new(conn, preread, Some(meter.clone()));
    let handshake = builder(&settings).handshake::<_, Bytes>(io);
    let limit = Duration::from_millis(match accepted.cfg.header_read_ms {
        0 => 60_000,
        ms => ms,
    });
    let mut connection = match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(c)) => c,
        _ => return,
    };
    let id = accepted.id;
    let _open = Counted::new(
        ctx,
        id,
        H2Event::ConnectionOpened,
        H2Event::ConnectionClosed,
    );
    let client = ClientInfo {
        peer,
        tls: tls.as_deref(),
    };
    let mut streams = FuturesUnordered::new();
    let idle = Duration::from_millis(accepted.cfg.client_idle_ms.max(1));
    let mut idle_timer = pin!(tokio::time::sleep(idle));
    let mut going_away = false;
    let mut generation = ctx.shared.tables.load().generation;
    // A reload took the listener away (the entry held may be an older one than it closed).
    let mut removed = false;
    let mut listener = current(ctx, accepted);
    loop {
        let resets = meter.resets.replace(0);
        if resets > 0 {
            let mut m = ctx.metrics.borrow_mut();
            m.record_h2(id, H2Event::ClientReset, resets);
        }
        let closing = ctx.stopping.get() || removed || listener.closing.load(Relaxed);
        if closing && !going_away {
            going_away = true;
            connection.graceful_shutdown();
            ctx.metrics
                .borrow_mut()
                .record_h2(id, H2Event::GracefulGoaway, 1);
        }
        tokio::select! {
            _ = poll_fn(|cx| meter.poll_tripped(cx)) => {
                connection.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                ctx.metrics.borrow_mut().record_h2(id, H2Event::FloodGoaway, 1);
                streams.clear();
                let _ = tokio::time::timeout(GOAWAY_LINGER, poll_fn(|cx| connection.poll_closed(cx))).await;
                break;
            }
            accepted_stream = connection.accept() => match accepted_stream {
                Some(Ok((req, respond))) => {
                    // As HTTP/1 does per request: the tables are looked up again only after a
                    // reload published new ones.
                    let now = ctx.shared.tables.load().generation;
                    if now != generation {
                        generation = now;
                        listener = current(ctx, accepted);
                    }
                    streams.push(stream(ctx, listener.clone(), client, local, req, respond));
                }
                // A protocol error (the crate sent GOAWAY) or the connection ended.
                Some(Err(_)) | None => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    idle_timer.as_mut().reset((Instant::now() + idle).into());
                }
            }
            _ = &mut idle_timer, if streams.is_empty() && !going_away => {
                // Keep-alive timeout: a graceful close, as for an idle HTTP/1 connection.
                going_away = true;
                connection.graceful_shutdown();
            }
            _ = ctx.h2.goaway.notified(), if !going_away => {
                let tables = ctx.shared.tables.load();
                generation = tables.generation;
                match tables.listeners.get(&accepted.cfg.name) {
                    Some(e) => listener = e.clone(),
                    None => removed = true,
                }
            }
        }
    }
    // A stream whose last frame went out may still have its counting and logging to do;
    // anything else left is cut off with the connection.
    let finishing = async { while streams.next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_millis(50), finishing).await;
    drop(streams);
    let resets = meter.resets.replace(0);
    ctx.metrics
        .borrow_mut()
        .record_h2(id, H2Event::ClientReset, resets);
}

fn builder(settings: &Http2Config) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        .max_send_buffer_size(SEND_BUFFER)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(64))
        .max_concurrent_reset_streams(64);
    b
}

/// The listener's tables as they are now (a reload applies to the next stream).
fn current(ctx: &WorkerCtx, accepted: &Arc<ListenerEntry>) -> Arc<ListenerEntry> {
    let tables = ctx.shared.tables.load();
    match tables.listeners.get(&accepted.cfg.name) {
        Some(e) => e.clone(),
        None => accepted.clone(),
    }
}

/// One stream: proxied, counted and logged.
async fn stream(
    ctx: &WorkerCtx,
    listener: Arc<ListenerEntry>,
    client: ClientInfo<'_>,
    local: Option<SocketAddr>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let _open = Counted::new(
        ctx,
        listener.id,
        H2Event::StreamOpened,
        H2Event::StreamClosed,
    );
    let mut outcome = Outcome::default();
    let logging = ctx.shared.access_log.load().is_some();
    let hop = client.peer;
    let client = match listener.http.as_ref() {
        Some(http) if http.trusted.is_some() => ClientInfo {
            peer: request_client(http, hop, req.headers()),
            ..client
        },
        _ => client,
    };
    let hops = Hops {
        from: hop,
        to: local,
    };
    handle(
        ctx,
        &listener,
        client,
        hops,
        req,
        respond,
        &mut outcome,
        logging,
    )
    .await;
    let took = started.elapsed().as_micros() as u64;
    proxy::finish(ctx, &listener, client, &outcome, took);
}

/// Counts an open stream or connection, and its end however it ends (a dropped future too).
struct Counted<'a> {
    ctx: &'a WorkerCtx,
    listener: u16,
    closed: H2Event,
}

impl<'a> Counted<'a> {
    fn new(ctx: &'a WorkerCtx, listener: u16, opened: H2Event, closed: H2Event) -> Self {
        ctx.metrics.borrow_mut().record_h2(listener, opened, 1);
        Counted {
            ctx,
            listener,
            closed,
        }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.ctx.metrics.try_borrow_mut() {
            m.record_h2(self.listener, self.closed, 1);
        }
    }
}

/// The connection a stream came on: the address that connected, and the one it reached.
#[derive(Clone, Copy)]
struct Hops {
    from: SocketAddr,
    to: Option<SocketAddr>,
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    ctx: &WorkerCtx,
    listener: &ListenerEntry,
    client: ClientInfo<'_>,
    hops: Hops,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    outcome: &mut Outcome,
    logging: bool,
) {
    let Some(http) = listener.http.as_ref() else {
        return;
    };
    let started = Instant::now();
    let (mut parts, recv) = req.into_parts();
    let grpc = grpc::is_grpc(&parts.headers);
    let stall = Duration::from_millis(listener.cfg.client_idle_ms.max(1));
    let mut sink = H2Sink::new(respond, stall);
    if logging {
        outcome.log = Some(Box::new(request_log(&parts)));
    }
    if let Some(limiter) = &http.rate_limit {
        if let Err(after) = limiter.check(client.peer.ip(), crate::balance::now_ns()) {
            ctx.metrics.borrow_mut().record_rate_limited(listener.id);
            own_answer(&mut sink, outcome, 429, grpc, Answer::RetryAfter(after)).await;
            return;
        }
    }
    if has_looped(&parts.headers, &ctx.shared.via_token) {
        own_answer(&mut sink, outcome, 508, grpc, Answer::Plain).await;
        return;
    }
    let view = H2View {
        parts: &parts,
        peer: client.peer,
    };
    let (route, pool, group) = match http.routes.select(&view) {
        Some((i, Target::Pool(pool, group))) => (Some(i), pool.clone(), group),
        Some((_, Target::Redirect(r))) => {
            let mut location = Vec::new();
            crate::h1::rewrite::redirect_location(&mut location, r, &view, client.tls.is_some());
            own_answer(&mut sink, outcome, r.code, grpc, Answer::Location(location)).await;
            return;
        }
        None => (None, listener.pool.clone(), None),
    };
    let key = proxy::request_key(&pool.hash_key, &view);
    let pinned = proxy::pinned_backend(&pool, &view);
    let sni = pool
        .tls
        .as_ref()
        .and_then(|t| t.sni.clone().or_else(|| view.host().and_then(host_name)));
    let proxy = pool.send_proxy.map(|_| ProxyFacts {
        client: client.peer,
        local: hops
            .to
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        tls: client.tls,
    });
    let sni_tag = match (&pool.tls, &sni) {
        (Some(t), Some(n)) => t.id ^ crate::balance::hash_key(n.to_str().as_bytes()),
        (Some(t), None) => t.id,
        (None, _) => 0,
    } ^ proxy.map_or(0, |f| f.tag());
    outcome.pool = pool.id;
    outcome.route = route.map_or(NO_ROUTE, |i| http.routes.id(i));
    let to_h2 = pool.http_version == HttpVersion::Http2;
    forward_request(
        &mut parts.headers,
        hops.from, // X-Forwarded-For gets the hop that connected
        client.tls,
        &ctx.shared.via_token,
        to_h2,
    );
    let rewrite = route.and_then(|i| http.routes.rewrite(i));
    if let Some(r) = rewrite {
        r.apply_to_request(&mut parts);
    }
    let accept = parts.headers.get(http::header::ACCEPT_ENCODING);
    let compress = http.compression.as_ref().and_then(|c| {
        c.negotiate(accept.map(HeaderValue::as_bytes))
            .map(|e| (c, e))
    });
    if let Some(log) = outcome.log.as_deref_mut() {
        log.route = route;
        log.pool = pool.name.clone();
        if log.request_id.is_empty() {
            if let Some(v) = parts.headers.get("x-request-id") {
                log.request_id = v.as_bytes().to_vec();
            }
        }
    }
    let mut body = H2Body::new(recv, content_length(&parts.headers));
    if body.prefetch(stall).await.is_err() {
        return;
    }
    let timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut deadline = Deadline::new(timer);
    let mut exchange = StreamExchange {
        ctx,
        listener,
        parts: &parts,
        pool: &pool,
        key,
        pinned,
        group,
        sni: sni.as_ref(),
        sni_tag,
        proxy,
        response_rules: rewrite.and_then(|r| r.response.as_ref()),
        compress,
        grpc_deadline: grpc::timeout(&parts.headers).map(|d| started + d),
        fresh: false,
        body: &mut body,
        sink: &mut sink,
        outcome,
        deadline: &mut deadline,
    };
    let (status, no_backend) = match tries::run(&mut exchange).await {
        Ended::Done(_) | Ended::Broken => return,
        Ended::Answer { status, no_backend } => (status, no_backend),
    };
    if no_backend {
        ctx.metrics.borrow_mut().record_no_backend(listener.id);
    }
    if sink.started() {
        // The backend's head went out and then the exchange failed: end the call.
        sink.reset(Reason::INTERNAL_ERROR);
        return;
    }
    own_answer(&mut sink, outcome, status, grpc, Answer::Plain).await;
}

fn host_name(host: &[u8]) -> Option<ServerName<'static>> {
    crate::net::server_name(std::str::from_utf8(host).ok()?)
}

fn request_log(parts: &request::Parts) -> RequestLog {
    RequestLog {
        method: parts.method.as_str().as_bytes().to_vec(),
        target: parts
            .uri
            .path_and_query()
            .map_or(b"/".to_vec(), |p| p.as_str().as_bytes().to_vec()),
        request_id: parts
            .headers
            .get("x-request-id")
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        protocol: "HTTP/2",
        ..RequestLog::default()
    }
}

/// What an answer of fastlb's own carries beyond its status.
enum Answer {
    Plain,
    RetryAfter(u64),
    Location(Vec<u8>),
}

/// Answers a stream itself: a gRPC call trailers-only with its `grpc-status`, anything else
/// with the status and a one-line text body.
async fn own_answer(
    sink: &mut H2Sink,
    outcome: &mut Outcome,
    status: u16,
    grpc: bool,
    extra: Answer,
) {
    outcome.status = status;
    if grpc {
        let code = proxy::grpc_status_of(status);
        if let Some(log) = outcome.log.as_deref_mut() {
            log.grpc_status = Some(code as u32);
        }
        let message = crate::h1::rewrite::explanation(status);
        let (parts, ()) = grpc::trailers_only(code, message).into_parts();
        let _ = sink.head(parts, true).await;
        return;
    }
    let text = format!("{status} {}\n", crate::h1::rewrite::reason(status));
    let mut r = Response::new(());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    match extra {
        Answer::Plain => {}
        Answer::RetryAfter(s) => {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        Answer::Location(l) => {
            if let Ok(v) = HeaderValue::from_bytes(&l) {
                h.insert(http::header::LOCATION, v);
            }
        }
    }
    let (parts, ()) = r.into_parts();
    outcome.bytes_out += text.len() as u64;
    if sink.head(parts, false).await.is_ok() {
        let _ = sink.data(Bytes::from(text), true).await;
    }
}

/// One stream on its way to a backend: what each try needs.
struct StreamExchange<'a, 't> {
    ctx: &'a WorkerCtx,
    listener: &'a ListenerEntry,
    parts: &'a request::Parts,
    pool: &'a Arc<Pool>,
    key: u64,
    pinned: Option<usize>,
    group: Option<GroupCookie>,
    sni: Option<&'a ServerName<'static>>,
    sni_tag: u64,
    proxy: Option<ProxyFacts<'a>>,
    response_rules: Option<&'a HeaderRules>,
    compress: Option<(&'a Compression, Encoding)>,
    grpc_deadline: Option<Instant>,
    fresh: bool,
    body: &'a mut H2Body,
    sink: &'a mut H2Sink,
    outcome: &'a mut Outcome,
    deadline: &'a mut Deadline<'t>,
}

impl Tries for StreamExchange<'_, '_> {
    fn target(&self) -> (&Arc<Pool>, u64, Option<usize>) {
        (self.pool, self.key, self.pinned)
    }

    fn outcome(&mut self) -> &mut Outcome {
        self.outcome
    }

    async fn queue_wait(&mut self, pool: &Pool, key: u64) -> Option<usize> {
        tries::queue_wait(pool, key, self.deadline).await
    }

    async fn attempt(&mut self, i: usize) -> Attempt {
        let pool: &Pool = self.pool;
        let set_cookies = proxy::set_cookies(pool, i, self.pinned, self.group.as_ref());
        let req = UpstreamRequest {
            listener: self.listener.id,
            pool,
            backend: i,
            parts: self.parts,
            sni: self.sni,
            sni_tag: self.sni_tag,
            deadline: self.grpc_deadline,
            client_idle_ms: self.listener.cfg.client_idle_ms,
            fresh: self.fresh,
            set_cookies,
            proxy: self.proxy,
            response_rules: self.response_rules,
        };
        if self.body.replayable() {
            self.body.rewind();
        }
        let offer = self
            .compress
            .map(|(c, e)| (c, e, self.parts.method.clone()));
        let sink = &mut CompressingSink::new(self.sink, offer);
        match pool.http_version {
            HttpVersion::Http2 => {
                super::client::exchange(self.ctx, &req, self.body, sink, self.outcome).await
            }
            HttpVersion::Http11 => {
                crate::h1::translate::exchange(self.ctx, &req, self.body, sink, self.outcome).await
            }
        }
    }

    fn replayable(&self) -> bool {
        self.body.replayable()
    }

    fn idempotent(&self) -> bool {
        self.body.replayable()
            && matches!(
                self.parts.method,
                http::Method::GET
                    | http::Method::HEAD
                    | http::Method::PUT
                    | http::Method::DELETE
                    | http::Method::OPTIONS
                    | http::Method::TRACE
            )
    }

    fn use_fresh_connection(&mut self) {
        self.fresh = true;
    }
}

/// A client's request body on an h2 stream; small bodies read whole first (replayable).
pub struct H2Body {
    recv: RecvStream,
    buffered: Vec<Bytes>,
    next: usize,
    /// Every byte is in `buffered` (END_STREAM seen).
    complete: bool,
    length: Option<u64>,
    trailers: Option<HeaderMap>,
}

impl H2Body {
    fn new(recv: RecvStream, length: Option<u64>) -> Self {
        let complete = recv.is_end_stream();
        H2Body {
            recv,
            buffered: Vec::new(),
            next: 0,
            complete,
            length,
            trailers: None,
        }
    }

    /// Reads a body of known, small size whole, within the client's idle timeout.
    async fn prefetch(&mut self, idle: Duration) -> Result<(), ()> {
        if self.complete || self.length.is_none_or(|n| n > BUFFERED_BODY_MAX) {
            return Ok(());
        }
        let read = async {
            while let Some(chunk) = recv_chunk(&mut self.recv).await.map_err(|_| ())? {
                let _ = self.recv.flow_control().release_capacity(chunk.len());
                self.buffered.push(chunk);
            }
            self.trailers = self.recv.trailers().await.map_err(|_| ())?;
            Ok::<(), ()>(())
        };
        tokio::time::timeout(idle, read).await.map_err(|_| ())??;
        self.complete = true;
        Ok(())
    }
}

impl RequestBody for H2Body {
    async fn data(&mut self) -> Result<Option<Bytes>, ()> {
        if self.next < self.buffered.len() {
            self.next += 1;
            return Ok(Some(self.buffered[self.next - 1].clone()));
        }
        if self.complete {
            return Ok(None);
        }
        match recv_chunk(&mut self.recv).await {
            Ok(Some(chunk)) => {
                let _ = self.recv.flow_control().release_capacity(chunk.len());
                Ok(Some(chunk))
            }
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }

    async fn trailers(&mut self) -> Result<Option<HeaderMap>, ()> {
        if self.complete {
            return Ok(self.trailers.clone());
        }
        self.recv.trailers().await.map_err(|_| ())
    }

    fn is_empty(&self) -> bool {
        self.complete && self.buffered.is_empty() && self.trailers.is_none()
    }

    fn length(&self) -> Option<u64> {
        self.length
    }

    fn replayable(&self) -> bool {
        self.complete
    }

    fn rewind(&mut self) {
        self.next = 0;
    }
}

/// The response side of a client's h2 stream.
pub struct H2Sink {
    respond: SendResponse<Bytes>,
    stream: Option<SendStream<Bytes>>,
    /// A head went out (with END_STREAM or not).
    started: bool,
    stall: Duration,
}

impl H2Sink {
    fn new(respond: SendResponse<Bytes>, stall: Duration) -> Self {
        H2Sink {
            respond,
            stream: None,
            started: false,
            stall,
        }
    }
}

impl ResponseSink for H2Sink {
    async fn head(&mut self, head: response::Parts, end: bool) -> Result<(), ()> {
        self.started = true;
        let stream = self
            .respond
            .send_response(Response::from_parts(head, ()), end)
            .map_err(|_| ())?;
        if !end {
            self.stream = Some(stream);
        }
        Ok(())
    }

    async fn data(&mut self, data: Bytes, end: bool) -> Result<(), ()> {
        let stream = self.stream.as_mut().ok_or(())?;
        send_all(stream, data, end, self.stall).await
    }

    async fn trailers(&mut self, trailers: HeaderMap) -> Result<(), ()> {
        let stream = self.stream.as_mut().ok_or(())?;
        stream.send_trailers(trailers).map_err(|_| ())
    }

    async fn cancelled(&mut self) {
        let _ = poll_fn(|cx| match &mut self.stream {
            Some(s) => s.poll_reset(cx),
            None => self.respond.poll_reset(cx),
        })
        .await;
    }

    fn reset(&mut self, reason: Reason) {
        match &mut self.stream {
            Some(s) => s.send_reset(reason),
            None => self.respond.send_reset(reason),
        }
    }

    fn started(&self) -> bool {
        self.started
    }
}
