//! Join transport: a joining host redeems its invite with the hub over TLS before it has a tunnel.
//!
//! There is no CA: the invite token carries the SHA-256 fingerprint of the hub's self-signed certificate and
//! the client pins it. One JSON request line goes up, one JSON reply line comes back. The module is generic
//! over the request and reply types, so it knows nothing about invites.
//!
//! The listener faces the internet, so it does not announce itself: the client sends as its TLS server
//! name (SNI) a name derived from the pinned fingerprint ([`server_name`]), which every token holder and
//! member knows and a scanner does not. A connection whose ClientHello does not carry it, or that sends
//! no ClientHello within [`HELLO_TIMEOUT`], is closed without a byte sent back (no certificate, not even
//! a TLS alert). Connections are capped per source and in total ([`PER_SOURCE`], [`TOTAL`]) within the
//! process's descriptor budget (see [`crate::host::admission`]); none of that is logged one line each.
//! Until its request line has arrived, a connection may be evicted by a newer one
//! ([`Gate::admit_evicting`]): a flood of idle connections at the caps closes its own, and a joining host
//! or a member asking where it stands, which sends its ClientHello and then its request at once, still gets
//! in. That holds against a flood that knows the service's name too (the name travels in clear in every
//! ClientHello, so anyone on a joining host's path reads it): TLS handshakes it completes and leaves idle
//! are evicted like the rest.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tracing::debug;

use crate::host::admission::{Caps, Gate, Pending};
use meshd_core::wire::auth::STANDING_EXPORTER_LABEL;

/// Name in the certificate; the client ignores it, the pin is what counts.
const SERVER_NAME: &str = "meshd-join";
/// Most join connections of one source (an IPv4 address or an IPv6 /64) at a time: a joining host or a
/// member asking where it stands needs one; several hosts behind one NAT may join at once.
pub const PER_SOURCE: usize = 32;
/// Most join connections at a time over all sources.
pub const TOTAL: usize = 256;
/// Time a client gets to send its ClientHello after connecting. A client sends it right after the TCP
/// handshake (it arrived 65-450 µs after the accept in `tests/tests/join_flood.rs`, during the flood): the
/// time covers a ClientHello lost on the way and resent after TCP's retransmission timeout (at least 200 ms,
/// 1 s while the path is unmeasured), twice.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest request line the hub reads, so a client cannot make it buffer without bound.
const MAX_REQUEST: u64 = 64 * 1024;
/// Largest reply line the client reads; replies come from the pinned hub and may carry a whole host config.
const MAX_REPLY: u64 = 1024 * 1024;
/// Time a joining host gets for the handshake plus its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the hub spends writing a reply to a client that does not read.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The one crypto provider used here, passed explicitly so no process-wide default is needed.
static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

/// What can go wrong creating an identity or making a join call.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("generating the join TLS certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("stored join identity is invalid: {0}")]
    InvalidIdentity(#[source] rustls::Error),
    #[error("building the join TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    #[error("invalid hub fingerprint {0:?}: expected 64 hex characters (SHA-256)")]
    InvalidFingerprint(String),
    #[error("encoding the join request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("connecting to the hub at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error(
        "the server at {addr} is not the hub this token belongs to: its certificate does not match the token's \
         fingerprint (check the address, or ask for a new token)"
    )]
    WrongServer { addr: String },
    #[error(
        "the server at {addr} closed the connection without answering: it is not the hub this token belongs to, \
         or the hub is at its connection limit (check the address and try again, or ask for a new token)"
    )]
    Unanswered { addr: String },
    #[error("TLS handshake with the hub at {addr}: {source}")]
    Handshake { addr: String, source: io::Error },
    #[error("exchanging the join request with {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("the hub at {addr} closed the connection without a reply")]
    NoReply { addr: String },
    #[error("the reply from {addr} is longer than {MAX_REPLY} bytes")]
    ReplyTooLarge { addr: String },
    #[error("invalid reply from the hub at {addr}: {source}")]
    Decode { addr: String, source: serde_json::Error },
    #[error("join call to {addr} timed out after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// The hub's TLS identity for joins: a self-signed certificate (rcgen) and its private key, both DER.
