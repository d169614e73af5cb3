//! The engine: worker threads, the routing tables they read, and the control operations the
//! Python control plane calls (update, stop, backend state, stats).
//!
//! Tables are rebuilt on the calling thread and published with one arc-swap store; workers load
//! them per accepted connection and never wait on a lock. A connection keeps the `Arc<Pool>` it
//! started with, so a reload never changes a connection under its feet.

use crate::accesslog::AccessLog;
use crate::balance::{AdminState, BackendState, Pool};
use crate::config::{
    BackendConfig, EngineConfig, HttpVersion, ListenerConfig, Protocol, SplitConfig,
};
use crate::l4::passthrough::SniRoutes;
use crate::metrics::WorkerMetrics;
use crate::proxy::geo::GeoDb;
use crate::proxy::route::Cidr;
use crate::proxy::HttpListener;
use crate::stats::{Ids, LatencyWindow, StatsInput};
use crate::tables::{ListenerEntry, ProxyAccept, Shared, Tables};
use crate::udp::UdpListener;
use crate::worker::{self, ListenSocket, WorkerCmd};

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a stats snapshot waits for the workers' metrics.
pub const SNAPSHOT_WAIT: Duration = Duration::from_millis(250);

/// Backlog of each listening socket (per worker, like nginx's `listen ... backlog`).
const LISTEN_BACKLOG: i32 = 4096;

/// Errors the control plane gets back.
#[derive(Debug)]
pub enum EngineError {
    /// The JSON did not match the engine's schema (a bug in the control plane, or a caller
    /// bypassing it).
    Config(String),
    /// A listening socket could not be bound: the listener's name, its address, the cause.
    Bind(String, SocketAddr, io::Error),
    /// Something else at the OS level (threads, sockets).
    Io(io::Error),
    /// A pool, backend, listener or route that does not exist.
    NotFound(String),
    /// A runtime change that cannot be made (split weights that do not fit the route).
    Invalid(String),
    /// The engine was stopped.
    Stopped,
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Config(m) => write!(f, "invalid engine config: {m}"),
            EngineError::Bind(name, addr, e) => {
                write!(f, "listeners.{name}: cannot bind {addr}: {e}")
            }
            EngineError::Io(e) => write!(f, "{e}"),
            EngineError::NotFound(m) | EngineError::Invalid(m) => write!(f, "{m}"),
            EngineError::Stopped => write!(f, "engine stopped"),
        }
    }
}

impl From<io::Error> for EngineError {
    fn from(e: io::Error) -> Self {
        EngineError::Io(e)
    }
}

/// A request for every worker's metrics (see `Engine::metrics_request`).
pub struct MetricsRequest {
    workers: Vec<mpsc::UnboundedSender<WorkerCmd>>,
}

impl MetricsRequest {
    /// Asks each worker for a copy of its metrics (it answers between two tasks) and waits up
    /// to `wait` for them all; a worker that does not answer in time is None.
    pub fn collect(&self, wait: Duration) -> Vec<Option<WorkerMetrics>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut fresh = vec![None; self.workers.len()];
        let mut asked = 0;
        for (index, w) in self.workers.iter().enumerate() {
            let reply = tx.clone();
            if w.send(WorkerCmd::Snapshot { index, reply }).is_ok() {
                asked += 1;
            }
        }
        drop(tx);
        let deadline = std::time::Instant::now() + wait;
        for _ in 0..asked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok((index, m)) => fresh[index] = Some(m),
                Err(_) => break,
            }
        }
        fresh
    }
}

struct WorkerHandle {
    commands: mpsc::UnboundedSender<WorkerCmd>,
    thread: Option<JoinHandle<()>>,
}

/// A backend's shared state and what the running config says of it (a reload compares the
/// file's weight with the new one: see `publish`).
struct KnownBackend {
    cfg: BackendConfig,
    state: Arc<BackendState>,
}

