//! L4 (TCP) proxying: pick a backend, connect (retrying on the next backend), relay both ways.

pub mod forward;
pub mod pipe;

use crate::balance::{hash_key, BackendState, Pool};
use crate::config::HashKey;
use crate::engine::ListenerEntry;
use crate::worker::WorkerCtx;
use forward::RelayEnd;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// Most backends one connection tries (the config caps `retries` at 10).
const MAX_TRIES: usize = 16;

/// Serves one accepted client connection to the end.
pub async fn serve(
    ctx: &WorkerCtx,
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerEntry>,
) {
    let stats = &listener.stats;
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let pool = &listener.pool;
    let Some((backend, upstream)) = connect_backend(pool, peer).await else {
        stats.dropped_no_backend.fetch_add(1, Relaxed);
        return;
    };
    let idle = Duration::from_millis(listener.cfg.client_idle_ms);
    let result = forward::relay(&ctx.relay, &client, &upstream, idle).await;
    let moved = match result {
        Ok(moved) => moved,
        Err((end, moved)) => {
            if let RelayEnd::Error(e) = &end {
                if e.kind() == io::ErrorKind::ConnectionReset {
                    backend.counters.failures_reset.fetch_add(1, Relaxed);
                }
            }
            moved
        }
    };
    backend.release();
    let lifetime = started.elapsed();
    backend.observe_latency(lifetime.as_nanos() as u64);
    stats.bytes_in.fetch_add(moved.upstream, Relaxed);
    stats.bytes_out.fetch_add(moved.downstream, Relaxed);
    backend
        .counters
        .bytes_in
        .fetch_add(moved.downstream, Relaxed);
    backend
        .counters
        .bytes_out
        .fetch_add(moved.upstream, Relaxed);
    stats
        .duration_us_sum
        .fetch_add(lifetime.as_micros() as u64, Relaxed);
    stats.duration_count.fetch_add(1, Relaxed);
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
async fn connect_backend(pool: &Pool, peer: SocketAddr) -> Option<(&Arc<BackendState>, TcpStream)> {
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
        match tokio::time::timeout(connect_timeout, connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                backend.observe_latency(t0.elapsed().as_nanos() as u64);
                backend.counters.connections_total.fetch_add(1, Relaxed);
                return Some((backend, stream));
            }
            Ok(Err(_)) => backend.counters.failures_connect.fetch_add(1, Relaxed),
            Err(_) => backend.counters.failures_timeout.fetch_add(1, Relaxed),
        };
        backend.release();
    }
    None
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

#[cfg(test)]
mod size_probe {
    #[test]
    fn print_sizes() {
        use super::*;
        fn size<F: std::future::Future>(_: &F) -> usize { std::mem::size_of::<F>() }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (b, _) = l.accept().await.unwrap();
            let bufs = forward::RelayBuffers::new(16384);
            let f = forward::relay(&bufs, &a, &b, Duration::from_secs(1));
            eprintln!("relay future: {}", size(&f));
            let pool_cfg: crate::config::PoolConfig = serde_json::from_str(r#"{"name":"p","algorithm":"round_robin","backends":[],"timeouts":{"connect_ms":1,"read_ms":1,"send_ms":1,"idle_ms":1}}"#).unwrap();
            let pool = Pool::build(&pool_cfg, vec![]);
            let c = connect_backend(&pool, "1.2.3.4:5".parse().unwrap());
            eprintln!("connect future: {}", size(&c));
        });
    }
}
