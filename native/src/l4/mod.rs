//! L4 (TCP) proxying: pick a backend, connect (retrying on the next backend), relay both ways.

pub mod forward;
pub mod pipe;

use crate::accesslog::Line;
use crate::balance::{hash_key, BackendState, Pool};
use crate::config::{HashKey, MAX_TRIES};
use crate::metrics::ResponseKey;
use crate::tables::ListenerEntry;
use crate::worker::WorkerCtx;
use forward::RelayEnd;
use socket2::{Domain, Protocol, Socket, Type};
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Serves one accepted client connection to the end.
pub async fn serve(ctx: &WorkerCtx, client: TcpStream, peer: SocketAddr, listener: &ListenerEntry) {
    let started = Instant::now();
    // TCP_NODELAY is inherited from the listening socket: no setsockopt per connection.
    let pool = &listener.pool;
    // The connection's one timer: connect timeout first, then the idle timeout.
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let Some((backend, upstream, connect_us)) =
        connect_backend(ctx, pool, peer, timer.as_mut()).await
    else {
        ctx.metrics.borrow_mut().record_no_backend(listener.id);
        return;
    };
    let idle = Duration::from_millis(listener.cfg.client_idle_ms);
    let _tracked = crate::track::upstream(upstream.as_raw_fd(), client.as_raw_fd(), backend);
    let moved = match forward::relay(&ctx.relay, &client, &upstream, idle, timer).await {
        Ok(moved) => {
            backend.record_success();
            moved
        }
        Err((end, moved)) => {
            match &end {
                RelayEnd::Error(_) if peer_failed(&upstream) => backend.fail_reset(),
                _ => backend.record_success(),
            }
            moved
        }
    };
    backend.release();
    let lifetime = started.elapsed().as_micros() as u64;
    let mut metrics = ctx.metrics.borrow_mut();
    metrics.record_bytes(listener.id, backend.slot, moved.upstream, moved.downstream);
    metrics.record_done(
        ResponseKey {
            listener: listener.id,
            pool: pool.id,
            backend: backend.slot,
            code: 0,
        },
        lifetime,
    );
    drop(metrics);
    if let Some(log) = ctx.shared.access_log.load().as_ref() {
        let mut line = Line::new();
        line.time()
            .quoted("client", peer)
            .str("listener", listener.cfg.name.as_bytes())
            .str("protocol", b"tcp")
            .str("pool", pool.name.as_bytes())
            .str("backend", backend.address.as_bytes())
            .display("bytes_in", moved.upstream)
            .display("bytes_out", moved.downstream)
            .ms("duration_ms", Some(lifetime))
            .ms("connect_ms", Some(connect_us));
        log.send(line.finish());
    }
}

/// After a relay error, whether the backend's side is the one that failed (a reset or closed
/// socket) rather than the client's: only then does it count toward passive ejection. One peek,
/// on the error path only.
fn peer_failed(upstream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    // SAFETY: probe is valid for 1 byte; MSG_PEEK leaves the socket's data as it is.
    let n = unsafe {
        libc::recv(
            upstream.as_raw_fd(),
            probe.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
}

/// The key a hashing algorithm uses for a TCP connection: only the source IP exists at L4
/// (the config refuses other hash keys on tcp listeners).
fn connection_key(pool: &Pool, peer: SocketAddr) -> u64 {
    match (&pool.hash_key, peer.ip()) {
        (HashKey::SourceIp, IpAddr::V4(ip)) => hash_key(&ip.octets()),
        (HashKey::SourceIp, IpAddr::V6(ip)) => hash_key(&ip.octets()),
        _ => 0,
    }
}

/// Picks and connects to a backend, moving on to the next one on a connect error or timeout,
/// up to `retries` more, before the client has been sent anything. The returned backend has
/// been `acquire`d; the caller releases it.
async fn connect_backend<'p>(
    ctx: &WorkerCtx,
    pool: &'p Pool,
    peer: SocketAddr,
    mut timer: Pin<&mut Sleep>,
) -> Option<(&'p Arc<BackendState>, TcpStream, u64)> {
    let key = connection_key(pool, peer);
    let connect_timeout = Duration::from_millis(pool.timeouts.connect_ms.max(1));
    let mut tried = [usize::MAX; MAX_TRIES];
    let tries = (pool.retries as usize + 1).min(MAX_TRIES);
    for n in 0..tries {
        let i = pool.select(key, &tried[..n])?;
        tried[n] = i;
        let backend = &pool.backends[i];
        backend.acquire();
        let t0 = Instant::now();
        timer.as_mut().reset((t0 + connect_timeout).into());
        match connect(pool.settings[i].addr, timer.as_mut()).await {
            Ok(stream) => {
                let took = t0.elapsed();
                backend.observe_latency(took.as_nanos() as u64);
                ctx.metrics
                    .borrow_mut()
                    .record_backend_connect(backend.slot);
                return Some((backend, stream, took.as_micros() as u64));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => backend.fail_timeout(),
            Err(_) => backend.fail_connect(),
        }
        backend.release();
    }
    None
}

/// A non-blocking connect that completes when the socket turns writable or fails with
/// `TimedOut` when `timer` fires first. Written against `poll_write_ready` rather than tokio's
/// `TcpSocket::connect` to keep the connection's future small (its own timer would double it).
pub(crate) async fn connect(addr: SocketAddr, mut timer: Pin<&mut Sleep>) -> io::Result<TcpStream> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l4::forward::RelayBuffers;

    fn size_of_future<F: Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Idle RSS per connection is a target (<= 2 KB with both sockets): the relay's and the
    /// connect step's futures are what each connection's task holds beside its two sockets.
    #[test]
    fn per_connection_futures_stay_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (b, _) = listener.accept().await.unwrap();
            let bufs = RelayBuffers::new(16384);
            let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
            let relay = forward::relay(&bufs, &a, &b, Duration::from_secs(1), timer.as_mut());
            assert!(
                size_of_future(&relay) <= 256,
                "relay future: {}",
                size_of_future(&relay)
            );
            drop(relay);
            let conn = connect(listener.local_addr().unwrap(), timer.as_mut());
            assert!(
                size_of_future(&conn) <= 256,
                "connect future: {}",
                size_of_future(&conn)
            );
        });
    }
}
