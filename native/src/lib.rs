//! `fastlb._native`: the data plane. This file only binds Rust to Python; every class Python
//! sees is registered in `_native` below. Typed in python/fastlb/_native.pyi.

pub mod accesslog;
pub mod balance;
pub mod config;
pub mod engine;
pub mod h1;
pub mod h2;
pub mod l4;
pub mod maglev;
pub mod metrics;
pub mod microbench;
pub mod net;
pub mod proxy;
pub mod ring;
pub mod stats;
pub mod tables;
pub mod tls;
pub mod track;
pub mod udp;
pub mod worker;

use balance::AdminState;
use engine::EngineError;
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

pyo3::create_exception!(
    _native,
    NativeError,
    PyRuntimeError,
    "An error raised by the data plane."
);

fn to_py(e: EngineError) -> PyErr {
    match e {
        EngineError::Config(_) => PyValueError::new_err(e.to_string()),
        EngineError::NotFound(_) => PyKeyError::new_err(e.to_string()),
        EngineError::Invalid(_) => PyValueError::new_err(e.to_string()),
        _ => NativeError::new_err(e.to_string()),
    }
}

fn parse(config_json: &str) -> PyResult<config::EngineConfig> {
    config::EngineConfig::from_json(config_json).map_err(|m| to_py(EngineError::Config(m)))
}

/// The running data plane: worker threads, listeners and routing tables.
#[pyclass(name = "Engine", module = "fastlb._native")]
struct PyEngine {
    inner: Mutex<engine::Engine>,
    probe: engine::ServingProbe,
}

impl PyEngine {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut engine::Engine) -> Result<T, EngineError>,
    ) -> PyResult<T> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard).map_err(to_py)
    }
}

/// Listening fds by listener name, and the TLS ticket keys.
type Handover<'py> = (HashMap<String, Vec<RawFd>>, Bound<'py, PyBytes>);

#[pymethods]
impl PyEngine {
    /// Binds every listener and starts the workers. `config_json` is `Config.to_engine()`.
    /// At a binary upgrade, `inherited` holds the old process's listening sockets by listener
    /// name (fds this engine takes ownership of, used or closed) and `ticket_keys` its keys.
    #[new]
    #[pyo3(signature = (config_json, inherited=None, ticket_keys=None))]
    fn new(
        py: Python<'_>,
        config_json: &str,
        inherited: Option<HashMap<String, Vec<RawFd>>>,
        ticket_keys: Option<Vec<u8>>,
    ) -> PyResult<Self> {
        let cfg = parse(config_json)?;
        // SAFETY: the caller hands these fds over (received by SCM_RIGHTS, owned by no one
        // else); from here each is owned once, by the engine.
        let sockets = inherited
            .unwrap_or_default()
            .into_iter()
            .map(|(name, fds)| {
                let owned = fds
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
                (name, owned.collect())
            })
            .collect();
        let inherited = engine::Inherited {
            sockets,
            ticket_keys,
        };
        let engine = py
            .detach(|| engine::Engine::start(cfg, inherited))
            .map_err(to_py)?;
        Ok(PyEngine {
            probe: engine.serving_probe(),
            inner: Mutex::new(engine),
        })
    }

