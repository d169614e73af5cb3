//! An HTTP/1 client's request as `http` parts: to an `http_version = "2"` pool, or to an
//! HTTP/1.1 pool when its response is to be compressed (proxy::compress). The head is
//! translated to parts, the body read from the client (de-chunked), and the response written
//! back as HTTP/1.1 (chunked when it has no length, with its trailers when chunked).
//!
//! The request body is read whole before the backend is tried (at most `MAX_BODY`, else 413):
//! an HTTP/1 connection is one byte stream, so the body and the response cannot move over it
//! independently the way two h2 streams can, and a body at hand can be replayed to another
//! backend.

use super::buf::{Buf, BUF_SIZE};
use super::io::Deadline;
use super::parse::{RequestHead, Version};
use super::{answer, BodyLeft, Client, Plan};
use crate::config::HttpVersion;
use crate::h2::headers::{forward_request, h1_response_head, h2_request_from_h1, Framing};
use crate::proxy::compress::CompressingSink;
use crate::proxy::exchange::{RequestBody, ResponseSink, UpstreamRequest};
use crate::proxy::tries::{self, Tries};
use crate::proxy::{Attempt, Ended, Next, Outcome};
use crate::tables::ListenerEntry;
use crate::worker::WorkerCtx;
use bytes::Bytes;
use h2::Reason;
use http::{request, response, HeaderMap};
use std::io::{ErrorKind, Write};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body an HTTP/1 client may send to an HTTP/2 pool.
const MAX_BODY: usize = 64 << 20;

/// Proxies one HTTP/1 request (head at the start of `req`) to an HTTP/2 pool.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
    ctx: &WorkerCtx,
    listener: &ListenerEntry,
    client: &mut Client,
    req: &mut Buf,
    head: &RequestHead,
    plan: Plan,
    outcome: &mut Outcome,
    deadline: &mut Deadline<'_>,
) -> Next {
    let scheme = if plan.pool.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let parts = {
        let spans = ctx.http.headers.borrow();
        h2_request_from_h1(req.filled(), head, &spans, scheme)
    };
    let Some(mut parts) = parts else {
        outcome.status = 400;
        super::refuse_and_close(ctx, client, 400, deadline).await;
        return Next::Close;
    };
    forward_request(
        &mut parts.headers,
        client.peer,
        client.tls.as_deref(),
        &ctx.shared.via_token,
        true,
    );
    if let Some(r) = super::route_rewrite(listener, plan.route) {
        r.apply_to_request(&mut parts);
    }
    req.consume(head.len);
    let idle = Duration::from_millis(listener.cfg.client_idle_ms.max(1));
    let mut left = BodyLeft::new(head.body);
    let body = match read_body(client, req, &mut left, plan.expect_continue, idle, deadline).await {
        Ok(b) => b,
        Err(status) => {
            outcome.status = status;
            if status != 0 {
                super::refuse_and_close(ctx, client, status, deadline).await;
            }
            return Next::Close;
        }
    };
    let keep_alive = plan.keep_alive;
    let version = plan.version;
    let sink_timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut sink = H1Sink {
        client,
        deadline: Deadline::new(sink_timer),
        idle,
        version,
        close: !keep_alive,
        chunked: false,
        started: false,
        broken: false,
        out: Vec::new(),
    };
    let mut exchange = H1ToH2 {
        ctx,
        listener,
        plan: &plan,
        parts: &parts,
        body,
        sink: &mut sink,
        outcome,
        deadline,
        fresh: false,
    };
    let ended = tries::run(&mut exchange).await;
    let broken = sink.broken;
    let close = sink.close;
    match ended {
        Ended::Done(_) if !broken && !close => Next::KeepAlive,
        Ended::Done(_) | Ended::Broken => Next::Close,
        Ended::Answer { status, no_backend } => {
            if no_backend {
                ctx.metrics.borrow_mut().record_no_backend(listener.id);
            }
            if sink.started {
                return Next::Close;
            }
            let http10 = keep_alive && version == Version::Http10;
            let fields = Default::default();
            match answer(ctx, client, status, !keep_alive, http10, fields, deadline).await {
                Ok(()) if keep_alive => Next::KeepAlive,
                _ => Next::Close,
            }
        }
    }
}

