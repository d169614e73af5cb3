//! The byte stream under an HTTP/2 connection, and the flood meter that watches its frames.
//!
//! The h2 crate limits what it can see cause harm (Rapid Reset before a stream is accepted,
//! CONTINUATION floods, locally caused resets), but frames that cost the server work and give
//! nothing back (SETTINGS, PING, WINDOW_UPDATE, PRIORITY, empty DATA, RST_STREAM on accepted
//! streams) it answers for ever. `FrameMeter` reads the 9-byte frame headers as the bytes pass
//! (payloads are skipped by count, never copied) and charges each such frame to a budget that
//! drains with time, as HAProxy's "glitches" and Envoy's control-frame limits do. A connection
//! over budget is ended with GOAWAY ENHANCE_YOUR_CALM by its session.

use crate::net::Conn;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 3.4), which starts an h2c connection.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Budget a connection may spend on frames that do no work; a burst of this size passes.
const BUDGET: u32 = 2000;
/// Units the budget recovers per second.
const RECOVERY_PER_SEC: u32 = 400;
/// A new request (HEADERS) earns this much back: frames that come with real work are not a
/// flood (gRPC clients send WINDOW_UPDATE and PING alongside their calls).
const REQUEST_CREDIT: u32 = 8;
/// Response bytes fastlb writes earn one unit back per this many: a client downloading fast
/// sends WINDOW_UPDATEs in proportion.
const BYTES_PER_CREDIT: u64 = 4096;
/// A stream reset by the client costs this much: a handful of cancellations is normal (a page
/// navigated away), hundreds a second are Rapid Reset, which costs the backends work.
const RESET_COST: u32 = 20;

/// Frame types (RFC 9113 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

#[derive(Default)]
pub struct FrameMeter {
    /// Bytes of the current frame's payload (or of the preface) still to skip.
    skip: Cell<usize>,
    /// A frame header read in part.
    header: Cell<[u8; 9]>,
    header_len: Cell<u8>,
    spent: Cell<u32>,
    since: Cell<Option<Instant>>,
    tripped: Cell<bool>,
    /// Bytes written not yet counted as a credit.
    written: Cell<u64>,
    /// Streams the client reset (RST_STREAM frames read).
    pub resets: Cell<u64>,
    waker: RefCell<Option<Waker>>,
}

impl FrameMeter {
    /// A meter for the server side: the client's bytes start with the 24-byte preface.
    pub fn server() -> Self {
        let m = FrameMeter::default();
        m.skip.set(PREFACE.len());
        m
    }

    pub fn tripped(&self) -> bool {
        self.tripped.get()
    }

    /// Reads frame headers out of `bytes`; true when this pushed the connection over budget.
    pub fn scan(&self, mut bytes: &[u8], now: Instant) -> bool {
        let mut header = self.header.get();
        let mut have = self.header_len.get() as usize;
        let mut charged = 0u32;
        let mut credit = 0u32;
        while !bytes.is_empty() {
            let skip = self.skip.get();
            if skip > 0 {
                let n = skip.min(bytes.len());
                self.skip.set(skip - n);
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - have).min(bytes.len());
            header[have..have + n].copy_from_slice(&bytes[..n]);
            have += n;
            bytes = &bytes[n..];
            if have < 9 {
                break;
            }
            have = 0;
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            if header[3] == HEADERS {
                credit += REQUEST_CREDIT;
            }
            charged += self.cost(header[3], header[4], len);
            self.skip.set(len);
        }
        self.header.set(header);
        self.header_len.set(have as u8);
        if credit > 0 {
            self.spent.set(self.spent.get().saturating_sub(credit));
        }
        if charged == 0 {
            return false;
        }
        self.charge(charged, now)
    }

    /// `n` bytes went out to the client.
    pub fn wrote(&self, n: usize) {
        let total = self.written.get() + n as u64;
        let units = total / BYTES_PER_CREDIT;
        self.written.set(total % BYTES_PER_CREDIT);
        if units > 0 {
            let units = units.min(u32::MAX as u64) as u32;
            self.spent.set(self.spent.get().saturating_sub(units));
        }
    }

    fn cost(&self, kind: u8, flags: u8, len: usize) -> u32 {
        match kind {
            DATA if len == 0 && flags & END_STREAM == 0 => 1,
            PRIORITY | WINDOW_UPDATE | CONTINUATION => 1,
            SETTINGS | PING if flags & ACK == 0 => 1,
            RST_STREAM => {
                self.resets.set(self.resets.get() + 1);
                RESET_COST
            }
            _ => 0,
        }
    }

