//! How one request ended, and recording it: the metrics and the access log line, the same for
//! every protocol on either side.

use crate::accesslog::Line;
use crate::metrics::{ResponseKey, NO_BACKEND, NO_POOL, NO_ROUTE};
use crate::tables::ListenerEntry;
use crate::tls::SessionInfo;
use crate::worker::WorkerCtx;
use std::net::SocketAddr;
use std::time::Duration;

/// How one request ended, for the metrics (and the access log).
pub struct Outcome {
    /// The status the client got; 0 until known (a client that left before any answer is
    /// counted as 499, nginx's "client closed request").
    pub status: u16,
    pub pool: u16,
    /// The split route that chose the pool (NO_ROUTE: none).
    pub route: u16,
    /// The backend that answered, or the last one tried.
    pub backend: u32,
    /// Request bytes sent to backends, response bytes sent to the client.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Backends tried after the first (not counting a stale kept-alive connection).
    pub retries: u8,
    /// Of the last try: connecting (NOT_MEASURED when a kept-alive connection was reused) and
    /// the time to the response's first byte, in microseconds; u32 keeps the connection's
    /// future small (idle RSS per connection is a target).
    pub connect_us: u32,
    pub ttfb_us: u32,
    /// What only the access log needs, captured when it is on.
    pub log: Option<Box<RequestLog>>,
}

pub const NOT_MEASURED: u32 = u32::MAX;

pub fn micros(d: Duration) -> u32 {
    (d.as_micros() as u64).min(NOT_MEASURED as u64 - 1) as u32
}

fn measured(us: u32) -> Option<u64> {
    (us != NOT_MEASURED).then_some(us as u64)
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            status: 0,
            pool: NO_POOL,
            route: NO_ROUTE,
            backend: NO_BACKEND,
            bytes_in: 0,
            bytes_out: 0,
            retries: 0,
            connect_us: NOT_MEASURED,
            ttfb_us: NOT_MEASURED,
            log: None,
        }
    }
}

/// The request's side of an access log line, copied before the request's bytes are consumed.
#[derive(Default)]
pub struct RequestLog {
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    pub request_id: Vec<u8>,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`: what the client spoke.
    pub protocol: &'static str,
    pub route: Option<usize>,
    pub pool: String,
    /// The address of the backend that answered, or of the last one tried.
    pub backend: Option<String>,
    /// gRPC requests: the `grpc-status` the client was given, when known.
    pub grpc_status: Option<u32>,
}

/// Who asked: what the access log says about the client's connection.
#[derive(Clone, Copy)]
pub struct ClientInfo<'a> {
    pub peer: SocketAddr,
    pub tls: Option<&'a SessionInfo>,
}

/// Counts a request fastlb answered itself before choosing a pool (`malformed`: 400/408/431).
pub fn record_refused(ctx: &WorkerCtx, listener: &ListenerEntry, status: u16, malformed: bool) {
    let mut m = ctx.metrics.borrow_mut();
    if malformed {
        m.record_bad_request(listener.id);
    }
    let key = ResponseKey {
        listener: listener.id,
        pool: NO_POOL,
        backend: NO_BACKEND,
        code: status,
    };
    m.record_done(key, 0);
}

/// Records a request that ran for `took_us`: its counters, its duration by status, and its
/// access log line when the log saw it start.
pub fn finish(
    ctx: &WorkerCtx,
    listener: &ListenerEntry,
    client: ClientInfo<'_>,
    outcome: &Outcome,
    took_us: u64,
) {
    let mut m = ctx.metrics.borrow_mut();
    m.record_request(listener.id);
    m.record_bytes(
        listener.id,
        outcome.backend,
        outcome.bytes_in,
        outcome.bytes_out,
    );
    let key = ResponseKey {
        listener: listener.id,
        pool: outcome.pool,
        backend: outcome.backend,
        code: if outcome.status == 0 {
            499
        } else {
            outcome.status
        },
    };
    m.record_done(key, took_us);
    m.record_route(outcome.route, outcome.pool, key.code, took_us);
    drop(m);
    if outcome.log.is_some() {
        if let Some(log) = ctx.shared.access_log.load().as_ref() {
            log.send(access_line(listener, client, outcome, key.code, took_us));
        }
    }
}

/// One access log line for an http request.
pub fn access_line(
    listener: &ListenerEntry,
    client: ClientInfo<'_>,
    o: &Outcome,
    status: u16,
    took_us: u64,
) -> Vec<u8> {
    let mut line = Line::new();
    line.time()
        .quoted("client", client.peer)
        .str("listener", listener.cfg.name.as_bytes());
    let req = o.log.as_deref();
    match req.and_then(|r| r.route) {
        Some(i) => line.display("route", i),
        None => line.null("route"),
    };
    line.opt_str("pool", req.map(|r| r.pool.as_bytes()))
        .opt_str(
            "backend",
            req.and_then(|r| r.backend.as_deref()).map(str::as_bytes),
        );
    line.opt_str("method", req.map(|r| r.method.as_slice()))
        .opt_str("path", req.map(|r| r.target.as_slice()))
        .opt_str("protocol", req.map(|r| r.protocol.as_bytes()))
        .display("status", status)
        .display("bytes_in", o.bytes_in)
        .display("bytes_out", o.bytes_out)
        .ms("duration_ms", Some(took_us))
        .ms("connect_ms", measured(o.connect_us))
        .ms("ttfb_ms", measured(o.ttfb_us))
        .opt_str("request_id", req.map(|r| r.request_id.as_slice()))
        .display("retries", o.retries);
    if let Some(code) = req.and_then(|r| r.grpc_status) {
        line.str("grpc_status", code.to_string().as_bytes());
    }
    if let Some(tls) = client.tls {
        tls.log_fields(&mut line);
    }
    line.finish()
}