/// Reads the request body whole (answering `Expect: 100-continue` first). Err(status): answer
/// it and close (0: just close, the client left).
async fn read_body(
    client: &mut Client,
    req: &mut Buf,
    left: &mut BodyLeft,
    expect_continue: bool,
    idle: Duration,
    deadline: &mut Deadline<'_>,
) -> Result<Buffered, u16> {
    let mut data: Vec<u8> = Vec::new();
    let mut sent_continue = false;
    let length = match left {
        BodyLeft::Length(n) => Some(*n),
        _ => None,
    };
    loop {
        let k = left.dechunk(req.filled(), &mut data).map_err(|_| 400u16)?;
        req.consume(k);
        if left.done() {
            break;
        }
        if data.len() > MAX_BODY {
            return Err(413);
        }
        if expect_continue && !sent_continue {
            sent_continue = true;
            deadline.set(idle);
            client
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n", deadline)
                .await
                .map_err(|_| 0u16)?;
        }
        match client.stream.try_read(req.spare(BUF_SIZE)) {
            Ok(0) => return Err(0),
            Ok(n) => req.advance(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                deadline.set(idle);
                client.stream.readable(deadline).await.map_err(|_| 0u16)?;
            }
            Err(_) => return Err(0),
        }
    }
    Ok(Buffered {
        empty: data.is_empty() && length.is_none_or(|n| n == 0),
        length: Some(data.len() as u64),
        data: Bytes::from(data),
        sent: false,
    })
}

/// A request body read whole.
struct Buffered {
    data: Bytes,
    length: Option<u64>,
    empty: bool,
    sent: bool,
}

impl RequestBody for Buffered {
    async fn data(&mut self) -> Result<Option<Bytes>, ()> {
        if self.sent || self.data.is_empty() {
            return Ok(None);
        }
        self.sent = true;
        Ok(Some(self.data.clone()))
    }

    async fn trailers(&mut self) -> Result<Option<HeaderMap>, ()> {
        Ok(None)
    }

    fn is_empty(&self) -> bool {
        self.empty
    }

    fn length(&self) -> Option<u64> {
        self.length
    }

    fn replayable(&self) -> bool {
        true
    }

    fn rewind(&mut self) {
        self.sent = false;
    }
}

/// The HTTP/1 client as the h2 upstream's response sink.
struct H1Sink<'c, 't> {
    client: &'c mut Client,
    deadline: Deadline<'t>,
    idle: Duration,
    version: Version,
    /// The connection closes after this response.
    close: bool,
    chunked: bool,
    started: bool,
    broken: bool,
    out: Vec<u8>,
}

impl H1Sink<'_, '_> {
    async fn write(&mut self) -> Result<(), ()> {
        self.deadline.set(self.idle);
        let r = self
            .client
            .stream
            .write_all(&self.out, &mut self.deadline)
            .await;
        self.out.clear();
        if r.is_err() {
            self.broken = true;
        }
        r.map_err(|_| ())
    }
}