#[derive(Clone)]
pub struct JoinIdentity {
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    /// Built once from the DER; building it is also what validates the pair.
    server_config: Arc<ServerConfig>,
}

impl JoinIdentity {
    /// A new self-signed identity (ECDSA P-256; subject and SAN "meshd-join").
    pub fn generate() -> Result<JoinIdentity, JoinError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(JoinError::Generate)?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(JoinError::Generate)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, SERVER_NAME);
        let cert = params.self_signed(&key).map_err(JoinError::Generate)?;
        JoinIdentity::from_der(cert.der().to_vec(), key.serialize_der())
    }

    /// Rebuild from stored DER (as returned by `cert_der`/`key_der`, key in PKCS#8); checks that both parse
    /// and that the key belongs to the certificate.
    pub fn from_der(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<JoinIdentity, JoinError> {
        let cert = CertificateDer::from(cert_der.clone());
        // with_single_cert skips the cert/key match when the key cannot report its public key: parse anyway.
        ParsedCertificate::try_from(&cert).map_err(JoinError::InvalidIdentity)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.clone()));
        let server_config = ServerConfig::builder_with_provider(PROVIDER.clone())
            .with_safe_default_protocol_versions()
            .map_err(JoinError::TlsConfig)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(JoinError::InvalidIdentity)?;
        Ok(JoinIdentity { cert_der, key_der, server_config: Arc::new(server_config) })
    }

    /// The certificate, DER-encoded.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The private key, PKCS#8 DER. Secret: store it with care, never log it.
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    /// Lowercase hex SHA-256 of the certificate DER (64 chars): what tokens carry.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(&self.cert_der))
    }

    /// The server name clients of this identity send ([`server_name`] of its fingerprint).
    pub fn server_name(&self) -> String {
        server_name(&Sha256::digest(&self.cert_der).into())
    }
}

/// The TLS server name (SNI) for the join service whose certificate has SHA-256 `pin`: the first 16 hex
/// characters of SHA-256("meshd join" || pin), under `meshd.invalid`. Only those who know the fingerprint
/// can name it, and it reveals nothing of the fingerprint.
pub fn server_name(pin: &[u8; 32]) -> String {
    let digest = Sha256::new().chain_update(b"meshd join").chain_update(pin).finalize();
    format!("{}.meshd.invalid", hex::encode(digest.get(..8).unwrap_or_default()))
}

impl fmt::Debug for JoinIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinIdentity")
            .field("fingerprint", &self.fingerprint())
            .field("key_der", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Keying material exported from one TLS session (RFC 5705, label [`STANDING_EXPORTER_LABEL`]): both ends
/// compute it, nobody else can, and it differs for every connection. A request proves a key by a MAC
/// over it ([`meshd_core::wire::auth::standing_proof`]).
pub type Binding = [u8; 32];

/// A request from a joining host, with the TLS session's [`Binding`] and the channel its reply goes back on.
pub type JoinCall<Req, Resp> = (Req, SocketAddr, Binding, oneshot::Sender<Resp>);

/// The [`Binding`] of a TLS connection.
fn binding(connection: &rustls::ConnectionCommon<impl Sized>) -> io::Result<Binding> {
    let mut out = [0u8; 32];
    connection
        .export_keying_material(&mut out, STANDING_EXPORTER_LABEL, None)
        .map_err(|e| io::Error::other(format!("exporting keying material: {e}")))?;
    Ok(out)
}

/// Accept TLS connections on `listener` until the receiver of `calls` is dropped: read one JSON line (at most
/// 64 KiB, within 10 s), hand it to `calls`, write the reply as one JSON line, close. A malformed request gets
/// `malformed(reason)` as its reply without reaching `calls`. Each connection runs in its own task, holding
/// a permit of the listener's gate; connections over its caps, and ClientHellos without the identity's
/// server name, are closed at once without a reply.
pub async fn serve<Req, Resp>(
    listener: TcpListener,
    identity: JoinIdentity,
    calls: mpsc::Sender<JoinCall<Req, Resp>>,
    malformed: fn(String) -> Resp,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let caps = Caps { per_source: PER_SOURCE, total: TOTAL, descriptors: 1, internet: true };
    let gate = Gate::new("join listener", caps);
    let expected: Arc<str> = identity.server_name().into();
    let config = identity.server_config;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = crate::host::socket::accept(&listener, "join") => accepted,
            () = calls.closed() => {
                debug!("join handler gone, no longer accepting joins");
                return;
            }
        };
        let Some(pending) = gate.admit_evicting(peer.ip()) else { continue };
        let (config, expected, calls) = (config.clone(), expected.clone(), calls.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_connection(Tls { config, expected }, tcp, peer, pending, calls, malformed).await {
                debug!(%peer, "join connection ended without a reply: {e}");
            }
        });
    }
}

