//! HTTP/2, both sides, on the h2 crate (hyper's): the client session (`server`: h2 by ALPN on
//! https listeners, h2c with prior knowledge on http listeners), the upstream (`client`:
//! multiplexed connections to `http_version = "2"` pools), the translation of heads to and
//! from HTTP/1.1 (`headers`), gRPC's specifics (`grpc`), and the socket under it all with its
//! flood meter (`io`).
//!
//! Flow control: streams start with a 1 MiB window and connections with 16 MiB, so a fast link
//! is never throttled by the protocol's 64 KiB default (hyper users' downloads took minutes
//! with it); capacity is given back as bytes are forwarded, so a slow reader on one side holds
//! the other side back instead of filling fastlb's memory.

pub mod client;
pub mod grpc;
pub mod headers;
pub mod io;
pub mod server;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use std::future::poll_fn;
use std::time::Duration;
use tokio::sync::Notify;

pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Bytes a stream may have queued for sending beyond what the peer's window takes.
pub const SEND_BUFFER: usize = 256 * 1024;

/// What one worker keeps for HTTP/2.
#[derive(Default)]
pub struct H2Worker {
    pub upstreams: client::H2Upstreams,
    /// Signalled when a listener is removed or a stop begins: sessions send GOAWAY.
    pub goaway: Notify,
}

/// Sends all of `data` on `stream` as the peer's window allows; Err when the stream was reset,
/// or the peer left it without window for `stall` (a stalled zero-window reader).
pub async fn send_all(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    stall: Duration,
) -> Result<(), ()> {
    if data.is_empty() {
        return stream.send_data(data, end).map_err(|_| ());
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = tokio::time::timeout(stall, poll_fn(|cx| stream.poll_capacity(cx))).await;
        let n = match granted {
            Ok(Some(Ok(n))) if n > 0 => n,
            _ => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(());
            }
        };
        let chunk = data.split_to(n.min(data.len()));
        stream
            .send_data(chunk, end && data.is_empty())
            .map_err(|_| ())?;
    }
    Ok(())
}

/// The next DATA of a stream; Ok(None) at its end.
pub async fn recv_chunk(recv: &mut RecvStream) -> Result<Option<Bytes>, h2::Error> {
    recv.data().await.transpose()
}