pub struct Engine {
    shared: Arc<Shared>,
    workers: Vec<WorkerHandle>,
    config: EngineConfig,
    /// Every backend by id (`pool/address`): the one owner of its runtime state, which lives as
    /// long as a config names the id.
    backends: HashMap<String, KnownBackend>,
    /// Ids the workers count by, per listener, pool and backend name; kept across reloads.
    ids: Ids,
    /// Split weights set at runtime, by (listener, route name): the route's split with the
    /// live weights. Kept across a reload unless the file's split for the route changed.
    split_overrides: HashMap<(String, String), Vec<SplitConfig>>,
    /// Each udp listener's session count, by name; kept across reloads.
    udp_sessions: HashMap<String, Arc<AtomicUsize>>,
    /// Each worker's last metrics snapshot (used when one does not answer in time).
    last_metrics: Vec<WorkerMetrics>,
    window: LatencyWindow,
    /// A copy of every listening socket, by listener name (see `handover`).
    listen_fds: HashMap<String, Vec<OwnedFd>>,
    stopped: bool,
}

/// Whether the data plane serves: every worker thread alive and every listener listening.
pub struct ServingProbe {
    shared: Arc<Shared>,
    workers: usize,
}

impl ServingProbe {
    pub fn serving(&self) -> bool {
        self.shared.listening.load(Relaxed)
            && self.shared.live_workers.load(Relaxed) == self.workers
    }
}

/// What a binary upgrade hands over: the old process's listening sockets by listener name, and
/// its TLS ticket keys (so tickets it issued still resume).
#[derive(Default)]
pub struct Inherited {
    pub sockets: HashMap<String, Vec<OwnedFd>>,
    pub ticket_keys: Option<Vec<u8>>,
}