/// The server side of the TLS: its configuration, and the server name a client must send.
struct Tls {
    config: Arc<ServerConfig>,
    expected: Arc<str>,
}

/// One join connection: ClientHello (with the expected server name), handshake, request line, reply line.
/// Until the request line has arrived, a newer connection may evict it (`pending`); after, it holds its place
/// to the end (the reply follows at once).
async fn serve_connection<Req, Resp>(
    tls: Tls,
    tcp: TcpStream,
    peer: SocketAddr,
    mut pending: Pending,
    calls: mpsc::Sender<JoinCall<Req, Resp>>,
    malformed: fn(String) -> Resp,
) -> io::Result<()>
where
    Req: DeserializeOwned,
    Resp: Serialize,
{
    // Nothing is written until the ClientHello names this service: not even an alert for garbage.
    let muted = Arc::new(AtomicBool::new(true));
    let accepted = std::time::Instant::now();
    let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), Muted { tcp, muted: muted.clone() });
    let start = tokio::select! {
        start = tokio::time::timeout(HELLO_TIMEOUT, hello) => {
            start.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no ClientHello in time"))??
        }
        () = pending.evicted() => {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "evicted by a newer connection before its ClientHello"));
        }
    };
    if start.client_hello().server_name() != Some(&*tls.expected) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "ClientHello without this service's name"));
    }
    debug!(%peer, after = ?accepted.elapsed(), "join: the ClientHello names the service");
    muted.store(false, Ordering::SeqCst);
    let read_request = async {
        let mut stream = BufReader::new(start.into_stream(tls.config).await?);
        let line = read_line(&mut stream, MAX_REQUEST).await?;
        Ok::<_, io::Error>((stream, line))
    };
    let (mut stream, line) = tokio::select! {
        read = tokio::time::timeout(REQUEST_TIMEOUT, read_request) => {
            read.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no complete request in time"))??
        }
        () = pending.evicted() => {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "evicted by a newer connection before its request"));
        }
    };
    let Some(_permit) = pending.settle() else {
        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "evicted by a newer connection"));
    };

    let reply = match line {
        Line::Empty => return Ok(()),
        Line::TooLong => malformed(format!("request is longer than {MAX_REQUEST} bytes")),
        Line::Complete(bytes) => match serde_json::from_slice::<Req>(&bytes) {
            Err(e) => malformed(format!("invalid request: {e}")),
            Ok(request) => {
                let (reply_tx, reply_rx) = oneshot::channel();
                let bound = binding(stream.get_ref().get_ref().1)?;
                if calls.send((request, peer, bound, reply_tx)).await.is_err() {
                    return Err(io::Error::other("join handler is gone"));
                }
                reply_rx.await.map_err(|_| io::Error::other("join handler dropped the request"))?
            }
        },
    };

    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    let write_reply = async {
        let stream = stream.get_mut();
        stream.write_all(&out).await?;
        // shutdown sends close_notify, so the client sees a clean end after the line.
        stream.shutdown().await
    };
    tokio::time::timeout(REPLY_TIMEOUT, write_reply)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client did not take the reply in time"))?
}

/// A connection that swallows what is written to it while `muted`: so a stranger's connection ends
/// without the server having said anything.
struct Muted {
    tcp: TcpStream,
    muted: Arc<AtomicBool>,
}

