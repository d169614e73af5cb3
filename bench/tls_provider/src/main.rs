//! Server-side CPU cost of rustls 0.23 handshakes and bulk encryption, for one crypto provider
//! chosen at build time (`--features ring` or `--features aws-lc-rs`). Everything is in memory:
//! a client and a server connection hand each other bytes through `Vec` buffers, no sockets.
//! Only the server's calls are timed (thread CPU clock around each one, the clock's own cost
//! calibrated and taken off), because that is what a load balancer terminating TLS pays.
//!
//! Usage: `tls_provider_bench [handshakes] [bulk_mib]` (defaults 2000 and 1024).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::NoServerSessionStorage;
use rustls::{
    ClientConfig, ClientConnection, NamedGroup, RootCertStore, ServerConfig, ServerConnection,
    SupportedCipherSuite, SupportedProtocolVersion,
};

#[cfg(all(feature = "ring", feature = "aws-lc-rs"))]
compile_error!("choose one provider: --features ring or --features aws-lc-rs");
#[cfg(not(any(feature = "ring", feature = "aws-lc-rs")))]
compile_error!("choose a provider: --features ring or --features aws-lc-rs");

#[cfg(feature = "ring")]
mod prov {
    pub use rustls::crypto::ring::{cipher_suite, default_provider, kx_group, Ticketer};
    pub const NAME: &str = "ring";
}
#[cfg(feature = "aws-lc-rs")]
mod prov {
    pub use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group, Ticketer};
    pub const NAME: &str = "aws-lc-rs";
}

/// Nanoseconds of CPU this thread has used.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// getrusage(RUSAGE_THREAD) user+system time, microseconds: the cross-check of the whole loop.
fn rusage_thread_us() -> u64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Sums the thread CPU time (and the wall time, inside it) of the closures it runs: the server
/// side's meter. The thread CPU clock is a system call (about 1.5 µs a pair on the VM this was
/// measured on), so its calibrated cost is taken off; `Instant` is the vDSO's, about 20 ns.
struct Meter {
    ns: u64,
    wall_ns: u64,
    calls: u64,
}

impl Meter {
    fn new() -> Self {
        Meter {
            ns: 0,
            wall_ns: 0,
            calls: 0,
        }
    }
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t0 = thread_cpu_ns();
        let w0 = Instant::now();
        let r = f();
        self.wall_ns += w0.elapsed().as_nanos() as u64;
        self.ns += thread_cpu_ns() - t0;
        self.calls += 1;
        r
    }
}

/// What one empty `Meter::time` costs (CPU clock, wall clock), so it can be taken off the sums.
fn clock_overhead_ns() -> (f64, f64) {
    let mut m = Meter::new();
    for _ in 0..20_000 {
        m.time(|| ());
    }
    (
        m.ns as f64 / m.calls as f64,
        m.wall_ns as f64 / m.calls as f64,
    )
}

struct Certs {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: RootCertStore,
}

/// A CA and a leaf for "localhost", both ECDSA P-256, made now with rcgen; the server sends both.
fn make_certs() -> Certs {
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    };
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    Certs {
        chain: vec![leaf.der().clone(), ca_cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        roots,
    }
}

fn provider(
    suite: SupportedCipherSuite,
    group: &'static dyn SupportedKxGroup,
) -> Arc<CryptoProvider> {
    let mut p = prov::default_provider();
    p.cipher_suites = vec![suite];
    p.kx_groups = vec![group];
    Arc::new(p)
}

#[derive(Clone, Copy, PartialEq)]
enum Resume {
    /// No tickets, no session cache, client offers nothing: every handshake is full.
    Off,
    /// Stateless tickets from the provider's Ticketer, one per handshake; the client resumes.
    Tickets,
}

type Configs = (Arc<ServerConfig>, Arc<ClientConfig>);

fn configs(
    certs: &Certs,
    version: &'static SupportedProtocolVersion,
    suite: SupportedCipherSuite,
    group: &'static dyn SupportedKxGroup,
    resume: Resume,
) -> Configs {
    let p = provider(suite, group);
    let mut server = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs.chain.clone(), certs.key.clone_key())
        .unwrap();
    let mut client = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(certs.roots.clone())
        .with_no_client_auth();
    match resume {
        Resume::Off => {
            server.session_storage = Arc::new(NoServerSessionStorage {});
            server.send_tls13_tickets = 0;
            client.resumption = Resumption::disabled();
        }
        Resume::Tickets => {
            server.session_storage = Arc::new(NoServerSessionStorage {});
            server.ticketer = prov::Ticketer::new().unwrap();
            server.send_tls13_tickets = 1;
            client.resumption = Resumption::in_memory_sessions(64);
        }
    }
    (Arc::new(server), Arc::new(client))
}