impl ResponseSink for H1Sink<'_, '_> {
    async fn head(&mut self, head: response::Parts, end: bool) -> Result<(), ()> {
        self.started = true;
        let status = head.status.as_u16();
        let bodiless = end || status == 204 || status == 304;
        let framing = if bodiless || head.headers.contains_key(http::header::CONTENT_LENGTH) {
            Framing::None
        } else if self.version == Version::Http11 {
            self.chunked = true;
            Framing::Chunked
        } else {
            // An HTTP/1.0 client: the end of the connection ends the body.
            self.close = true;
            Framing::None
        };
        let mut parts = head;
        if end && !bodiless {
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(0));
        }
        h1_response_head(&mut self.out, &parts, self.version, self.close, framing);
        self.write().await
    }

    async fn data(&mut self, data: Bytes, end: bool) -> Result<(), ()> {
        if self.chunked && !data.is_empty() {
            let _ = write!(self.out, "{:x}\r\n", data.len());
            self.out.extend_from_slice(&data);
            self.out.extend_from_slice(b"\r\n");
        } else if !self.chunked {
            self.out.extend_from_slice(&data);
        }
        if end && self.chunked {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        // Written at once, never held for more: what the backend streams (an event stream)
        // reaches the client as it comes. Pieces are h2 frames or backend reads, not bytes.
        if self.out.is_empty() {
            return Ok(());
        }
        self.write().await
    }

    async fn trailers(&mut self, trailers: HeaderMap) -> Result<(), ()> {
        if self.chunked {
            self.out.extend_from_slice(b"0\r\n");
            for (name, value) in &trailers {
                self.out.extend_from_slice(name.as_str().as_bytes());
                self.out.extend_from_slice(b": ");
                self.out.extend_from_slice(value.as_bytes());
                self.out.extend_from_slice(b"\r\n");
            }
            self.out.extend_from_slice(b"\r\n");
        }
        self.write().await
    }

    async fn cancelled(&mut self) {
        // An HTTP/1 client cancels by closing, which the writes see.
        std::future::pending::<()>().await
    }

    fn reset(&mut self, _reason: Reason) {
        self.broken = true;
    }

    fn started(&self) -> bool {
        self.started
    }
}

/// One HTTP/1 request on its way to an HTTP/2 pool.
struct H1ToH2<'a, 's, 'c, 't, 'd> {
    ctx: &'a WorkerCtx,
    listener: &'a ListenerEntry,
    plan: &'a Plan,
    parts: &'a request::Parts,
    body: Buffered,
    sink: &'s mut H1Sink<'c, 't>,
    outcome: &'a mut Outcome,
    deadline: &'a mut Deadline<'d>,
    fresh: bool,
}

impl Tries for H1ToH2<'_, '_, '_, '_, '_> {
    fn target(&self) -> (&Arc<crate::balance::Pool>, u64, Option<usize>) {
        (&self.plan.pool, self.plan.key, self.plan.pinned)
    }

    fn outcome(&mut self) -> &mut Outcome {
        self.outcome
    }

    async fn queue_wait(&mut self, pool: &crate::balance::Pool, key: u64) -> Option<usize> {
        tries::queue_wait(pool, key, self.deadline).await
    }

    async fn attempt(&mut self, i: usize) -> Attempt {
        let pool = &*self.plan.pool;
        let set_cookies =
            crate::proxy::set_cookies(pool, i, self.plan.pinned, self.plan.group.as_deref());
        let req = UpstreamRequest {
            listener: self.listener.id,
            pool,
            backend: i,
            parts: self.parts,
            sni: self.plan.sni.as_deref(),
            sni_tag: self.plan.sni_tag,
            deadline: None,
            client_idle_ms: self.listener.cfg.client_idle_ms,
            fresh: self.fresh,
            set_cookies,
            // send_proxy is refused on HTTP/2 pools, and its HTTP/1.1 pools keep the byte path
            proxy: None,
            response_rules: super::response_rules(self.listener, self.plan.route),
        };
        self.body.rewind();
        let compression = self
            .listener
            .http
            .as_ref()
            .and_then(|h| h.compression.as_ref());
        let offer = compression
            .zip(self.plan.compress)
            .map(|(c, e)| (c, e, self.parts.method.clone()));
        let sink = &mut CompressingSink::new(self.sink, offer);
        match pool.http_version {
            HttpVersion::Http2 => {
                crate::h2::client::exchange(self.ctx, &req, &mut self.body, sink, self.outcome)
                    .await
            }
            HttpVersion::Http11 => {
                crate::h1::translate::exchange(self.ctx, &req, &mut self.body, sink, self.outcome)
                    .await
            }
        }
    }

    fn replayable(&self) -> bool {
        true
    }

    fn idempotent(&self) -> bool {
        self.plan.method.is_idempotent()
    }

    fn use_fresh_connection(&mut self) {
        self.fresh = true;
    }
}
