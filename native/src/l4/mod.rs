//! L4 (TCP) proxying: pick a backend, connect (retrying on the next backend), relay both ways.

pub mod forward;
pub mod passthrough;
pub mod pipe;

use crate::accesslog::Line;
use crate::balance::{hash_key, BackendState, Pool};
use crate::config::{HashKey, MAX_TRIES};
use crate::metrics::ResponseKey;
use crate::net::relay::copy_relay;
use crate::net::{connect, server_name, tls_handshake, write_first, Conn};
use crate::tables::ListenerEntry;
use crate::worker::WorkerCtx;
use forward::RelayEnd;
use passthrough::Chosen;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::Sleep;

/// Serves one accepted client connection to the end.
pub async fn serve(ctx: &WorkerCtx, mut client: Conn, peer: SocketAddr, listener: &ListenerEntry) {
    let started = Instant::now();
    // TCP_NODELAY is inherited from the listening socket: no setsockopt per connection.
    // SNI passthrough: the pool named by the ClientHello, whose bytes go to the backend first.
    let mut hello = Vec::new();
    let mut chosen = None;
    if let Some(routes) = &listener.sni {
        let limit = Duration::from_millis(listener.cfg.header_read_ms);
        match Box::pin(passthrough::choose(&mut client, routes, limit)).await {
            Chosen::Pool(pool, bytes) => (chosen, hello) = (pool, bytes),
            Chosen::Refused => {
                ctx.metrics.borrow_mut().record_bad_request(listener.id);
                return;
            }
        }
    }
    let pool = chosen.as_ref().unwrap_or(&listener.pool);
    // The connection's one timer: connect timeout first, then the idle timeout.
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let proxy_header = pool
        .send_proxy
        .map(|version| proxy_header_for(version, &client, peer));
    let Some((backend, mut upstream, connect_us)) =
        connect_backend(ctx, pool, peer, proxy_header.as_deref(), timer.as_mut()).await
    else {
        ctx.metrics.borrow_mut().record_no_backend(listener.id);
        return;
    };
    if !hello.is_empty() {
        // A new socket's send buffer takes a ClientHello whole: no wait to bound.
        if upstream.write_all_flushed(&hello).await.is_err() {
            backend.fail_reset();
            backend.release();
            return;
        }
    }
    drop(hello);
    let idle = Duration::from_millis(listener.cfg.client_idle_ms);
    let _tracked = crate::track::upstream(upstream.fd(), client.fd(), backend);
    // Matched here rather than through net::relay::relay, so that the plain relay's future is
    // this task's only large state (idle RSS per connection is a target).
    let relayed = match (&mut client, &mut upstream) {
        (Conn::Plain(c), Conn::Plain(u)) => forward::relay(&ctx.relay, c, u, idle, timer).await,
        (c, u) => Box::pin(copy_relay(&ctx.relay, c, u, idle, timer)).await,
    };
    let moved = match relayed {
        Ok(moved) => {
            backend.record_success();
            moved
        }
        Err((end, moved)) => {
            match &end {
                RelayEnd::Error(_) if peer_failed(upstream.fd()) => backend.fail_reset(),
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
            .str("protocol", listener.cfg.protocol.name().as_bytes())
            .str("pool", pool.name.as_bytes())
            .str("backend", backend.address.as_bytes())
            .display("bytes_in", moved.upstream)
            .display("bytes_out", moved.downstream)
            .ms("duration_ms", Some(lifetime))
            .ms("connect_ms", Some(connect_us));
        if let Conn::Tls(tls) = &client {
            if let tokio_rustls::TlsStream::Server(t) = &**tls {
                crate::tls::SessionInfo::of(t.get_ref().1).log_fields(&mut line);
            }
        }
        log.send(line.finish());
    }
}

/// After a relay error, whether the backend's side is the one that failed (a reset or closed
/// socket) rather than the client's: only then does it count toward passive ejection. One peek,
/// on the error path only.
fn peer_failed(upstream: RawFd) -> bool {
    let mut probe = [0u8; 1];
    // SAFETY: probe is valid for 1 byte; MSG_PEEK leaves the socket's data as it is.
    let n = unsafe {
        libc::recv(
            upstream,
            probe.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
}

/// The key a hashing algorithm uses for a TCP connection: only the source IP exists at L4
/// (the config refuses other hash keys on tcp listeners).
pub(crate) fn connection_key(pool: &Pool, peer: SocketAddr) -> u64 {
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
    proxy_header: Option<&[u8]>,
    mut timer: Pin<&mut Sleep>,
) -> Option<(&'p Arc<BackendState>, Conn, u64)> {
    let key = connection_key(pool, peer);
    let connect_timeout = Duration::from_millis(pool.timeouts.connect_ms.max(1));
    let mut tried = [u32::MAX; MAX_TRIES];
    let tries = (pool.retries as usize + 1).min(MAX_TRIES);
    for n in 0..tries {
        let i = pool.select(key, &tried[..n])?;
        tried[n] = i as u32;
        let backend = &pool.backends[i];
        backend.acquire();
        let t0 = Instant::now();
        timer.as_mut().reset((t0 + connect_timeout).into());
        let tcp = connect(pool.settings[i].addr, timer.as_mut()).await;
        let tcp = match (tcp, proxy_header) {
            // first on the connection, before a TLS handshake to the backend; a new socket's
            // send buffer takes the ~100 bytes whole
            (Ok(tcp), Some(header)) => write_first(tcp, header).await,
            (tcp, _) => tcp,
        };
        let connected = match (tcp, &pool.tls) {
            (Ok(tcp), Some(tls)) => match tls.sni.clone().or_else(|| server_name(&backend.address))
            {
                // Boxed: only TLS pools pay for the handshake's future.
                Some(name) => Box::pin(tls_handshake(tls, name, tcp, timer.as_mut())).await,
                None => Err(io::ErrorKind::InvalidInput.into()),
            },
            (connected, _) => connected.map(Conn::Plain),
        };
        match connected {
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

/// The PROXY header naming `peer`, who connected to this listener; with the TLS facts of a
/// session fastlb terminated (v2).
fn proxy_header_for(
    version: crate::config::ProxyVersion,
    client: &Conn,
    peer: SocketAddr,
) -> Vec<u8> {
    let local = client
        .tcp()
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let session = match client {
        Conn::Tls(tls) => match &**tls {
            tokio_rustls::TlsStream::Server(s) => Some(crate::tls::SessionInfo::of(s.get_ref().1)),
            tokio_rustls::TlsStream::Client(_) => None,
        },
        Conn::Plain(_) => None,
    };
    let tlvs = session.as_ref().map(crate::tls::SessionInfo::proxy_tlvs);
    crate::net::proxy_header::encode(version, peer, local, tlvs.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l4::forward::RelayBuffers;
    use std::future::Future;
    use tokio::net::TcpStream;

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
