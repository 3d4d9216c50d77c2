//! The load generator: HTTP/1.1 over rustls (ring, as meshd) with hyper's client connection, on a single-threaded
//! tokio runtime, on one thread that entered the shop's namespace and is pinned to the first core. The same client
//! for every target; it decides whether a new connection resumes a TLS session or makes a full handshake, and counts
//! which one each connection made (rustls's `handshake_kind`).
//!
//! Why not wrk (which earlier runs of this bench used): wrk resumes TLS sessions whenever the server offers them, so
//! it cannot make the "full TLS handshake per request" against a server with session tickets, and with
//! Debian's OpenSSL 3.0 it spent 0.7-1.9 ms of CPU per connection, more than either proxy: on two shared cores it,
//! not the proxies, decided req/s. Neither wrk nor h2load verifies the server's certificate; this client checks that
//! it is the one expected, byte for byte, and skips the chain and handshake signature checks, whose cost is the
//! client's and not what is measured (the server's side of a full handshake, ECDHE and the signature, is the same
//! either way).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1;
use hyper::header::{CONNECTION, HOST};
use hyper_util::rt::TokioIo;
use meshd_e2e::Netns;
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::cpu;

/// Open connections (as the 64 of wrk's earlier runs).
const CONNECTIONS: usize = 64;
/// The core the client's thread is pinned to (the servers are pinned to [`crate::cpu::SERVER_CORE`]).
const CLIENT_CORE: usize = 0;

/// How requests use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Every connection carries requests one after the other.
    KeepAlive,
    /// A new connection per request (`Connection: close`), resuming a TLS session when the server offered one.
    Resumed,
    /// A new connection per request with a full TLS handshake (the client keeps no session).
    Full,
}

impl Workload {
    /// All three, in the order they are measured.
    pub const ALL: [Workload; 3] = [Workload::KeepAlive, Workload::Resumed, Workload::Full];

    /// Whether each request gets its own connection.
    fn new_connection(self) -> bool {
        self != Workload::KeepAlive
    }
}

impl std::str::FromStr for Workload {
    type Err = String;

    /// `keep-alive`, `resumed` or `full`.
    fn from_str(s: &str) -> Result<Workload, String> {
        match s {
            "keep-alive" => Ok(Workload::KeepAlive),
            "resumed" => Ok(Workload::Resumed),
            "full" => Ok(Workload::Full),
            _ => Err(format!("unknown workload {s:?} (keep-alive, resumed, full)")),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::KeepAlive => "keep-alive",
            Workload::Resumed => "new connection, resumed",
            Workload::Full => "new connection, full handshake",
        })
    }
}

/// Where the load goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's address.
    pub addr: SocketAddr,
    /// The name sent as SNI and `Host`.
    pub host: String,
    /// TLS with the server certificate expected (DER, the chain's first), or plain HTTP.
    pub tls: Option<CertificateDer<'static>>,
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms (keep-alive: request to whole answer; new connection: TCP connect to whole answer).
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Requests completed within the run.
    pub requests: u64,
    /// Connections or requests that failed (connect, handshake, I/O).
    pub errors: u64,
    /// Answers other than 200 or with another body.
    pub non_200: u64,
    /// TLS connections made with a full handshake.
    pub full: u64,
    /// TLS connections that resumed a session.
    pub resumed: u64,
    /// CPU time of the servers' namespaces per request, µs.
    pub server_cpu_us: f64,
    /// CPU time of the client's thread per request, µs.
    pub client_cpu_us: f64,
}

/// Load `target` from the shop for `seconds` after `warm_up` seconds of the same load (not counted), with the CPU
/// time of every process in `servers` and of the client; `body` is the answer every request must get.
pub fn run(
    shop: &Netns,
    servers: &[&Netns],
    target: &Target,
    workload: Workload,
    (seconds, warm_up): (u32, u32),
    body: &'static str,
) -> Figures {
    let config = target.tls.clone().map(|leaf| Arc::new(client_config(leaf, workload)));
    let target = target.clone();
    let servers: Vec<String> = servers.iter().map(|ns| ns.name().to_owned()).collect();
    shop.within(move || {
        pin_to_core(CLIENT_CORE);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        let load = Load { target, config, workload, body };
        runtime.block_on(load.phase(Duration::from_secs(warm_up.into())));
        let (servers_before, client_before) = (cpu::servers(&servers), cpu::this_thread());
        let tally = runtime.block_on(load.phase(Duration::from_secs(seconds.into())));
        let client = cpu::this_thread() - client_before;
        let server = cpu::servers(&servers) - servers_before;
        tally.figures(seconds, server, client)
    })
}

/// The client's TLS configuration: the server must show `leaf`, ALPN `http/1.1`, sessions kept unless `workload`
/// is [`Workload::Full`].
fn client_config(leaf: CertificateDer<'static>, workload: Workload) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider.signature_verification_algorithms.supported_schemes();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedLeaf { leaf, schemes }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if workload == Workload::Full {
        config.resumption = Resumption::disabled();
    }
    config
}

