//! The HTTP/1.1 upstream for requests that did not arrive as HTTP/1 (an HTTP/2 client's
//! streams): the head written from `http` parts, the body framed by length or chunked, the
//! response head parsed as for any HTTP/1 response and its body handed on without framing.
//! Backend connections come from, and go back to, the same keep-alive pool as HTTP/1's.

use super::buf::Buf;
use super::io::{read_some, write_all, Deadline};
use super::parse::{self, BodyKind, Method};
use super::RESPONSE_LIMITS;
use crate::h2::headers::{h1_fields, h1_request_head, Framing};
use crate::net::Conn;
use crate::proxy::exchange::{
    connect_backend, connect_failed, RequestBody, ResponseSink, UpstreamRequest,
};
use crate::proxy::outcome::{micros, NOT_MEASURED};
use crate::proxy::{Attempt, Next, Outcome};
use crate::worker::WorkerCtx;
use bytes::Bytes;
use std::io::{ErrorKind, Write};
use std::pin::pin;
use std::time::{Duration, Instant};

/// One try at an HTTP/1.1 backend for a request given as parts.
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
    let t = pool.timeouts;
    let timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut deadline = Deadline::new(timer);
    let pooled = (!req.fresh)
        .then(|| ctx.http.upstream.take(addr, req.sni_tag))
        .flatten();
    let reused = pooled.is_some();
    let mut conn = match pooled {
        Some(c) => {
            outcome.connect_us = NOT_MEASURED;
            c
        }
        None => match connect(ctx, req, &mut deadline, outcome).await {
            Ok(c) => c,
            Err(a) => return a,
        },
    };
    let framing = if body.is_empty() {
        match req.parts.method {
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS => Framing::None,
            _ => Framing::Length(0),
        }
    } else {
        match body.length() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        }
    };
    let mut out = ctx.http.bufs.take_vec();
    h1_request_head(&mut out, req.parts, framing);
    deadline.set(Duration::from_millis(t.send_ms));
    let written = write_all(&mut conn, &out, &mut deadline).await;
    ctx.http.bufs.give_vec(out);
    if written.is_err() {
        if reused {
            return Attempt::Stale;
        }
        backend.fail_reset();
        return Attempt::Failed {
            status: 502,
            retryable: body.replayable(),
        };
    }
    if framing != Framing::None && framing != Framing::Length(0) {
        match upload(&mut conn, body, framing, &mut deadline, t.send_ms).await {
            Ok(n) => outcome.bytes_in += n,
            Err(Upload::Client) => return Attempt::Broken,
            Err(Upload::Backend) => {
                backend.fail_reset();
                return Attempt::Failed {
                    status: 502,
                    retryable: false,
                };
            }
        }
    }
    let mut resp = ctx.http.bufs.take();
    let result = response(
        ctx,
        req,
        conn,
        reused,
        &mut resp,
        &mut deadline,
        sink,
        outcome,
    )
    .await;
    ctx.http.bufs.give(resp);
    result
}

async fn connect(
    ctx: &WorkerCtx,
    req: &UpstreamRequest<'_>,
    deadline: &mut Deadline<'_>,
    outcome: &mut Outcome,
) -> Result<Conn, Attempt> {
    let pool = req.pool;
    let backend = &pool.backends[req.backend];
    let t0 = Instant::now();
    let mut timer = deadline.timer();
    timer
        .as_mut()
        .reset((t0 + Duration::from_millis(pool.timeouts.connect_ms.max(1))).into());
    let connected = connect_backend(req, timer).await;
    outcome.connect_us = micros(t0.elapsed());
    match connected {
        Ok(c) => {
            ctx.metrics
                .borrow_mut()
                .record_backend_connect(backend.slot);
            Ok(c)
        }
        Err(e) => Err(connect_failed(backend, &e)),
    }
}

enum Upload {
    Client,
    Backend,
}