    fn charge(&self, units: u32, now: Instant) -> bool {
        let recovered = match self.since.get() {
            Some(t) => {
                let ms = now.saturating_duration_since(t).as_millis() as u64;
                (ms * RECOVERY_PER_SEC as u64 / 1000).min(u32::MAX as u64) as u32
            }
            None => 0,
        };
        self.since.set(Some(now));
        let spent = self.spent.get().saturating_sub(recovered) + units;
        self.spent.set(spent);
        if spent > BUDGET && !self.tripped.get() {
            self.tripped.set(true);
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
            return true;
        }
        false
    }

    /// Ready once the connection went over budget.
    pub fn poll_tripped(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.tripped.get() {
            return Poll::Ready(());
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A connection's bytes for the h2 crate: the socket, after bytes already read from it (an h2c
/// preface found by the HTTP/1 code), metered on the server side.
pub struct H2Io {
    conn: Conn,
    preread: Vec<u8>,
    at: usize,
    meter: Option<Rc<FrameMeter>>,
}

impl H2Io {
    pub fn new(conn: Conn, preread: Vec<u8>, meter: Option<Rc<FrameMeter>>) -> Self {
        H2Io {
            conn,
            preread,
            at: 0,
            meter,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.conn.fd()
    }
}

impl Drop for H2Io {
    /// A server connection ends like an HTTP/1 one refused (nginx's lingering close, in its
    /// cheapest form): FIN first, then what the client already sent is read away, so that the
    /// close does not answer unread bytes with a reset, which can destroy the GOAWAY before the
    /// client reads it. Never waits: only what is in the socket now is read.
    fn drop(&mut self) {
        if self.meter.is_none() {
            return;
        }
        self.conn.shutdown_write();
        let mut sink = [0u8; 4096];
        for _ in 0..64 {
            // SAFETY: recv into a local buffer on a socket this connection still owns.
            let n = unsafe {
                libc::recv(
                    self.conn.fd(),
                    sink.as_mut_ptr().cast(),
                    sink.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(m) = &this.meter {
            if m.tripped() {
                // Nothing more is read from a flooding peer: its session sends GOAWAY and
                // closes (it was woken when the meter tripped).
                return Poll::Pending;
            }
        }
        let start = buf.filled().len();
        if this.at < this.preread.len() {
            let n = (this.preread.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.preread[this.at..this.at + n]);
            this.at += n;
            if this.at == this.preread.len() {
                this.preread = Vec::new();
                this.at = 0;
            }
        } else {
            let n = std::task::ready!(this.conn.poll_read(cx, buf.initialize_unfilled()))?;
            buf.advance(n);
        }
        if let Some(m) = &this.meter {
            m.scan(&buf.filled()[start..], Instant::now());
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = std::task::ready!(this.conn.poll_write(cx, buf))?;
        if let Some(m) = &this.meter {
            m.wrote(n);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().conn.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.conn.poll_flush(cx))?;
        this.conn.shutdown_write();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn ping_flood_trips_the_meter_and_useful_frames_do_not() {
        let m = FrameMeter::server();
        let now = Instant::now();
        let mut bytes = PREFACE.to_vec();
        for _ in 0..1000 {
            bytes.extend(frame(0x1, 0x5, &[0x82; 40])); // HEADERS
            bytes.extend(frame(DATA, END_STREAM, &[0; 100]));
            bytes.extend(frame(PING, ACK, &[0; 8]));
        }
        assert!(!m.scan(&bytes, now));
        let pings: Vec<u8> = (0..BUDGET + 1)
            .flat_map(|_| frame(PING, 0, &[0; 8]))
            .collect();
        assert!(m.scan(&pings, now));
        assert!(m.tripped());
    }

    #[test]
    fn frame_headers_split_anywhere_are_read_whole() {
        let m = FrameMeter::server();
        let now = Instant::now();
        let mut bytes = PREFACE.to_vec();
        for _ in 0..10 {
            bytes.extend(frame(RST_STREAM, 0, &[0, 0, 0, 8]));
        }
        for b in bytes.chunks(1) {
            m.scan(b, now);
        }
        assert_eq!(m.resets.get(), 10);
    }

    #[test]
    fn the_budget_recovers_with_time() {
        let m = FrameMeter::server();
        let t0 = Instant::now();
        m.scan(PREFACE, t0);
        let burst: Vec<u8> = (0..BUDGET - 10)
            .flat_map(|_| frame(SETTINGS, 0, &[]))
            .collect();
        assert!(!m.scan(&burst, t0));
        let later = t0 + std::time::Duration::from_secs(10);
        assert!(!m.scan(&burst, later));
    }
}