impl AsyncRead for Muted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Muted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.muted.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(data.len()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Connect to `addr` ("HOST:PORT", host a DNS name, IPv4 or `[IPv6]`), accept only a server certificate whose
/// SHA-256 is `fingerprint`, send `request` and return the reply; the whole exchange is bounded by `timeout`.
pub async fn call<Req, Resp>(addr: &str, fingerprint: &str, request: &Req, timeout: Duration) -> Result<Resp, JoinError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    call_bound(addr, fingerprint, |_| request, timeout).await
}

/// [`call`] with a request made once the TLS session is up, from its [`Binding`] (a request that proves
/// keys for this connection only).
pub async fn call_bound<Req, Resp>(
    addr: &str,
    fingerprint: &str,
    request: impl FnOnce(&Binding) -> Req,
    timeout: Duration,
) -> Result<Resp, JoinError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let pin = parse_fingerprint(fingerprint)?;
    let line = |bound: &Binding| {
        let mut line = serde_json::to_vec(&request(bound)).map_err(JoinError::Encode)?;
        line.push(b'\n');
        Ok(line)
    };
    tokio::time::timeout(timeout, exchange(addr, pin, line))
        .await
        .map_err(|_| JoinError::Timeout { addr: addr.to_string(), timeout })?
}

/// How long one address of the hub's name may take to accept a connection before the next is tried.
const CONNECT_EACH: Duration = Duration::from_secs(5);

/// A connection to `addr` (`HOST:PORT`): every address the host resolves to, both families, in the
/// system resolver's order, each for at most [`CONNECT_EACH`] (a router that drops one family's packets
/// costs seconds, not the whole join). Errors: the last address's, or the resolver's.
async fn connect_any(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for target in tokio::net::lookup_host(addr).await? {
        match tokio::time::timeout(CONNECT_EACH, TcpStream::connect(target)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, format!("{target} did not answer")),
        }
    }
    Err(last)
}

/// The client side of one join, without the overall timeout.
async fn exchange<Resp: DeserializeOwned>(
    addr: &str,
    pin: [u8; 32],
    line: impl FnOnce(&Binding) -> Result<Vec<u8>, JoinError>,
) -> Result<Resp, JoinError> {
    let owned_addr = || addr.to_string();
    let mismatch = Arc::new(AtomicBool::new(false));
    let verifier =
        PinnedCert { pin, algorithms: PROVIDER.signature_verification_algorithms, mismatch: mismatch.clone() };
    let config = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_safe_default_protocol_versions()
        .map_err(JoinError::TlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();

    let tcp = connect_any(addr).await.map_err(|source| JoinError::Connect { addr: owned_addr(), source })?;
    let server_name = ServerName::try_from(server_name(&pin))
        .map_err(|e| JoinError::TlsConfig(rustls::Error::General(e.to_string())))?;
    let tls = match TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await {
        Ok(tls) => tls,
        Err(_) if mismatch.load(Ordering::SeqCst) => return Err(JoinError::WrongServer { addr: owned_addr() }),
        // The join service closes silently on a client that does not send its name (derived from the pin).
        Err(source) if source.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(JoinError::Unanswered { addr: owned_addr() });
        }
        Err(source) => return Err(JoinError::Handshake { addr: owned_addr(), source }),
    };

    let io_err = |source| JoinError::Io { addr: owned_addr(), source };
    let line = line(&binding(tls.get_ref().1).map_err(io_err)?)?;
    let mut stream = BufReader::new(tls);
    stream.get_mut().write_all(&line).await.map_err(io_err)?;
    stream.get_mut().flush().await.map_err(io_err)?;
    match read_line(&mut stream, MAX_REPLY).await.map_err(io_err)? {
        Line::Empty => Err(JoinError::NoReply { addr: owned_addr() }),
        Line::TooLong => Err(JoinError::ReplyTooLarge { addr: owned_addr() }),
        Line::Complete(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| JoinError::Decode { addr: owned_addr(), source })
        }
    }
}

/// The outcome of reading one bounded line.
enum Line {
    /// The peer closed before sending anything.
    Empty,
    /// More than the limit without a newline.
    TooLong,
    /// The line, up to and including its newline if the peer sent one before closing.
    Complete(Vec<u8>),
}