/// Hands every byte the client has to the server and back until neither has anything to send
/// (so the server's NewSessionTicket reaches the client too). Server calls go through `m`.
fn pump(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
    m: &mut Meter,
    buf: &mut Vec<u8>,
) {
    loop {
        let mut moved = false;
        buf.clear();
        while client.wants_write() {
            client.write_tls(buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut rd: &[u8] = buf;
            m.time(|| {
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                    server.process_new_packets().unwrap();
                }
            });
        }
        buf.clear();
        m.time(|| {
            while server.wants_write() {
                server.write_tls(buf).unwrap();
            }
        });
        if !buf.is_empty() {
            moved = true;
            let mut rd: &[u8] = buf;
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().unwrap();
            }
        }
        if !moved && !client.is_handshaking() && !server.is_handshaking() {
            return;
        }
    }
}

struct HsResult {
    mean_us: f64,
    median_us: f64,
    p90_us: f64,
    /// Median server wall time (`Instant`) per handshake: the cross-check of the CPU clock.
    wall_median_us: f64,
    /// Client + server CPU of the whole loop per handshake, from getrusage(RUSAGE_THREAD).
    both_us: f64,
    resumed: usize,
}

fn handshakes(
    server_cfg: &Arc<ServerConfig>,
    client_cfg: &Arc<ClientConfig>,
    n: usize,
    (overhead_ns, wall_overhead_ns): (f64, f64),
) -> HsResult {
    let name: ServerName<'static> = "localhost".try_into().unwrap();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut one = |m: &mut Meter| -> bool {
        let mut client = ClientConnection::new(client_cfg.clone(), name.clone()).unwrap();
        let mut server = m.time(|| ServerConnection::new(server_cfg.clone()).unwrap());
        pump(&mut client, &mut server, m, &mut buf);
        assert!(!server.is_handshaking() && !client.is_handshaking());
        client.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    };
    // Warm up (and, with tickets, give the client its first ticket).
    for _ in 0..50 {
        one(&mut Meter::new());
    }
    let mut samples = Vec::with_capacity(n);
    let mut walls = Vec::with_capacity(n);
    let mut resumed = 0;
    let ru0 = rusage_thread_us();
    for _ in 0..n {
        let mut m = Meter::new();
        if one(&mut m) {
            resumed += 1;
        }
        samples.push((m.ns as f64 - overhead_ns * m.calls as f64) / 1000.0);
        walls.push((m.wall_ns as f64 - wall_overhead_ns * m.calls as f64) / 1000.0);
    }
    let both_us = (rusage_thread_us() - ru0) as f64 / n as f64;
    let mean_us = samples.iter().sum::<f64>() / n as f64;
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    walls.sort_by(|a, b| a.partial_cmp(b).unwrap());
    HsResult {
        mean_us,
        median_us: samples[n / 2],
        p90_us: samples[n * 9 / 10],
        wall_median_us: walls[n / 2],
        both_us,
        resumed,
    }
}

