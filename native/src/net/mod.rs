//! Connections: one type over plain TCP and TLS, used alike by the HTTP/1 code and the L4 relay.
//!
//! Plain TCP keeps what makes it cheap: raw `recv`/`send` that clear tokio's readiness on a short
//! read (l4::forward), splice(2) when both ends of a relay or body are plain, MSG_MORE on a last
//! write and delayed ACKs on new connections (http::client). TLS goes through rustls (via
//! tokio-rustls' AsyncRead/AsyncWrite), so its bytes are copied through user space: this kernel
//! has no kTLS, and splice cannot see plaintext.

pub mod connect;
pub mod proxy_header;
pub mod relay;

use crate::l4::forward::{read_clearing, write_now};
use std::future::poll_fn;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use connect::{connect, server_name, tls_handshake, write_first};

/// A TLS session over TCP, either side (a client fastlb accepted, or a backend it connected to).
pub type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// A connection registered with the worker's reactor.
pub enum Conn {
    Plain(TcpStream),
    /// Boxed: a TLS session is ~1 KB of state plus its buffers, and a plain connection's future
    /// should not carry that size.
    Tls(Box<TlsStream>),
}

impl Conn {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }

    /// Reads what is there now: Ok(0) is EOF, WouldBlock when nothing is. WouldBlock clears the
    /// socket's readiness, and a TLS session never holds undelivered plaintext after it, so the
    /// caller then waits on `tcp().poll_read_ready` for new bytes.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => read_clearing(s, s.as_raw_fd(), buf),
            Conn::Tls(_) => match self.poll_read(&mut Context::from_waker(Waker::noop()), buf) {
                Poll::Ready(r) => r,
                Poll::Pending => Err(ErrorKind::WouldBlock.into()),
            },
        }
    }

    /// Ready once some bytes were read (0: EOF).
    pub fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            Conn::Plain(s) => loop {
                std::task::ready!(s.poll_read_ready(cx))?;
                match read_clearing(s, s.as_raw_fd(), buf) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            },
            Conn::Tls(s) => {
                let mut rb = ReadBuf::new(buf);
                match std::task::ready!(Pin::new(&mut **s).poll_read(cx, &mut rb)) {
                    Ok(()) => Poll::Ready(Ok(rb.filled().len())),
                    // The peer closed TCP without a close_notify: most clients do, and HTTP/1
                    // framing (not the TLS close) says whether a message was complete.
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => Poll::Ready(Ok(0)),
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
        }
    }

    /// Ready once some of `buf` was taken.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Conn::Plain(s) => loop {
                std::task::ready!(s.poll_write_ready(cx))?;
                match write_now(s, s.as_raw_fd(), buf)? {
                    0 if !buf.is_empty() => continue,
                    n => return Poll::Ready(Ok(n)),
                }
            },
            Conn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    /// Ready once every byte written has left for the socket (always, for plain TCP).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Conn::Plain(_) => Poll::Ready(Ok(())),
            Conn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    /// Ends the sending direction: TLS sends its close_notify first (best effort, never
    /// waiting), then the TCP FIN.
    pub fn shutdown_write(&mut self) {
        if let Conn::Tls(s) = self {
            match &mut **s {
                tokio_rustls::TlsStream::Server(t) => t.get_mut().1.send_close_notify(),
                tokio_rustls::TlsStream::Client(t) => t.get_mut().1.send_close_notify(),
            }
            let _ = self.poll_flush(&mut Context::from_waker(Waker::noop()));
        }
        // SAFETY: shutdown on a socket we hold open; an error (peer gone) changes nothing here.
        unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) };
    }

    /// Writes all of `data` and flushes it, waiting as long as the peer needs.
    pub async fn write_all_flushed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = poll_fn(|cx| self.poll_write(cx, data)).await?;
            data = &data[n..];
        }
        poll_fn(|cx| self.poll_flush(cx)).await
    }
}