/// Read up to a newline or end of stream, never buffering more than `limit` bytes plus one.
async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut BufReader<S>, limit: u64) -> io::Result<Line> {
    let mut bytes = Vec::new();
    (&mut *stream).take(limit + 1).read_until(b'\n', &mut bytes).await?;
    Ok(if bytes.is_empty() {
        Line::Empty
    } else if bytes.len() as u64 > limit {
        Line::TooLong
    } else {
        Line::Complete(bytes)
    })
}

/// Parse a 64-character hex SHA-256 fingerprint (either case).
fn parse_fingerprint(fingerprint: &str) -> Result<[u8; 32], JoinError> {
    let invalid = || JoinError::InvalidFingerprint(fingerprint.to_string());
    let hex = fingerprint.as_bytes();
    if hex.len() != 64 {
        return Err(invalid());
    }
    let mut pin = [0u8; 32];
    for (byte, pair) in pin.iter_mut().zip(hex.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(pin)
}

/// Accepts exactly the certificate whose SHA-256 is pinned, and still checks the handshake signatures so a
/// server cannot present the hub's certificate without its key.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
    /// Set when the certificate did not match, so the caller can report WrongServer instead of a TLS error.
    mismatch: Arc<AtomicBool>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = Sha256::digest(end_entity.as_ref());
        // Constant time: cheap, and keeps the comparison free of timing questions.
        let diff = actual.iter().zip(self.pin.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(ServerCertVerified::assertion())
        } else {
            self.mismatch.store(true, Ordering::SeqCst);
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Instant;
    use tokio::task::JoinSet;

    const T: Duration = Duration::from_secs(5);

    #[derive(Serialize, Deserialize)]
    struct Hello {
        name: String,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Reply {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        echo: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    }

    fn malformed(reason: String) -> Reply {
        Reply { echo: None, error: Some(reason) }
    }

    /// A hub on `bind` whose handler echoes the name; returns its address, identity and the calls it saw.
    async fn start_hub(bind: &str) -> (SocketAddr, JoinIdentity, mpsc::UnboundedReceiver<SocketAddr>) {
        let identity = JoinIdentity::generate().expect("identity");
        let listener = TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (calls_tx, mut calls_rx) = mpsc::channel::<JoinCall<Hello, Reply>>(8);
        let (seen_tx, seen_rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(listener, identity.clone(), calls_tx, malformed));
        tokio::spawn(async move {
            while let Some((hello, peer, _, reply)) = calls_rx.recv().await {
                let _ = seen_tx.send(peer);
                let _ = reply.send(Reply { echo: Some(hello.name), error: None });
            }
        });
        (addr, identity, seen_rx)
    }

    fn hello(name: &str) -> Hello {
        Hello { name: name.to_string() }
    }

    #[tokio::test]
    async fn round_trip_over_ipv4_localhost_and_ipv6() {
        let (addr, identity, mut seen) = start_hub("127.0.0.1:0").await;
        // A client that connects and says nothing must not hold up the others.
        let _silent = TcpStream::connect(addr).await.expect("silent client");
        let fp = identity.fingerprint();
        for target in [addr.to_string(), format!("localhost:{}", addr.port())] {
            let reply: Reply = call(&target, &fp, &hello("alice"), T).await.expect("call");
            assert_eq!(reply, Reply { echo: Some("alice".into()), error: None });
            assert!(seen.recv().await.expect("handler saw it").ip().is_loopback());
        }
        let upper: Reply = call(&addr.to_string(), &fp.to_uppercase(), &hello("bob"), T).await.expect("upper");
        assert_eq!(upper.echo.as_deref(), Some("bob"));

        let (addr6, identity6, _seen6) = start_hub("[::1]:0").await;
        let target = format!("[::1]:{}", addr6.port());
        let reply: Reply = call(&target, &identity6.fingerprint(), &hello("carol"), T).await.expect("ipv6 call");
        assert_eq!(reply.echo.as_deref(), Some("carol"));
    }

    #[tokio::test]
    async fn wrong_fingerprint_is_refused() {
        let (addr, identity, mut seen) = start_hub("127.0.0.1:0").await;
        let other = JoinIdentity::generate().expect("other identity");
        let err = call::<_, Reply>(&addr.to_string(), &other.fingerprint(), &hello("mallory"), T).await.unwrap_err();
        // The hub does not answer a client that names another certificate's service.
        assert!(matches!(err, JoinError::Unanswered { .. }), "{err:?}");
        assert!(err.to_string().contains("not the hub this token belongs to"), "{err}");
        // The hub is still fine, and the rejected call never reached the handler.
        let ok: Reply = call(&addr.to_string(), &identity.fingerprint(), &hello("x"), T).await.expect("call");
        assert_eq!(ok.echo.as_deref(), Some("x"));
        assert!(seen.recv().await.is_some());
        assert!(seen.try_recv().is_err());

        // A TLS server that answers any name (not a meshd hub) with another certificate is the wrong server.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let other_addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(other.server_config.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let err = call::<_, Reply>(&other_addr.to_string(), &identity.fingerprint(), &hello("x"), T).await.unwrap_err();
        assert!(matches!(err, JoinError::WrongServer { .. }), "{err:?}");
        assert!(err.to_string().contains("not the hub this token belongs to"), "{err}");
    }

    #[tokio::test]
    async fn hub_certificate_without_its_key_is_rejected() {
        // An impostor replays the hub's certificate (public) but signs the handshake with its own key.
        let hub = JoinIdentity::generate().expect("hub");
        let impostor = JoinIdentity::generate().expect("impostor");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(impostor.key_der().to_vec()));
        let signer = PROVIDER.key_provider.load_private_key(key).expect("impostor key");
        let stolen = rustls::sign::CertifiedKey::new(vec![CertificateDer::from(hub.cert_der().to_vec())], signer);
        let config = ServerConfig::builder_with_provider(PROVIDER.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(stolen)));
        let impostor = JoinIdentity { server_config: Arc::new(config), cert_der: hub.cert_der().to_vec(), ..impostor };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (calls_tx, mut calls_rx) = mpsc::channel::<JoinCall<Hello, Reply>>(1);
        tokio::spawn(serve(listener, impostor, calls_tx, malformed));

        let err = call::<_, Reply>(&addr.to_string(), &hub.fingerprint(), &hello("x"), T).await.unwrap_err();
        assert!(matches!(err, JoinError::Handshake { .. }), "{err:?}");
        assert!(calls_rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn bad_fingerprint_text_is_rejected_before_connecting() {
        for fp in ["", "abc", &"zz".repeat(32), &"é".repeat(32)] {
            let err = call::<_, Reply>("127.0.0.1:1", fp, &hello("x"), T).await.unwrap_err();
            assert!(matches!(err, JoinError::InvalidFingerprint(_)), "{fp:?}: {err:?}");
        }
    }

    #[tokio::test]
    async fn malformed_request_gets_malformed_reply() {
        let (addr, identity, mut seen) = start_hub("127.0.0.1:0").await;
        let reply: Reply = call(&addr.to_string(), &identity.fingerprint(), &42u32, T).await.expect("call");
        assert!(reply.echo.is_none());
        assert!(reply.error.expect("malformed reply").starts_with("invalid request"));

        let long = hello(&"a".repeat(MAX_REQUEST as usize));
        match call::<_, Reply>(&addr.to_string(), &identity.fingerprint(), &long, T).await {
            // The hub answers after 64 KiB and closes; the rest of the request may reset the connection first.
            Ok(reply) => assert!(reply.error.expect("too long").contains("longer than")),
            Err(err) => assert!(matches!(err, JoinError::Io { .. } | JoinError::NoReply { .. }), "{err:?}"),
        }
        assert!(seen.try_recv().is_err(), "handler must not see malformed requests");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let fp = JoinIdentity::generate().expect("identity").fingerprint();
        let timeout = Duration::from_millis(500);
        let started = Instant::now();
        let err = call::<_, Reply>(&addr.to_string(), &fp, &hello("x"), timeout).await.unwrap_err();
        assert!(matches!(err, JoinError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < timeout + Duration::from_secs(1));
        holder.abort();
    }

    /// What a stranger's connection gets back (until the server closes it), and how long that took.
    async fn answer_to(addr: SocketAddr, send: &[u8]) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(send).await.expect("send");
        let mut got = Vec::new();
        let read = tokio::time::timeout(HELLO_TIMEOUT + T, tcp.read_to_end(&mut got)).await.expect("closed in time");
        // A reset (the server closed with our bytes unread) is a close too.
        if let Err(e) = read {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        }
        (got, started.elapsed())
    }

    #[tokio::test]
    async fn strangers_get_not_a_byte_and_silent_ones_are_closed_within_the_hello_timeout() {
        let (addr, identity, mut seen) = start_hub("127.0.0.1:0").await;
        let (got, _) = answer_to(addr, b"GET / HTTP/1.0\r\n\r\n").await;
        assert!(got.is_empty(), "garbage got {got:?}");
        let (got, took) = answer_to(addr, b"").await;
        assert!(got.is_empty(), "a silent client got {got:?}");
        assert!(took >= HELLO_TIMEOUT - Duration::from_millis(100) && took < HELLO_TIMEOUT + Duration::from_secs(2));

        // A TLS client that does not know the service's name (a scanner) sees no certificate.
        for name in [SERVER_NAME, "other.meshd.invalid"] {
            let verifier = PinnedCert {
                pin: [0; 32],
                algorithms: PROVIDER.signature_verification_algorithms,
                mismatch: Arc::new(AtomicBool::new(false)),
            };
            let mismatch = verifier.mismatch.clone();
            let config = ClientConfig::builder_with_provider(PROVIDER.clone())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from(name).expect("name");
            assert!(TlsConnector::from(Arc::new(config)).connect(name, tcp).await.is_err());
            assert!(!mismatch.load(Ordering::SeqCst), "a certificate was shown to a client without the name");
        }
        assert!(seen.try_recv().is_err());

        // Those who know the fingerprint still get through.
        let ok: Reply = call(&addr.to_string(), &identity.fingerprint(), &hello("x"), T).await.expect("call");
        assert_eq!(ok.echo.as_deref(), Some("x"));
        assert_eq!(identity.server_name(), server_name(&parse_fingerprint(&identity.fingerprint()).expect("pin")));
        assert!(identity.server_name().ends_with(".meshd.invalid") && !identity.server_name().contains(SERVER_NAME));
    }

    #[test]
    fn identity_round_trips_through_der() {
        let identity = JoinIdentity::generate().expect("identity");
        let fp = identity.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let restored =
            JoinIdentity::from_der(identity.cert_der().to_vec(), identity.key_der().to_vec()).expect("from_der");
        assert_eq!(restored.fingerprint(), fp);

        let other = JoinIdentity::generate().expect("other");
        let cert = identity.cert_der().to_vec();
        let key = identity.key_der().to_vec();
        assert!(JoinIdentity::from_der(b"garbage".to_vec(), key.clone()).is_err());
        assert!(JoinIdentity::from_der(cert.clone(), b"garbage".to_vec()).is_err());
        assert!(JoinIdentity::from_der(cert, other.key_der().to_vec()).is_err(), "mismatched key accepted");

        let debug = format!("{identity:?}");
        let key_hex = hex::encode(&key);
        assert!(debug.contains(&fp) && debug.contains("redacted"), "{debug}");
        assert!(!debug.contains(&key_hex) && !debug.contains(&format!("{key:?}")), "{debug}");
    }

    #[tokio::test]
    async fn concurrent_calls_are_all_answered() {
        let (addr, identity, _seen) = start_hub("127.0.0.1:0").await;
        let mut calls = JoinSet::new();
        for i in 0..20 {
            let (target, fp) = (addr.to_string(), identity.fingerprint());
            calls.spawn(async move {
                let name = format!("host-{i}");
                let reply: Reply = call(&target, &fp, &hello(&name), T).await.expect("call");
                assert_eq!(reply.echo, Some(name));
            });
        }
        let mut answered = 0;
        while let Some(done) = calls.join_next().await {
            done.expect("call task");
            answered += 1;
        }
        assert_eq!(answered, 20);
    }
}