/// Accepts exactly one server certificate, compared byte for byte; the handshake's signature is not checked (see
/// the module's header).
#[derive(Debug)]
struct ExpectedLeaf {
    leaf: CertificateDer<'static>,
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for ExpectedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("the server showed another certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// The first certificate of a PEM chain file.
pub fn leaf(chain: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(chain)
        .unwrap_or_else(|e| panic!("{}: {e}", chain.display()))
        .next()
        .unwrap_or_else(|| panic!("{} holds no certificate", chain.display()))
        .unwrap_or_else(|e| panic!("{}: {e}", chain.display()))
}

/// Pin the calling thread to `core`.
fn pin_to_core(core: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it; sched_setaffinity(0) is this thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "pin the client to core {core}: {}", std::io::Error::last_os_error());
}

/// One target under one workload.
#[derive(Clone)]
struct Load {
    target: Target,
    config: Option<Arc<ClientConfig>>,
    workload: Workload,
    body: &'static str,
}

/// What the connections of a phase counted.
#[derive(Default)]
struct Tally {
    /// Latency of each completed request, µs.
    latencies: Vec<u32>,
    errors: u64,
    non_200: u64,
    full: u64,
    resumed: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.non_200 += other.non_200;
        self.full += other.full;
        self.resumed += other.resumed;
    }

    fn figures(mut self, seconds: u32, server_cpu: f64, client_cpu: f64) -> Figures {
        self.latencies.sort_unstable();
        let requests = self.latencies.len() as u64;
        let at = |q: f64| {
            let i = ((self.latencies.len() as f64 * q) as usize).min(self.latencies.len().saturating_sub(1));
            self.latencies.get(i).map_or(0.0, |&us| f64::from(us) / 1000.0)
        };
        let per_request = |seconds: f64| seconds * 1e6 / requests.max(1) as f64;
        Figures {
            rps: requests as f64 / f64::from(seconds),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            requests,
            errors: self.errors,
            non_200: self.non_200,
            full: self.full,
            resumed: self.resumed,
            server_cpu_us: per_request(server_cpu),
            client_cpu_us: per_request(client_cpu),
        }
    }
}

impl Load {
    /// [`CONNECTIONS`] loops for `length`; requests completed after it are not counted.
    async fn phase(&self, length: Duration) -> Tally {
        let deadline = tokio::time::Instant::now() + length;
        let loops: Vec<_> = (0..CONNECTIONS).map(|_| tokio::spawn(self.clone().connection_loop(deadline))).collect();
        let mut tally = Tally::default();
        for handle in loops {
            tally.add(handle.await.expect("a connection loop"));
        }
        tally
    }

    /// Connect, send requests (one or many per connection), connect again, until `deadline`.
    async fn connection_loop(self, deadline: tokio::time::Instant) -> Tally {
        let mut tally = Tally::default();
        while tokio::time::Instant::now() < deadline {
            let started = Instant::now();
            let attempt = tokio::time::timeout_at(deadline, self.connection(started, deadline, &mut tally)).await;
            if let Ok(Err(e)) = attempt {
                tally.errors += 1;
                note_error(&e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tally
    }

    /// One connection: TCP, TLS when the target has it, then its requests.
    async fn connection(
        &self,
        started: Instant,
        deadline: tokio::time::Instant,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let tcp = TcpStream::connect(self.target.addr).await.map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let Some(config) = &self.config else { return self.requests(tcp, started, deadline, tally).await };
        let name = ServerName::try_from(self.target.host.clone()).map_err(|e| format!("server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        match tls.get_ref().1.handshake_kind() {
            Some(HandshakeKind::Resumed) => tally.resumed += 1,
            _ => tally.full += 1,
        }
        self.requests(tls, started, deadline, tally).await
    }

    /// HTTP/1.1 requests on `io` until `deadline` (one, with `Connection: close`, for a new connection per
    /// request); each completed one's latency counted from `started` (new connection) or from its sending.
    async fn requests<S>(
        &self,
        io: S,
        started: Instant,
        deadline: tokio::time::Instant,
        tally: &mut Tally,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut sender, connection) = http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(connection);
        let mut from = started;
        loop {
            let mut request = hyper::Request::get("/").header(HOST, &self.target.host);
            if self.workload.new_connection() {
                request = request.header(CONNECTION, "close");
            }
            let request = request.body(Empty::<Bytes>::new()).map_err(|e| format!("request: {e}"))?;
            let answer = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
            let status = answer.status();
            let body = answer.into_body().collect().await.map_err(|e| format!("answer: {e}"))?.to_bytes();
            if tokio::time::Instant::now() > deadline {
                return Ok(());
            }
            if status != hyper::StatusCode::OK || body != self.body.as_bytes() {
                tally.non_200 += 1;
            }
            tally.latencies.push(u32::try_from(from.elapsed().as_micros()).unwrap_or(u32::MAX));
            if self.workload.new_connection() {
                return Ok(());
            }
            from = Instant::now();
        }
    }
}

/// The first few failures of a run on standard error (a run with errors is reported in its figures).
fn note_error(error: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SHOWN: AtomicU32 = AtomicU32::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("load generator: {error}");
    }
}