/// Writes the body to the backend, chunk-encoded unless its length is known.
async fn upload(
    conn: &mut Conn,
    body: &mut impl RequestBody,
    framing: Framing,
    deadline: &mut Deadline<'_>,
    send_ms: u64,
) -> Result<u64, Upload> {
    let mut sent = 0u64;
    let mut frame = Vec::with_capacity(16);
    loop {
        let chunk = match body.data().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(()) => return Err(Upload::Client),
        };
        if chunk.is_empty() {
            continue;
        }
        sent += chunk.len() as u64;
        deadline.set(Duration::from_millis(send_ms));
        if framing == Framing::Chunked {
            frame.clear();
            let _ = write!(frame, "{:x}\r\n", chunk.len());
            write_all(conn, &frame, deadline)
                .await
                .map_err(|_| Upload::Backend)?;
        }
        write_all(conn, &chunk, deadline)
            .await
            .map_err(|_| Upload::Backend)?;
        if framing == Framing::Chunked {
            write_all(conn, b"\r\n", deadline)
                .await
                .map_err(|_| Upload::Backend)?;
        }
    }
    if framing == Framing::Chunked {
        deadline.set(Duration::from_millis(send_ms));
        write_all(conn, b"0\r\n\r\n", deadline)
            .await
            .map_err(|_| Upload::Backend)?;
    }
    Ok(sent)
}

fn method_of(m: &http::Method) -> Method {
    match *m {
        http::Method::HEAD => Method::Head,
        http::Method::CONNECT => Method::Connect,
        _ => Method::Get,
    }
}

/// Reads the response head and relays the response to `sink`.
#[allow(clippy::too_many_arguments)]
async fn response(
    ctx: &WorkerCtx,
    req: &UpstreamRequest<'_>,
    mut conn: Conn,
    reused: bool,
    resp: &mut Buf,
    deadline: &mut Deadline<'_>,
    sink: &mut impl ResponseSink,
    outcome: &mut Outcome,
) -> Attempt {
    let pool = req.pool;
    let backend = &pool.backends[req.backend];
    let read_timeout = Duration::from_millis(pool.timeouts.read_ms.max(1));
    let read_for = match req.deadline {
        Some(d) => d
            .saturating_duration_since(Instant::now())
            .min(read_timeout),
        None => read_timeout,
    };
    let sent = Instant::now();
    deadline.set(read_for.max(Duration::from_millis(1)));
    let retryable = req.parts.method.is_idempotent();
    let head = loop {
        if !resp.is_empty() {
            let parsed = {
                let mut headers = ctx.http.headers.borrow_mut();
                parse::parse_response(
                    resp.filled(),
                    method_of(&req.parts.method),
                    &RESPONSE_LIMITS,
                    &mut headers,
                )
            };
            match parsed {
                Ok(None) => {}
                Err(_) => {
                    return Attempt::Failed {
                        status: 502,
                        retryable: false,
                    }
                }
                Ok(Some(h)) if (100..200).contains(&h.status) => {
                    resp.consume(h.len);
                    continue;
                }
                Ok(Some(h)) => break h,
            }
        }
        let stale = reused && resp.is_empty();
        match read_some(
            &mut conn,
            resp.spare(super::MAX_RESPONSE_HEAD + 1),
            deadline,
        )
        .await
        {
            Ok(0) if stale => return Attempt::Stale,
            Ok(n) if n > 0 => resp.advance(n),
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                backend.fail_timeout();
                return Attempt::Failed {
                    status: 504,
                    retryable: false,
                };
            }
            Err(_) if stale => return Attempt::Stale,
            _ => {
                backend.fail_reset();
                return Attempt::Failed {
                    status: 502,
                    retryable,
                };
            }
        }
    };
    let ttfb = sent.elapsed();
    outcome.ttfb_us = micros(ttfb);
    backend.observe_latency_at(
        ttfb.as_nanos() as u64,
        crate::balance::ns_at(Instant::now()),
    );
    if head.status >= 500 {
        backend.fail_5xx();
    } else {
        backend.record_success();
    }
    outcome.status = head.status;
    let (headers, _) = {
        let spans = ctx.http.headers.borrow();
        h1_fields(resp.filled(), &spans)
    };
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = http::StatusCode::from_u16(head.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    parts.headers = headers;
    crate::proxy::exchange::response_fields(&mut parts.headers, req);
    resp.consume(head.len);
    let no_body = matches!(head.body, BodyKind::None | BodyKind::Length(0));
    if sink.head(parts, no_body).await.is_err() {
        return Attempt::Broken;
    }
    let mut body = Dechunk::new(head.body);
    if !no_body {
        let idle = read_timeout;
        match relay_body(&mut conn, resp, &mut body, deadline, idle, sink, outcome).await {
            Ok(()) => {}
            Err(()) => return Attempt::Broken,
        }
    }
    let reusable = !head.conn_close
        && !matches!(head.body, BodyKind::UntilClose)
        && resp.is_empty()
        && (head.version == super::parse::Version::Http11 || head.conn_keep_alive);
    if reusable {
        ctx.http.upstream.put(
            pool.settings[req.backend].addr,
            req.sni_tag,
            conn,
            pool.keepalive,
            Duration::from_millis(pool.timeouts.idle_ms),
        );
    }
    Attempt::Done(Next::KeepAlive)
}