impl Engine {
    /// Binds every listener, starts the workers and begins serving. Listening sockets and
    /// ticket keys in `inherited` (a binary upgrade's) are taken over where they fit.
    pub fn start(config: EngineConfig, mut inherited: Inherited) -> Result<Engine, EngineError> {
        let n = config.runtime.workers;
        let mut sockets = Vec::new();
        for l in &config.listeners {
            let taken = inherited.sockets.remove(&l.name).unwrap_or_default();
            sockets.push((l.name.clone(), bind_listener(l, n, taken)?));
        }
        // Sockets of listeners this config no longer has close here; the old process's
        // copies close when it exits, as a reload would close them.
        drop(inherited.sockets);
        let shared = Shared::new(
            config.runtime.max_connections,
            inherited.ticket_keys.as_deref(),
        )
        .map_err(EngineError::Config)?;
        let mut engine = Engine {
            shared: Arc::new(shared),
            listen_fds: HashMap::new(),
            workers: Vec::with_capacity(n),
            config: config.clone(),
            backends: HashMap::new(),
            ids: Ids::default(),
            split_overrides: HashMap::new(),
            udp_sessions: HashMap::new(),
            last_metrics: vec![WorkerMetrics::default(); n],
            window: LatencyWindow::default(),
            stopped: false,
        };
        engine.publish(&config)?;
        engine.set_access_log(config.access_log.as_deref())?;
        for index in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let cpu = (!config.runtime.cpus.is_empty())
                .then(|| config.runtime.cpus[index % config.runtime.cpus.len()]);
            let shared = engine.shared.clone();
            engine.shared.live_workers.fetch_add(1, Relaxed);
            let thread = std::thread::Builder::new()
                .name(format!("fastlb-worker-{index}"))
                .spawn(move || worker::run(index, cpu, shared, rx))
                .inspect_err(|_| {
                    engine.shared.live_workers.fetch_sub(1, Relaxed);
                })?;
            engine.workers.push(WorkerHandle {
                commands: tx,
                thread: Some(thread),
            });
        }
        for (name, per_worker) in sockets {
            engine.listen(&name, per_worker);
        }
        engine.note_listening();
        Ok(engine)
    }

    /// Applies a new configuration: listeners that stay keep their sockets (no connection is
    /// refused during a reload), new ones are bound first (so a bind error changes nothing),
    /// removed ones stop accepting while their connections finish. `runtime` cannot change.
    pub fn update(&mut self, config: EngineConfig) -> Result<(), EngineError> {
        if self.stopped {
            return Err(EngineError::Stopped);
        }
        let n = self.workers.len();
        let mut new_sockets = Vec::new();
        for l in &config.listeners {
            let same = self.config.listeners.iter().any(|old| same_socket(old, l));
            if !same {
                new_sockets.push((l.name.clone(), bind_listener(l, n, Vec::new())?));
            }
        }
        let removed: Vec<String> = self
            .config
            .listeners
            .iter()
            .filter(|old| !config.listeners.iter().any(|l| same_socket(old, l)))
            .map(|old| old.name.clone())
            .collect();
        let before = self.shared.tables.load_full();
        let kept = self.kept_overrides(&config);
        let live = with_overrides(&config, &kept);
        self.publish(&live)?;
        self.split_overrides = kept;
        if let Err(e) = self.set_access_log(config.access_log.as_deref()) {
            // The new tables are in; only the log target could not change.
            eprintln!("fastlb: access log: {e}");
        }
        for name in removed {
            if let Some(entry) = before.listeners.get(&name) {
                entry.closing.store(true, Relaxed);
            }
            if !new_sockets.iter().any(|(n, _)| *n == name) {
                self.broadcast(|| WorkerCmd::Unlisten { name: name.clone() });
                self.listen_fds.remove(&name);
            }
        }
        for (name, per_worker) in new_sockets {
            self.listen(&name, per_worker);
        }
        self.config = config;
        self.note_listening();
        Ok(())
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then closes the rest.
    /// Blocks until every worker has ended.
    pub fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // Without this process's copies, a socket nobody else holds closes with its accept
        // loops: clients are refused rather than left in a queue no one serves.
        self.listen_fds.clear();
        self.shared.listening.store(false, Relaxed);
        for w in &self.workers {
            let _ = w.commands.send(WorkerCmd::Stop { grace });
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        // Every line is written before stop returns.
        drop(self.shared.access_log.swap(None));
    }

    /// Every listening socket by listener name, and the TLS ticket keys: what a binary upgrade
    /// hands to the new process. The fds stay this engine's (the caller sends copies).
    pub fn handover(&self) -> (Vec<(String, Vec<RawFd>)>, Vec<u8>) {
        let fds = self
            .listen_fds
            .iter()
            .map(|(name, fds)| (name.clone(), fds.iter().map(|f| f.as_raw_fd()).collect()))
            .collect();
        (fds, self.shared.tls.export_ticket_keys())
    }

    /// What `/healthz` asks, answerable without this engine's lock (a stop holds it while
    /// it drains).
    pub fn serving_probe(&self) -> ServingProbe {
        ServingProbe {
            shared: self.shared.clone(),
            workers: self.workers.len(),
        }
    }

    /// Records whether every listener of the running config has its sockets.
    fn note_listening(&self) {
        let all = self
            .config
            .listeners
            .iter()
            .all(|l| self.listen_fds.get(&l.name).is_some_and(|f| !f.is_empty()));
        self.shared.listening.store(all && !self.stopped, Relaxed);
    }

    /// Client connections open now, process-wide.
    pub fn open_connections(&self) -> usize {
        self.shared.connections.load(Relaxed)
    }

    /// The shared state of backend `address` in `pool`.
    pub fn backend(&self, pool: &str, address: &str) -> Result<&Arc<BackendState>, EngineError> {
        self.known(pool, address).map(|b| &b.state)
    }

    fn known(&self, pool: &str, address: &str) -> Result<&KnownBackend, EngineError> {
        if !self.config.pools.iter().any(|p| p.name == pool) {
            return Err(EngineError::NotFound(format!("unknown pool '{pool}'")));
        }
        self.backends
            .get(&format!("{pool}/{address}"))
            .ok_or_else(|| {
                EngineError::NotFound(format!("pool '{pool}' has no backend '{address}'"))
            })
    }

    /// Changes a backend's weight live; tables built from weights (round robin sequence, rings,
    /// maglev) are rebuilt off the workers and swapped in.
    pub fn set_weight(
        &mut self,
        pool: &str,
        address: &str,
        weight: u32,
    ) -> Result<(), EngineError> {
        self.backend(pool, address)?.set_weight(weight.min(1000));
        let live = with_overrides(&self.config, &self.split_overrides);
        self.publish(&live)
    }

    /// Sets the live weights of split route `route` (its name) of `listener`: one weight per
    /// pool of the route's split, each 0..=1000, not all 0. Applies to the next request on
    /// every worker (new tables are published).
    pub fn set_split_weights(
        &mut self,
        listener: &str,
        route: &str,
        weights: &[(String, u32)],
    ) -> Result<(), EngineError> {
        let split = self.split_of(listener, route)?;
        let mut names: Vec<&str> = split.iter().map(|s| s.pool.as_str()).collect();
        let mut given: Vec<&str> = weights.iter().map(|(p, _)| p.as_str()).collect();
        names.sort_unstable();
        given.sort_unstable();
        if names != given {
            return Err(EngineError::Invalid(format!(
                "weights: give one for each pool of the split, and only those: {}",
                names.join(", ")
            )));
        }
        if let Some((p, w)) = weights.iter().find(|(_, w)| *w > 1000) {
            return Err(EngineError::Invalid(format!(
                "weights.{p}: {w} is above 1000"
            )));
        }
        if weights.iter().all(|(_, w)| *w == 0) {
            return Err(EngineError::Invalid(
                "weights: at least one pool needs a weight above 0".into(),
            ));
        }
        let live: Vec<SplitConfig> = split
            .iter()
            .map(|s| SplitConfig {
                pool: s.pool.clone(),
                weight: weights
                    .iter()
                    .find(|(p, _)| *p == s.pool)
                    .map_or(0, |(_, w)| *w),
            })
            .collect();
        let mut overrides = self.split_overrides.clone();
        overrides.insert((listener.to_string(), route.to_string()), live);
        self.publish(&with_overrides(&self.config, &overrides))?;
        self.split_overrides = overrides;
        Ok(())
    }

    /// The file's split of a route, or why there is none.
    fn split_of(&self, listener: &str, route: &str) -> Result<&[SplitConfig], EngineError> {
        let l = self
            .config
            .listeners
            .iter()
            .find(|l| l.name == listener)
            .ok_or_else(|| EngineError::NotFound(format!("unknown listener '{listener}'")))?;
        let r = l.routes.iter().find(|r| r.name == route).ok_or_else(|| {
            EngineError::NotFound(format!("listener '{listener}' has no route '{route}'"))
        })?;
        if r.redirect.is_some() || !l.protocol.is_http() {
            return Err(EngineError::Invalid(format!(
                "route '{route}' of listener '{listener}' has no split (a redirect or an SNI route)"
            )));
        }
        Ok(&r.split)
    }

    /// The runtime split weights a reload to `new` keeps: those of routes whose split is the
    /// same in the running file and in the new one (else the file wins, as for backend weights).
    fn kept_overrides(&self, new: &EngineConfig) -> HashMap<(String, String), Vec<SplitConfig>> {
        let split = |config: &EngineConfig, (l, r): &(String, String)| {
            config
                .listeners
                .iter()
                .find(|x| x.name == *l)
                .and_then(|x| x.routes.iter().find(|y| y.name == *r))
                .filter(|y| y.redirect.is_none())
                .map(|y| y.split.clone())
        };
        self.split_overrides
            .iter()
            .filter(|(key, _)| {
                let old = split(&self.config, key);
                old.is_some() && old == split(new, key)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Sets a backend's admin state. Draining or disabling also closes the workers' parked
    /// keep-alive connections to it, so a drained backend really has no connections left.
    pub fn set_admin(
        &self,
        pool: &str,
        address: &str,
        state: AdminState,
    ) -> Result<(), EngineError> {
        let known = self.known(pool, address)?;
        known.state.set_admin(state);
        if state != AdminState::Enabled {
            let addr = known.cfg.addr;
            self.broadcast(|| WorkerCmd::DropIdle { addr });
        }
        Ok(())
    }

    /// Slow start: the share of its weight a backend gets now, in per mille.
    pub fn set_weight_scale(
        &self,
        pool: &str,
        address: &str,
        per_mille: u32,
    ) -> Result<(), EngineError> {
        self.backend(pool, address)?.set_weight_scale(per_mille);
        Ok(())
    }

    /// Closes every connection to a backend (a drain that reached its timeout). Returns at
    /// once; the workers close them as they handle the command.
    pub fn close_backend(&self, pool: &str, address: &str) -> Result<(), EngineError> {
        let known = self.known(pool, address)?;
        self.broadcast(|| WorkerCmd::CloseBackend {
            backend: known.state.clone(),
            addr: known.cfg.addr,
        });
        Ok(())
    }

    /// Ids (`pool/address`) of the backends passive detection ejected since the last call.
    pub fn take_ejected(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .backends
            .values()
            .filter(|b| b.state.take_ejected())
            .map(|b| b.state.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Starts, changes or stops the access log writer.
    fn set_access_log(&self, target: Option<&str>) -> Result<(), EngineError> {
        let current = self.shared.access_log.load();
        if current.as_deref().map(|l| l.target.as_str()) == target {
            return Ok(());
        }
        let new = match target {
            Some(t) => Some(Arc::new(AccessLog::open(t).map_err(|e| {
                EngineError::Config(format!("log.access_log: cannot open {t}: {e}"))
            })?)),
            None => None,
        };
        // The old writer (if any) flushes and ends when its last user lets go.
        drop(self.shared.access_log.swap(new));
        Ok(())
    }

    pub fn reopen_access_log(&self) {
        if let Some(log) = self.shared.access_log.load().as_ref() {
            log.reopen();
        }
    }

    fn broadcast(&self, cmd: impl Fn() -> WorkerCmd) {
        for w in &self.workers {
            let _ = w.commands.send(cmd());
        }
    }

    /// What a stats snapshot asks of the workers; collected without holding the engine, so
    /// the control plane's other calls never wait for a worker to answer.
    pub fn metrics_request(&self) -> MetricsRequest {
        MetricsRequest {
            workers: self.workers.iter().map(|w| w.commands.clone()).collect(),
        }
    }

    /// A JSON snapshot of every listener, pool and backend: the workers' metrics merged, with
    /// `fresh` (from `MetricsRequest::collect`) replacing each worker's last answer where it
    /// has one.
    pub fn stats_json(&mut self, fresh: Vec<Option<WorkerMetrics>>) -> String {
        for (last, m) in self.last_metrics.iter_mut().zip(fresh) {
            if let Some(m) = m {
                *last = m;
            }
        }
        let mut merged = WorkerMetrics::default();
        for m in &self.last_metrics {
            merged.merge(m);
        }
        let tables = self.shared.tables.load();
        let connections_active = self.open_connections();
        crate::stats::to_json(StatsInput {
            tables: &tables,
            listener_order: self
                .config
                .listeners
                .iter()
                .map(|l| l.name.as_str())
                .collect(),
            pool_order: self.config.pools.iter().map(|p| p.name.as_str()).collect(),
            ids: &self.ids,
            configured: &self.config,
            merged: &merged,
            window: &mut self.window,
            connections_active,
            log_dropped: self
                .shared
                .access_log
                .load()
                .as_ref()
                .map_or(0, |l| l.dropped()),
        })
    }

    /// Builds tables for `config` and publishes them. A backend whose id was in the running
    /// config keeps its state (admin state, health, ejection, runtime weight, counters) whatever
    /// else changed; the file's settings (address, backup, max_connections) apply through the
    /// new pool. Weight: a weight set at runtime stays unless the file's weight for the backend
    /// changed, then the file wins (as HAProxy does with a server-state file).
    fn publish(&mut self, config: &EngineConfig) -> Result<(), EngineError> {
        let mut backends = HashMap::new();
        let mut pools = HashMap::new();
        // (state, weight before): undone if the publish fails, so it changes nothing.
        let mut reweighed: Vec<(Arc<BackendState>, u32)> = Vec::new();
        for p in &config.pools {
            // No ALPN to HTTP/1.1 and TCP backends: a TCP backend may refuse a protocol it does
            // not know, and HTTP/1.1 is what an https backend assumes without one. HTTP/2 pools
            // ask for h2 (and nothing else: a backend that does not agree fails the connect).
            let alpn: &[&[u8]] = match p.http_version {
                HttpVersion::Http2 => &[b"h2"],
                HttpVersion::Http11 => &[],
            };
            let tls = match p.tls.as_ref().map(|t| crate::tls::client::build(t, alpn)) {
                Some(Err(e)) => {
                    for (state, weight) in reweighed {
                        state.set_weight(weight);
                    }
                    return Err(EngineError::Config(format!("pool {}: tls: {e}", p.name)));
                }
                built => built.map(|t| Arc::new(t.expect("checked above"))),
            };
            let mut states = Vec::with_capacity(p.backends.len());
            for b in &p.backends {
                let id = format!("{}/{}", p.name, b.address);
                // Looked up, not removed: a failed publish leaves the engine as it was.
                let state = match self.backends.get(&id) {
                    Some(known) => {
                        if known.cfg.weight != b.weight {
                            reweighed.push((known.state.clone(), known.state.weight()));
                            known.state.set_weight(b.weight);
                        }
                        known.state.clone()
                    }
                    None => Arc::new(BackendState::with_slot(
                        &p.name,
                        b,
                        self.ids.backend(&p.name, &b.address),
                    )),
                };
                states.push(state.clone());
                let cfg = b.clone();
                backends.insert(id, KnownBackend { cfg, state });
            }
            let mut pool = Pool::build(p, states);
            pool.id = self.ids.pool(&p.name);
            pool.tls = tls;
            pools.insert(p.name.clone(), Arc::new(pool));
        }
        let listeners = match self.listener_entries(config, &pools) {
            Ok(listeners) => listeners,
            Err(e) => {
                for (state, weight) in reweighed {
                    state.set_weight(weight);
                }
                return Err(e);
            }
        };
        self.backends = backends;
        self.shared.tables.store(Arc::new(Tables {
            generation: self.shared.tables.load().generation + 1,
            listeners,
            pools,
        }));
        Ok(())
    }

    fn listener_entries(
        &mut self,
        config: &EngineConfig,
        pools: &HashMap<String, Arc<Pool>>,
    ) -> Result<HashMap<String, Arc<ListenerEntry>>, EngineError> {
        let mut listeners = HashMap::new();
        // Read again at every reload: a new database file takes effect then.
        let geo = match &config.geoip {
            Some(path) => Some(GeoDb::open(path).map_err(EngineError::Config)?),
            None => None,
        };
        for l in &config.listeners {
            let http = match l.protocol.is_http() {
                true => {
                    let ids: Vec<u16> = l
                        .routes
                        .iter()
                        .map(|r| self.ids.route(&l.name, &r.name))
                        .collect();
                    let built = HttpListener::build(l, pools, &ids, geo.as_ref());
                    Some(built.map_err(EngineError::Config)?)
                }
                false => None,
            };
            let tls = match &l.tls {
                Some(t) => {
                    // What the data plane speaks over an https listener.
                    let alpn: Option<&[&str]> = l.protocol.is_http().then_some(&["h2", "http/1.1"]);
                    let config =
                        crate::tls::server::build(t, &self.shared.tls, alpn).map_err(|e| {
                            EngineError::Config(format!("listener {}: tls: {e}", l.name))
                        })?;
                    Some(tokio_rustls::TlsAcceptor::from(config))
                }
                None => None,
            };
            let sni = (l.protocol == Protocol::Tcp && !l.routes.is_empty())
                .then(|| SniRoutes::build(&l.routes, pools))
                .transpose()
                .map_err(|e| EngineError::Config(format!("listener {}: {e}", l.name)))?;
            let udp = l.udp.map(|cfg| UdpListener {
                cfg,
                sessions: self.udp_sessions.entry(l.name.clone()).or_default().clone(),
            });
            let proxy = match &l.proxy_protocol {
                Some(p) => Some(ProxyAccept {
                    required: p.required,
                    from: p
                        .from
                        .iter()
                        .map(|c| Cidr::parse(c))
                        .collect::<Result<_, _>>()
                        .map_err(|e| {
                            EngineError::Config(format!(
                                "listener {}: proxy_protocol.from {e}",
                                l.name
                            ))
                        })?,
                }),
                None => None,
            };
            let entry = ListenerEntry {
                cfg: l.clone(),
                proxy,
                pool: pools[&l.pool].clone(),
                id: self.ids.listener(&l.name),
                http,
                tls,
                sni,
                udp,
                closing: AtomicBool::new(false),
            };
            listeners.insert(l.name.clone(), Arc::new(entry));
        }
        Ok(listeners)
    }

    /// Hands listener `name`'s sockets to the workers, socket `i` to worker `i % workers` (an
    /// upgrade may bring more sockets than workers: each is served, none left to queue), and
    /// keeps a copy of each for a later upgrade.
    fn listen(&mut self, name: &str, sockets: Vec<ListenSocket>) {
        let n = self.workers.len().max(1);
        let mut copies = Vec::with_capacity(sockets.len());
        let mut per_worker: Vec<Vec<ListenSocket>> = (0..n).map(|_| Vec::new()).collect();
        for (i, socket) in sockets.into_iter().enumerate() {
            match socket.try_clone_fd() {
                Ok(fd) => copies.push(fd),
                Err(e) => eprintln!("fastlb: listener {name}: no copy for upgrades: {e}"),
            }
            per_worker[i % n].push(socket);
        }
        for (w, sockets) in self.workers.iter().zip(per_worker) {
            let _ = w.commands.send(WorkerCmd::Listen {
                name: name.to_string(),
                sockets,
            });
        }
        self.listen_fds.insert(name.to_string(), copies);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// `config` with the runtime split weights in place of the file's.
fn with_overrides(
    config: &EngineConfig,
    overrides: &HashMap<(String, String), Vec<SplitConfig>>,
) -> EngineConfig {
    let mut live = config.clone();
    if overrides.is_empty() {
        return live;
    }
    for l in &mut live.listeners {
        for r in &mut l.routes {
            if let Some(split) = overrides.get(&(l.name.clone(), r.name.clone())) {
                r.split = split.clone();
            }
        }
    }
    live
}

/// Whether a reload keeps a listener's sockets: same name, address and transport.
fn same_socket(old: &ListenerConfig, new: &ListenerConfig) -> bool {
    let udp = |l: &ListenerConfig| l.protocol == Protocol::Udp;
    old.name == new.name && old.bind == new.bind && udp(old) == udp(new)
}

/// One SO_REUSEPORT listening socket per worker: the kernel spreads new connections (and udp
/// flows, by their addresses' hash) across them, so workers never contend on one queue.
/// Inherited sockets that fit the listener (same transport and address) are used first, all of
/// them, even beyond one per worker: a socket dropped here would lose its queued connections.
fn bind_listener(
    l: &ListenerConfig,
    workers: usize,
    inherited: Vec<OwnedFd>,
) -> Result<Vec<ListenSocket>, EngineError> {
    let bind_error = |e| EngineError::Bind(l.name.clone(), l.bind, e);
    let udp = l.protocol == Protocol::Udp;
    let mut sockets: Vec<ListenSocket> = inherited
        .into_iter()
        .filter_map(|fd| adopt(l, fd))
        .collect();
    while sockets.len() < workers {
        sockets.push(bind_one(l, udp).map_err(bind_error)?);
    }
    Ok(sockets)
}

/// An inherited socket, if it is what listener `l` would bind (else it is closed).
fn adopt(l: &ListenerConfig, fd: OwnedFd) -> Option<ListenSocket> {
    let s = socket2::Socket::from(fd);
    let udp = l.protocol == Protocol::Udp;
    let want = if udp {
        socket2::Type::DGRAM
    } else {
        socket2::Type::STREAM
    };
    let fits = s.r#type().ok() == Some(want)
        && s.local_addr().ok().and_then(|a| a.as_socket()) == Some(l.bind)
        && (udp || s.is_listener().unwrap_or(false));
    if !fits || s.set_nonblocking(true).is_err() {
        return None;
    }
    Some(match udp {
        true => ListenSocket::Udp(s.into()),
        false => ListenSocket::Tcp(s.into()),
    })
}

fn bind_one(l: &ListenerConfig, udp: bool) -> io::Result<ListenSocket> {
    let domain = socket2::Domain::for_address(l.bind);
    let s = match udp {
        true => socket2::Socket::new(domain, socket2::Type::DGRAM, None),
        false => socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP)),
    }?;
    if l.bind.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    if udp {
        if l.bind.ip().is_unspecified() {
            // Replies must leave from the address each flow reached.
            recv_packet_info(&s, l.bind.is_ipv6())?;
        }
        s.bind(&l.bind.into())?;
        return Ok(ListenSocket::Udp(s.into()));
    }
    s.set_tcp_nodelay(true)?;
    s.bind(&l.bind.into())?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(ListenSocket::Tcp(s.into()))
}

/// IP_PKTINFO / IPV6_RECVPKTINFO: each datagram comes with the address it was sent to.
fn recv_packet_info(s: &socket2::Socket, v6: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name) = match v6 {
        true => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
        false => (libc::IPPROTO_IP, libc::IP_PKTINFO),
    };
    let one: libc::c_int = 1;
    // SAFETY: a valid int option on a socket this process owns.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests_support::pool_config;
    use crate::balance::BackendSettings;
    use crate::config::{Algorithm, PoolConfig, RuntimeConfig};

    fn config(change: impl Fn(&mut PoolConfig)) -> EngineConfig {
        let mut pool = pool_config("app", Algorithm::RoundRobin, &[5, 5]);
        change(&mut pool);
        EngineConfig {
            runtime: RuntimeConfig {
                workers: 1,
                cpus: vec![],
                max_connections: 0,
            },
            access_log: None,
            listeners: vec![],
            pools: vec![pool],
            geoip: None,
        }
    }

    /// One owner of runtime state: whatever a reload changes of a backend, the same state
    /// carries on under its id; only a changed file weight replaces a runtime weight.
    #[test]
    fn a_reload_keeps_each_backends_state_whatever_else_changed() {
        let mut engine = Engine::start(config(|_| {}), Inherited::default()).unwrap();
        let b0 = engine.backend("app", "127.0.0.1:9000").unwrap().clone();
        let b1 = engine.backend("app", "127.0.0.1:9001").unwrap().clone();
        engine
            .set_admin("app", "127.0.0.1:9000", AdminState::Disabled)
            .unwrap();
        b1.set_up(false);
        engine.set_weight("app", "127.0.0.1:9001", 7).unwrap();
        let changes: [fn(&mut PoolConfig); 4] = [
            |p| p.backends[0].max_connections = 3,
            |p| p.backends[1].backup = true,
            |p| p.backends[1].addr = "127.0.0.2:9001".parse().unwrap(),
            |_| {},
        ];
        for change in changes {
            let cfg = config(change);
            let file: Vec<BackendSettings> = cfg.pools[0].backends.iter().map(Into::into).collect();
            engine.update(cfg).unwrap();
            assert_eq!(engine.shared.tables.load().pools["app"].settings, file);
            let now0 = engine.backend("app", "127.0.0.1:9000").unwrap();
            let now1 = engine.backend("app", "127.0.0.1:9001").unwrap();
            assert!(Arc::ptr_eq(now0, &b0) && Arc::ptr_eq(now1, &b1));
            assert_eq!(b0.admin(), AdminState::Disabled);
            assert!(!b1.is_up());
            assert_eq!(b1.weight(), 7, "the file's weight did not change");
        }
        // the file's weight changed: the file wins
        engine.update(config(|p| p.backends[1].weight = 2)).unwrap();
        assert_eq!(b1.weight(), 2);
        // removed, then added again: a fresh state
        engine
            .update(config(|p| {
                p.backends.pop();
            }))
            .unwrap();
        assert!(engine.backend("app", "127.0.0.1:9001").is_err());
        engine.update(config(|_| {})).unwrap();
        let again = engine.backend("app", "127.0.0.1:9001").unwrap();
        assert!(!Arc::ptr_eq(again, &b1) && again.is_up() && again.weight() == 5);
        engine.stop(Duration::ZERO);
    }
}
