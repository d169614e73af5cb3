//! SNI passthrough: a tcp listener with `sni` routes reads the client's ClientHello without
//! decrypting it, picks the pool by its server name, and replays the bytes to the backend
//! before splicing the rest.

use crate::balance::Pool;
use crate::config::RouteConfig;
use crate::net::Conn;
use crate::tls::client_hello::{peek_sni, Peek};
use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

/// Most bytes read while looking for the end of a ClientHello (one with post-quantum key shares
/// is ~1.8 KB; 16 KiB is a full TLS record).
pub const MAX_HELLO: usize = 16 * 1024;

/// A tcp listener's routes by SNI: exact names, then `*.parent` wildcards (one label), in
/// config order for equal names.
pub struct SniRoutes {
    exact: HashMap<String, Arc<Pool>>,
    wildcard: HashMap<String, Arc<Pool>>,
}

impl SniRoutes {
    pub fn build(
        routes: &[RouteConfig],
        pools: &HashMap<String, Arc<Pool>>,
    ) -> Result<SniRoutes, String> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let Some(sni) = r.sni.as_deref() else {
                return Err(format!("route {i}: a tcp listener's routes need sni"));
            };
            let Some(pool) = r.split.first().and_then(|s| pools.get(&s.pool)) else {
                return Err(format!("route {i}: no pool"));
            };
            let sni = sni.to_ascii_lowercase();
            match sni.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_string()),
                None => exact.entry(sni),
            }
            .or_insert_with(|| pool.clone());
        }
        Ok(SniRoutes { exact, wildcard })
    }

    pub fn find(&self, sni: &str) -> Option<&Arc<Pool>> {
        let name = sni.to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        self.exact.get(name).or_else(|| {
            name.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        })
    }
}

/// What the peek decided.
pub enum Chosen {
    /// The pool (None: the listener's) and the bytes read, to be sent to the backend first.
    Pool(Option<Arc<Pool>>, Vec<u8>),
    /// Malformed or oversized TLS, a timeout, or the client left: close.
    Refused,
}

/// Reads until the ClientHello is whole (or is not one), within `timeout`.
pub async fn choose(client: &mut Conn, routes: &SniRoutes, timeout: Duration) -> Chosen {
    let mut hello = Vec::with_capacity(2048);
    let read = async {
        loop {
            let have = hello.len();
            if hello.capacity() == have {
                hello.reserve(have);
            }
            let spare = hello.spare_capacity_mut().len().min(MAX_HELLO - have);
            hello.resize(have + spare, 0);
            let n = poll_fn(|cx| client.poll_read(cx, &mut hello[have..])).await;
            hello.truncate(have + *n.as_ref().unwrap_or(&0));
            match n {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let pool = match peek_sni(&hello, MAX_HELLO) {
                Peek::NeedMore => continue,
                Peek::Sni(name) => routes.find(name.as_str()).cloned(),
                // A name no route can match is as good as none.
                Peek::NotTls | Peek::NoSni | Peek::InvalidSni => None,
                Peek::TooLarge | Peek::Malformed => return None,
            };
            return Some(pool);
        }
    };
    // No header_read limit: still bounded, a ClientHello comes first or not at all.
    let timeout = if timeout.is_zero() {
        Duration::from_secs(60)
    } else {
        timeout
    };
    let pool = match tokio::time::timeout(timeout, read).await {
        Ok(Some(pool)) => pool,
        Ok(None) | Err(_) => return Chosen::Refused,
    };
    Chosen::Pool(pool, hello)
}
