//! Connecting to a backend: non-blocking, within the connection's one timer.

use socket2::{Domain, Protocol, Socket, Type};
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::Conn;
use crate::tls::client::PoolTls;
use rustls::pki_types::ServerName;

/// A non-blocking connect that completes when the socket turns writable or fails with
/// `TimedOut` when `timer` fires first. Written against `poll_write_ready` rather than tokio's
/// `TcpSocket::connect` to keep the connection's future small (its own timer would double it).
pub async fn connect(addr: SocketAddr, mut timer: Pin<&mut Sleep>) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    poll_fn(|cx| {
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        stream.poll_write_ready(cx)
    })
    .await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// The client side of a TLS handshake on a connected socket, within the same `timer` as the
/// connect (a pool's `timeouts.connect` covers both). A certificate that does not verify is an
/// error like a refused connection.
pub async fn tls_handshake(
    tls: &PoolTls,
    name: ServerName<'static>,
    tcp: TcpStream,
    mut timer: Pin<&mut Sleep>,
) -> io::Result<Conn> {
    // Boxed: a handshake's state is ~1 KB, and the plain connect path should not carry it.
    let mut handshake = Box::pin(tls.connector.connect(name, tcp));
    poll_fn(|cx| {
        if let Poll::Ready(r) = handshake.as_mut().poll(cx) {
            return Poll::Ready(r.map(|s| Conn::Tls(Box::new(s.into()))));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        Poll::Pending
    })
    .await
}

/// The name a backend's certificate is checked against when the pool gives none: the host of
/// `host:port` (a DNS name or an IP address).
pub fn server_name(host_port: &str) -> Option<ServerName<'static>> {
    let host = match host_port.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// Writes `header` (a PROXY header) first on a new backend connection, before any TLS
/// handshake; a new socket's send buffer takes its ~100 bytes whole.
pub async fn write_first(mut tcp: TcpStream, header: &[u8]) -> io::Result<TcpStream> {
    use tokio::io::AsyncWriteExt;
    tcp.write_all(header).await?;
    Ok(tcp)
}