    /// Every listening socket's fd by listener name (still the engine's: send copies) and the
    /// TLS ticket keys, for the process that takes over at a binary upgrade.
    fn handover<'py>(&self, py: Python<'py>) -> PyResult<Handover<'py>> {
        let (fds, keys) = self.with(|e| Ok(e.handover()))?;
        Ok((fds.into_iter().collect(), PyBytes::new(py, &keys)))
    }

    /// Whether the data plane serves every listener (for `/healthz`); never waits.
    fn serving(&self) -> bool {
        self.probe.serving()
    }

    /// Swaps in a new configuration without closing listeners that stay.
    fn update(&self, py: Python<'_>, config_json: &str) -> PyResult<()> {
        let cfg = parse(config_json)?;
        py.detach(|| self.with(|e| e.update(cfg)))
    }

    /// Stops accepting, waits up to `grace_s` for open connections, closes the rest.
    fn stop(&self, py: Python<'_>, grace_s: f64) -> PyResult<()> {
        let grace = Duration::from_secs_f64(grace_s.max(0.0));
        py.detach(|| {
            self.with(|e| {
                e.stop(grace);
                Ok(())
            })
        })
    }

    /// JSON snapshot of listeners, pools and backends. Waits up to 250 ms for the workers'
    /// metrics without holding the engine (and without the GIL), so other calls go on
    /// meanwhile; call it off the event loop.
    fn stats(&self, py: Python<'_>) -> PyResult<String> {
        let request = self.with(|e| Ok(e.metrics_request()))?;
        py.detach(|| {
            let fresh = request.collect(engine::SNAPSHOT_WAIT);
            self.with(|e| Ok(e.stats_json(fresh)))
        })
    }

    /// A backend's runtime state: (admin state, up, weight, slow-start scale in per mille);
    /// admin is "enabled", "draining" or "disabled", up is the health verdict (checks and
    /// passive ejection).
    fn backend_state(&self, pool: &str, address: &str) -> PyResult<(&'static str, bool, u32, u32)> {
        self.with(|e| {
            let b = e.backend(pool, address)?;
            Ok((b.admin().name(), b.is_up(), b.weight(), b.weight_scale()))
        })
    }

    /// Client connections open in the process now.
    fn open_connections(&self) -> PyResult<usize> {
        self.with(|e| Ok(e.open_connections()))
    }

    /// Health verdict from the control plane (active checks).
    fn set_backend_up(&self, pool: &str, address: &str, up: bool) -> PyResult<()> {
        self.with(|e| {
            e.backend(pool, address)?.set_up(up);
            Ok(())
        })
    }

    /// `state`: "enabled", "draining" or "disabled".
    fn set_backend_admin(&self, pool: &str, address: &str, state: &str) -> PyResult<()> {
        let state = AdminState::from_name(state)
            .ok_or_else(|| PyValueError::new_err(format!("unknown admin state '{state}'")))?;
        self.with(|e| e.set_admin(pool, address, state))
    }

    /// Slow start: the share of its weight the backend gets now, in per mille (1000 = all).
    fn set_backend_scale(&self, pool: &str, address: &str, per_mille: u32) -> PyResult<()> {
        self.with(|e| e.set_weight_scale(pool, address, per_mille))
    }

    /// Connections (tcp) or requests (http) open to the backend now, process-wide.
    fn backend_active(&self, pool: &str, address: &str) -> PyResult<u32> {
        self.with(|e| Ok(e.backend(pool, address)?.active()))
    }

    /// Closes every connection to the backend (a drain that timed out).
    fn close_backend(&self, pool: &str, address: &str) -> PyResult<()> {
        self.with(|e| e.close_backend(pool, address))
    }

    /// Reopens the access log file (after logrotate moved it).
    fn reopen_access_log(&self) -> PyResult<()> {
        self.with(|e| {
            e.reopen_access_log();
            Ok(())
        })
    }

    /// Ids of the backends passive detection ejected since the last call.
    fn take_ejected(&self) -> PyResult<Vec<String>> {
        self.with(|e| Ok(e.take_ejected()))
    }

    /// Weight 0..=1000, live.
    fn set_backend_weight(
        &self,
        py: Python<'_>,
        pool: &str,
        address: &str,
        weight: u32,
    ) -> PyResult<()> {
        py.detach(|| self.with(|e| e.set_weight(pool, address, weight)))
    }

    /// Live weights of a split route: `[(pool, weight), ...]`, one per pool of its split.
    fn set_split_weights(
        &self,
        py: Python<'_>,
        listener: &str,
        route: &str,
        weights: Vec<(String, u32)>,
    ) -> PyResult<()> {
        py.detach(|| self.with(|e| e.set_split_weights(listener, route, &weights)))
    }
}

/// Names with weights from Python: `["a", "b"]` or `[("a", 3), ("b", 1)]`.
fn names_and_weights(nodes: &Bound<'_, PyAny>) -> PyResult<(Vec<String>, Vec<u32>)> {
    let mut names = Vec::new();
    let mut weights = Vec::new();
    for item in nodes.try_iter()? {
        let item = item?;
        if let Ok((name, weight)) = item.extract::<(String, u32)>() {
            names.push(name);
            weights.push(weight);
        } else {
            names.push(item.extract::<String>()?);
            weights.push(1);
        }
    }
    Ok((names, weights))
}