/// Server-side CPU seconds to encrypt and emit one GB (1e9 bytes) of application data, and
/// the server's rate while doing it. The client decrypts everything (untimed) as a check.
fn bulk(
    server_cfg: &Arc<ServerConfig>,
    client_cfg: &Arc<ClientConfig>,
    mib: usize,
    (overhead_ns, _): (f64, f64),
) -> (f64, f64) {
    let name: ServerName<'static> = "localhost".try_into().unwrap();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut client = ClientConnection::new(client_cfg.clone(), name).unwrap();
    let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
    pump(&mut client, &mut server, &mut Meter::new(), &mut buf);
    let chunk = vec![0x5au8; 16 * 1024];
    let mut plain = vec![0u8; 64 * 1024];
    let total = mib * 1024 * 1024;
    let mut m = Meter::new();
    let (mut sent, mut received) = (0, 0);
    while sent < total {
        buf.clear();
        m.time(|| {
            sent += server.writer().write(&chunk).unwrap();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
        });
        let mut rd: &[u8] = &buf;
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
            loop {
                match client.reader().read(&mut plain) {
                    Ok(n) => {
                        assert!(plain[..n].iter().all(|&b| b == 0x5a));
                        received += n;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
    assert_eq!(received, sent);
    let cpu_s = (m.ns as f64 - overhead_ns * m.calls as f64) / 1e9;
    (cpu_s * 1e9 / sent as f64, sent as f64 / cpu_s / 1e9)
}

/// Server-side costs of the primitives alone, µs: X25519 (key pair + agreement, what a server
/// does with the client's share), X25519MLKEM768 (the same, with ML-KEM encapsulation) and one
/// ECDSA P-256 signature. These explain the handshake rows.
fn primitives(certs: &Certs, mlkem: Option<&'static dyn SupportedKxGroup>, n: usize) {
    let per = |f: &mut dyn FnMut()| {
        for _ in 0..n / 10 {
            f();
        }
        let t0 = thread_cpu_ns();
        for _ in 0..n {
            f();
        }
        (thread_cpu_ns() - t0) as f64 / n as f64 / 1000.0
    };
    let kx = |g: &'static dyn SupportedKxGroup| {
        let client_share = g.start().unwrap();
        let share = client_share.pub_key().to_vec();
        per(&mut || {
            let done = g.start_and_complete(&share).unwrap();
            std::hint::black_box(done.secret.secret_bytes());
        })
    };
    let signer = prov::default_provider()
        .key_provider
        .load_private_key(certs.key.clone_key())
        .unwrap()
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .unwrap();
    let msg = [7u8; 130];
    let sign = per(&mut || {
        std::hint::black_box(signer.sign(&msg).unwrap());
    });
    let x = kx(prov::kx_group::X25519);
    let pq = mlkem.map(kx);
    println!(
        "primitives (server side, µs): X25519 {:.1}, X25519MLKEM768 {}, ECDSA P-256 sign {:.1}",
        x,
        pq.map_or("n/a".to_string(), |v| format!("{v:.1}")),
        sign
    );
}

/// `dump-hello NAME`: prints, as hex, the first flight of a rustls client with this provider's
/// default settings, post-quantum first (the fixture for fastlb's ClientHello parser tests).
fn dump_hello(name: &str) {
    let certs = make_certs();
    let mut p = prov::default_provider();
    // What rustls' `prefer-post-quantum` feature does: X25519MLKEM768 first, where offered.
    p.kx_groups
        .retain(|g| g.name() != NamedGroup::X25519MLKEM768);
    for g in extra_groups() {
        p.kx_groups.insert(0, g);
    }
    let cfg = ClientConfig::builder_with_provider(Arc::new(p))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(certs.roots)
        .with_no_client_auth();
    let mut c = ClientConnection::new(Arc::new(cfg), name.to_string().try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    println!("{} bytes\n{hex}", out.len());
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("dump-hello") {
        args.next();
        return dump_hello(&args.next().unwrap_or_else(|| "www.example.com".into()));
    }
    let n: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(2000);
    let mib: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(1024);
    let overhead = clock_overhead_ns();
    let certs = make_certs();
    let tls13 = prov::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let tls12 = prov::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256;
    let x25519 = prov::kx_group::X25519;
    let mlkem = prov::default_provider()
        .kx_groups
        .iter()
        .copied()
        .chain(extra_groups())
        .find(|g| g.name() == NamedGroup::X25519MLKEM768);

    println!(
        "provider {}  ({} handshakes per row; server-side CPU per handshake; clock cost {:.0} ns CPU / {:.0} ns wall per call taken off)",
        prov::NAME,
        n,
        overhead.0,
        overhead.1
    );
    println!(
        "{:<36} {:>8} {:>8} {:>8} {:>9} {:>11}",
        "handshake", "mean µs", "med µs", "p90 µs", "wall med", "cli+srv µs"
    );
    let mut rows: Vec<(&str, Option<Configs>, bool)> = vec![
        (
            "TLS1.3 full, X25519, ECDSA P-256",
            Some(configs(
                &certs,
                &rustls::version::TLS13,
                tls13,
                x25519,
                Resume::Off,
            )),
            false,
        ),
        (
            "TLS1.3 full, X25519MLKEM768, P-256",
            mlkem.map(|g| configs(&certs, &rustls::version::TLS13, tls13, g, Resume::Off)),
            false,
        ),
        (
            "TLS1.2 full, ECDHE(X25519)-ECDSA",
            Some(configs(
                &certs,
                &rustls::version::TLS12,
                tls12,
                x25519,
                Resume::Off,
            )),
            false,
        ),
        (
            "TLS1.3 resumed (ticket), X25519",
            Some(configs(
                &certs,
                &rustls::version::TLS13,
                tls13,
                x25519,
                Resume::Tickets,
            )),
            true,
        ),
    ];
    for (label, cfgs, expect_resumed) in rows.drain(..) {
        match cfgs {
            None => println!("{label:<36} {:>8}", "not offered by this provider"),
            Some((s, c)) => {
                let r = handshakes(&s, &c, n, overhead);
                let want = if expect_resumed { n } else { 0 };
                assert_eq!(r.resumed, want, "{label}: resumed {} of {n}", r.resumed);
                println!(
                    "{label:<36} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>11.1}",
                    r.mean_us, r.median_us, r.p90_us, r.wall_median_us, r.both_us
                );
            }
        }
    }
    primitives(&certs, mlkem, n);
    let (s, c) = configs(&certs, &rustls::version::TLS13, tls13, x25519, Resume::Off);
    let (s_per_gb, gbps) = bulk(&s, &c, mib, overhead);
    println!(
        "bulk: TLS1.3 AES-128-GCM server write, 16 KiB records, {mib} MiB: {:.3} CPU s/GB ({:.2} GB/s per core)",
        s_per_gb, gbps
    );
}

/// Post-quantum groups the provider has but does not put in its default list.
#[cfg(feature = "aws-lc-rs")]
fn extra_groups() -> Vec<&'static dyn SupportedKxGroup> {
    vec![prov::kx_group::X25519MLKEM768]
}
#[cfg(feature = "ring")]
fn extra_groups() -> Vec<&'static dyn SupportedKxGroup> {
    Vec::new()
}
