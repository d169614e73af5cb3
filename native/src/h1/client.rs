//! The client side of an http connection, registered with the reactor only once fastlb has to
//! wait on it.
//!
//! A client that sends its request with the connection (the usual case) and is answered
//! without its socket filling up is served with plain read/write calls on the raw socket: no
//! epoll registration, no deregistration. That saves two `epoll_ctl` calls and the reactor's
//! bookkeeping per connection, which is what a `Connection: close` request costs most beyond
//! its unavoidable syscalls (accept, read, write, close). A connection that has to wait (the
//! next keep-alive request, a slow reader, a body still arriving) is registered then, once.

use super::io::{wait_ready, write_all, Deadline};
use crate::net::Conn;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use tokio::net::TcpStream;

pub enum ClientSocket {
    /// Plain TCP, not registered with the reactor yet.
    Raw(std::net::TcpStream),
    /// Registered: plain TCP that had to wait once, or TLS (whose handshake always waits).
    Conn(Conn),
    /// Only while switching from Raw to Conn.
    Switching,
}

impl ClientSocket {
    pub fn new(stream: std::net::TcpStream) -> Self {
        // Delayed ACKs from the start (HAProxy's `tcp-smart-accept`): a new connection is in
        // quick-ack mode, so the kernel would ACK the request in a packet of its own; delayed,
        // the ACK rides on the response. One segment less per new connection, measured at 8-11%
        // less CPU per `Connection: close` request (alternating A/B runs, bench/README.md),
        // for one setsockopt.
        let off: libc::c_int = 0;
        // SAFETY: setsockopt on a socket we own, with an int option value; failure is harmless.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ClientSocket::Raw(stream)
    }

    pub fn fd(&self) -> RawFd {
        match self {
            ClientSocket::Raw(s) => s.as_raw_fd(),
            ClientSocket::Conn(c) => c.fd(),
            ClientSocket::Switching => -1,
        }
    }

    /// The registered connection, registering it now if it is not yet.
    pub fn registered(&mut self) -> io::Result<&mut Conn> {
        if let ClientSocket::Raw(_) = self {
            let ClientSocket::Raw(raw) = std::mem::replace(self, ClientSocket::Switching) else {
                unreachable!()
            };
            *self = ClientSocket::Conn(Conn::Plain(TcpStream::from_std(raw)?));
        }
        match self {
            ClientSocket::Conn(c) => Ok(c),
            _ => Err(io::Error::other("client socket lost while registering")),
        }
    }

    /// The registered connection, owned (for a session that takes the socket over).
    pub fn into_conn(mut self) -> io::Result<Conn> {
        self.registered()?;
        match self {
            ClientSocket::Conn(c) => Ok(c),
            _ => Err(io::Error::other("client socket lost while registering")),
        }
    }

    /// One read without waiting; WouldBlock when nothing is there.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientSocket::Conn(c) => c.try_read(buf),
            ClientSocket::Raw(s) => raw_io(|| {
                // SAFETY: buf is valid for buf.len() bytes for the duration of the call.
                unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) }
            }),
            ClientSocket::Switching => Err(ErrorKind::NotConnected.into()),
        }
    }

    /// Waits until the socket is readable or the deadline passes.
    pub async fn readable(&mut self, deadline: &mut Deadline<'_>) -> io::Result<()> {
        wait_ready(self.registered()?.tcp(), deadline, true).await
    }

    /// Writes all of `data`, waiting for the client to take it if it must.
    pub async fn write_all(&mut self, data: &[u8], deadline: &mut Deadline<'_>) -> io::Result<()> {
        let done = match self {
            ClientSocket::Conn(c) => return write_all(c, data, deadline).await,
            ClientSocket::Raw(s) => {
                let fd = s.as_raw_fd();
                let mut done = 0;
                while done < data.len() {
                    let rest = &data[done..];
                    // SAFETY: rest is valid for rest.len() bytes for the duration of the call.
                    match raw_io(|| unsafe {
                        libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL)
                    }) {
                        Ok(n) => done += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                done
            }
            ClientSocket::Switching => return Err(ErrorKind::NotConnected.into()),
        };
        if done == data.len() {
            return Ok(());
        }
        write_all(self.registered()?, &data[done..], deadline).await
    }

    /// Writes the last bytes of the connection: on a socket not yet registered, with MSG_MORE,
    /// so that they stay queued until the close() that follows and leave with its FIN in one
    /// segment (one packet less per `Connection: close` request for both ends to process).
    pub async fn write_last(&mut self, data: &[u8], deadline: &mut Deadline<'_>) -> io::Result<()> {
        let ClientSocket::Raw(s) = self else {
            return self.write_all(data, deadline).await;
        };
        let fd = s.as_raw_fd();
        let flags = libc::MSG_MORE | libc::MSG_NOSIGNAL;
        // SAFETY: data is valid for data.len() bytes for the duration of the call.
        let sent =
            match raw_io(|| unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), flags) }) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
        if sent == data.len() {
            return Ok(());
        }
        self.write_all(&data[sent..], deadline).await
    }

    /// Ends the sending direction (TLS: close_notify, then FIN).
    pub fn shutdown_write(&mut self) {
        match self {
            ClientSocket::Conn(c) => c.shutdown_write(),
            // SAFETY: shutdown on a socket we own; failure (peer gone) is harmless.
            _ => unsafe {
                libc::shutdown(self.fd(), libc::SHUT_WR);
            },
        }
    }
}

/// A raw read or write: EINTR retried, EAGAIN as WouldBlock.
fn raw_io(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