/// Key as Python gives it (str or bytes), hashed the way the data plane hashes keys.
fn key_hash(key: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(s) = key.extract::<&str>() {
        Ok(balance::hash_key(s.as_bytes()))
    } else {
        Ok(balance::hash_key(key.extract::<&[u8]>()?))
    }
}

/// The ketama ring consistent_hash uses: `HashRing(["a:1", ("b:2", 3)]).lookup("key")`.
#[pyclass(name = "HashRing", module = "fastlb._native")]
struct PyHashRing {
    names: Vec<String>,
    ring: ring::HashRing,
}

#[pymethods]
impl PyHashRing {
    #[new]
    fn new(nodes: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (names, weights) = names_and_weights(nodes)?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let ring = ring::HashRing::new(&refs, &weights);
        Ok(PyHashRing { names, ring })
    }

    /// The node a key (str or bytes) maps to, or None for an empty ring.
    fn lookup(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        Ok(self
            .ring
            .lookup(key_hash(key)?)
            .map(|i| self.names[i].clone()))
    }
}

/// The Maglev table maglev uses (M = 65537): `Maglev(["a:1", "b:2"]).lookup("key")`.
#[pyclass(name = "Maglev", module = "fastlb._native")]
struct PyMaglev {
    names: Vec<String>,
    table: maglev::MaglevTable,
}

#[pymethods]
impl PyMaglev {
    #[new]
    fn new(nodes: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (names, weights) = names_and_weights(nodes)?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let table = maglev::MaglevTable::new(&refs, &weights);
        Ok(PyMaglev { names, table })
    }

    fn lookup(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
        Ok(self
            .table
            .lookup(key_hash(key)?)
            .map(|i| self.names[i].clone()))
    }
}

/// Why the engine refuses `config_json` (None when it accepts it): checks the control plane's
/// JSON against the engine's schema without starting anything.
#[pyfunction]
fn engine_config_error(config_json: &str) -> Option<String> {
    config::EngineConfig::from_json(config_json).err()
}

/// Why `pattern` is not a valid route regex for the data plane (Rust `regex` syntax, which has
/// no look-around or backreferences), or None when it is.
#[pyfunction]
fn regex_error(pattern: &str) -> Option<String> {
    regex::bytes::Regex::new(pattern)
        .err()
        .map(|e| e.to_string())
}

/// Micro benchmark: parses an HTTP request head `n` times in Rust; total nanoseconds.
#[pyfunction]
fn bench_parse_head(py: Python<'_>, head: &[u8], n: u64) -> PyResult<u64> {
    let head = head.to_vec();
    py.detach(|| microbench::parse_head(&head, n))
        .map_err(PyValueError::new_err)
}

/// Micro benchmark: a pool of `backends` equal backends under `algorithm`, built once;
/// `select(n)` makes `n` selections and returns the total nanoseconds.
#[pyclass(name = "BenchPool", module = "fastlb._native")]
struct PyBenchPool {
    pool: balance::Pool,
}

#[pymethods]
impl PyBenchPool {
    #[new]
    fn new(algorithm: &str, backends: usize) -> PyResult<Self> {
        let pool = microbench::pool(algorithm, backends).map_err(PyValueError::new_err)?;
        Ok(PyBenchPool { pool })
    }

    fn select(&self, py: Python<'_>, n: u64) -> u64 {
        py.detach(|| microbench::select(&self.pool, n))
    }
}

/// How this data plane was built, for `fastlb --version`.
fn build_facts() -> String {
    let features: Vec<&str> = [("no-counting", cfg!(feature = "no-counting"))]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
    let features = if features.is_empty() {
        "default".to_string()
    } else {
        features.join(",")
    };
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!(
        "{}, {profile}, features: {features}, TLS: rustls (aws-lc-rs), target: {}-{}",
        env!("FASTLB_RUSTC"),
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyHashRing>()?;
    m.add_class::<PyMaglev>()?;
    m.add_function(wrap_pyfunction!(regex_error, m)?)?;
    m.add_function(wrap_pyfunction!(engine_config_error, m)?)?;
    m.add_function(wrap_pyfunction!(bench_parse_head, m)?)?;
    m.add_class::<PyBenchPool>()?;
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_RETRIES", config::MAX_RETRIES)?;
    m.add("BUILD", build_facts())?;
    Ok(())
}