/// Where an HTTP/1 response body ends, and its data without chunk framing.
enum Dechunk {
    Length(u64),
    Chunked(super::chunked::ChunkedDecoder),
    UntilClose,
}

impl Dechunk {
    fn new(kind: BodyKind) -> Self {
        match kind {
            BodyKind::None => Dechunk::Length(0),
            BodyKind::Length(n) => Dechunk::Length(n),
            BodyKind::Chunked => Dechunk::Chunked(Default::default()),
            BodyKind::UntilClose => Dechunk::UntilClose,
        }
    }

    /// Takes the body's data out of `input` into `out`; returns (bytes consumed, body done).
    fn take(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), ()> {
        match self {
            Dechunk::Length(n) => {
                let k = (*n).min(input.len() as u64) as usize;
                out.extend_from_slice(&input[..k]);
                *n -= k as u64;
                Ok((k, *n == 0))
            }
            Dechunk::Chunked(d) => d
                .dechunk(input, |b| out.extend_from_slice(b))
                .map_err(|_| ()),
            Dechunk::UntilClose => {
                out.extend_from_slice(input);
                Ok((input.len(), false))
            }
        }
    }
}

/// Relays the body from the backend to the sink: what `resp` holds, then what arrives.
async fn relay_body(
    conn: &mut Conn,
    resp: &mut Buf,
    body: &mut Dechunk,
    deadline: &mut Deadline<'_>,
    idle: Duration,
    sink: &mut impl ResponseSink,
    outcome: &mut Outcome,
) -> Result<(), ()> {
    let mut data = Vec::with_capacity(super::buf::BUF_SIZE);
    loop {
        let (k, done) = body.take(resp.filled(), &mut data)?;
        resp.consume(k);
        if !data.is_empty() || done {
            outcome.bytes_out += data.len() as u64;
            let chunk = Bytes::from(std::mem::replace(
                &mut data,
                Vec::with_capacity(super::buf::BUF_SIZE),
            ));
            sink.data(chunk, done).await?;
        }
        if done {
            return Ok(());
        }
        resp.clear();
        deadline.set(idle);
        match read_some(conn, resp.spare(super::buf::BUF_SIZE), deadline).await {
            Ok(0) if matches!(body, Dechunk::UntilClose) => {
                return sink.data(Bytes::new(), true).await;
            }
            Ok(0) | Err(_) => {
                sink.reset(h2::Reason::INTERNAL_ERROR);
                return Err(());
            }
            Ok(n) => resp.advance(n),
        }
    }
}
