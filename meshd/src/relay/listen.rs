//! The listeners of public names: the relay's HTTPS port (each TLS connection decided by the server name of its
//! whole ClientHello: passed through to the service's node, terminated here, or the CA's TLS-ALPN-01 validation
//! answered), the relay's HTTP port (HTTP-01 answered, else a redirect to HTTPS), and, on a node with
//! passthrough names, the terminator on its mesh address that the relay passes their TLS streams to, each after
//! a PROXY v2 header with the client's address.
//!
//! Strangers hold nothing for long: connections are admitted under per-source and total caps (evictable until
//! their ClientHello arrives), the ClientHello must come whole within [`HELLO_TIMEOUT`] and [`MAX_HELLO`]
//! bytes, the handshake within [`HANDSHAKE_TIMEOUT`], request headers within [`HEADER_TIMEOUT`].

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::certs::Certificates;
use super::forward::{self, Conn, Table, Upstreams};
use crate::host::admission::{Caps, Gate, Permit};
use crate::host::socket;
use meshd_core::relay::proxy::{self, Read};
use meshd_core::relay::route::{OnHello, OnRequest};

/// The largest ClientHello read, bytes: post-quantum key shares make them 1.5-2 KiB and spread them over several
/// TCP segments and TLS records; 16 KiB is a record's most (RFC 8446 section 5.1).
pub const MAX_HELLO: usize = 16 * 1024;

/// The longest a client may take to send its whole ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a TLS handshake may take once the ClientHello is in.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a client may take to send a request's headers (HTTP/1.1).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head, bytes (HTTP/1.1 buffer; HTTP/2 header list).
const MAX_HEAD: usize = 64 * 1024;

/// Connections one source may hold on a public port at a time (loopback counts as one source, an IPv6 /64 too).
pub const PER_SOURCE: usize = 256;

/// Connections all sources may hold on the HTTPS port at a time (two descriptors each: the client's and the
/// service's); the HTTP port takes a quarter of these, and of [`PER_SOURCE`].
pub const TOTAL: usize = 4096;

/// Everything the listeners share; the routes and the passthrough sources change in place.
pub struct Shared {
    /// The relay's routes (public names), for ClientHellos and the HTTP port.
    pub public: Table,
    /// The names whose TLS ends here, for requests inside it.
    pub terminated: Table,
    /// The relays whose connections the passthrough terminator takes.
    pub passthrough_from: RwLock<BTreeSet<IpAddr>>,
    /// Certificates and validation answers.
    pub certs: Arc<Certificates>,
    /// TLS of the served names, made once: its session tickets (and cache) let clients resume.
    server_config: Arc<rustls::ServerConfig>,
    /// TLS of TLS-ALPN-01 validations.
    challenge_config: Arc<rustls::ServerConfig>,
    /// Connections to services.
    pub upstreams: RwLock<Upstreams>,
    /// This host's mesh address: the source of spliced connections.
    pub source: RwLock<Option<IpAddr>>,
    https_gate: Arc<Gate>,
    http_gate: Arc<Gate>,
    passthrough_gate: Arc<Gate>,
}

impl Shared {
    /// Nothing served yet. Errors: rustls refused the TLS configuration.
    pub fn new(certs: Arc<Certificates>) -> Result<Shared, rustls::Error> {
        let caps = Caps { per_source: PER_SOURCE, total: TOTAL, descriptors: 2, internet: true };
        // The HTTP port only answers validations and redirects: one descriptor a connection, fewer of them.
        let http = Caps { per_source: PER_SOURCE / 4, total: TOTAL / 4, descriptors: 1, internet: true };
        let mesh = Caps { per_source: TOTAL, total: TOTAL, descriptors: 2, internet: false };
        Ok(Shared {
            server_config: certs.server_config()?,
            challenge_config: certs.challenge_config(),
            public: Table::default(),
            terminated: Table::default(),
            passthrough_from: RwLock::default(),
            certs,
            upstreams: RwLock::new(Upstreams::new(None, Vec::new())),
            source: RwLock::default(),
            https_gate: Gate::new("public HTTPS", caps),
            http_gate: Gate::new("public HTTP", http),
            passthrough_gate: Gate::new("passthrough terminator", mesh),
        })
    }

    fn upstreams(&self) -> Upstreams {
        self.upstreams.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Accept on the relay's HTTPS port until the task is aborted.
pub async fn serve_https(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = socket::accept(&listener, "public HTTPS").await;
        let Some(pending) = shared.https_gate.admit_evicting(peer.ip()) else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut pending = pending;
            let mut stream = stream;
            let hello = tokio::select! {
                hello = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream)) => hello,
                () = pending.evicted() => return,
            };
            let Ok(Ok(hello)) = hello else { return };
            // Kept evictable for its whole life: a source holding the most connections loses its oldest to a
            // newcomer once the caps are full, so idle connections from a few sources cannot shut everyone out.
            let (permit, mut eviction) = pending.into_parts();
            let permit = Arc::new(permit);
            let alpn: Vec<&[u8]> = hello.alpn.iter().map(Vec::as_slice).collect();
            let decision = forward::current(&shared.public).on_hello(hello.sni.as_deref(), &alpn);
            let replay = Replay::new(hello.bytes, stream);
            let handled = async {
                match decision {
                    OnHello::Refuse => refuse_name(replay).await,
                    OnHello::Splice(upstream) => splice(replay, peer, upstream, &shared).await,
                    OnHello::Terminate(name) => terminate(replay, peer.ip(), name, &shared, permit).await,
                    OnHello::AnswerChallenge(_) => answer_challenge(replay, &shared).await,
                }
            };
            tokio::select! {
                () = handled => {}
                () = eviction.wait() => debug!(%peer, "evicted for a newer connection"),
            }
        });
    }
}

/// Accept on the relay's HTTP port until the task is aborted: ACME HTTP-01 answers and redirects only.
pub async fn serve_http(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = socket::accept(&listener, "public HTTP").await;
        // Evictable for its whole life, as on the HTTPS port: idle connections cannot hold the port (or the
        // descriptors it shares with the rest of meshd) for long.
        let Some(pending) = shared.http_gate.admit_evicting(peer.ip()) else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (_permit, mut eviction) = pending.into_parts();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(on_http(&shared, peer, req).await) }
            });
            tokio::select! {
                _ = http1().serve_connection(TokioIo::new(stream), service) => {}
                () = eviction.wait() => {}
            }
        });
    }
}

/// The plain HTTP/1.1 server of the HTTP port and of forwarded validations: a request head within
/// [`HEADER_TIMEOUT`] and [`MAX_HEAD`] bytes.
fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD);
    builder
}

/// One request on the HTTP port.
async fn on_http(
    shared: &Shared,
    peer: SocketAddr,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<forward::Body> {
    let decision = forward::current(&shared.public).on_http_request(&forward::head(&req));
    match decision {
        OnRequest::AnswerChallenge { token, .. } => match shared.certs.key_authorization(&token) {
            Some(answer) => {
                let mut response = hyper::Response::new(forward::full(answer));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/octet-stream"),
                );
                response
            }
            None => forward::answer(404, "Not Found"),
        },
        OnRequest::ForwardChallenge(terminator) => forward_challenge(shared, peer, terminator, req).await,
        OnRequest::Redirect(location) => forward::redirect(&location),
        OnRequest::Refuse(status, reason) => forward::answer(status, reason),
        OnRequest::Proxy { .. } => forward::answer(404, "Not Found"),
    }
}

/// Pass an HTTP-01 validation of a passthrough name to the node that holds its answer: over a connection to its
/// terminator, after a PROXY v2 header like a TLS stream's.
async fn forward_challenge(
    shared: &Shared,
    peer: SocketAddr,
    terminator: SocketAddr,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<forward::Body> {
    let relayed = async {
        let source = *shared.source.read().unwrap_or_else(PoisonError::into_inner);
        let mut stream = connect_from(source, terminator).await?;
        let local = stream.local_addr()?;
        stream.write_all(&proxy::header(peer, local)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
        tokio::spawn(conn);
        let (parts, _) = req.into_parts();
        let request = hyper::Request::from_parts(parts, http_body_util::Empty::<bytes::Bytes>::new());
        sender.send_request(request).await.map_err(io::Error::other)
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, relayed).await {
        Ok(Ok(response)) => {
            use http_body_util::BodyExt as _;
            response.map(|b| b.boxed())
        }
        _ => forward::answer(502, "Bad Gateway"),
    }
}

/// Accept the relay's passed-through streams on this node's mesh address: only from a relay, each after a PROXY
/// v2 header; then TLS for this node's passthrough names (or a forwarded HTTP-01 validation).
pub async fn serve_passthrough(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = socket::accept(&listener, "passthrough terminator").await;
        // A relay's meshd connects from a port below 1024: another user on the relay, whose connections leave from
        // the same mesh address, cannot bind one, and so cannot pass for it with a PROXY header of its own.
        let from_relay = shared.passthrough_from.read().unwrap_or_else(PoisonError::into_inner).contains(&peer.ip());
        if !from_relay || peer.port() >= 1024 {
            debug!(%peer, "not a relay's meshd: closed");
            continue;
        }
        let Some(permit) = shared.passthrough_gate.admit(peer.ip()) else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let permit = Arc::new(permit);
            let mut stream = stream;
            let Ok(Ok((client, rest))) = tokio::time::timeout(HELLO_TIMEOUT, read_proxy_header(&mut stream)).await
            else {
                return;
            };
            let mut replay = Replay::new(rest, stream);
            let mut first = [0u8; 1];
            if replay.peek(&mut first).await.is_err() {
                return;
            }
            // A TLS record starts with its content type, 22 for a handshake (RFC 8446 section 5.1).
            if first[0] == 22 {
                let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut replay)).await {
                    Ok(Ok(hello)) => hello,
                    _ => return,
                };
                let alpn: Vec<&[u8]> = hello.alpn.iter().map(Vec::as_slice).collect();
                let decision = forward::current(&shared.terminated).on_hello(hello.sni.as_deref(), &alpn);
                let replay = Replay::new(hello.bytes, replay);
                match decision {
                    OnHello::Terminate(name) => terminate(replay, client.ip(), name, &shared, permit).await,
                    OnHello::AnswerChallenge(_) => answer_challenge(replay, &shared).await,
                    OnHello::Refuse | OnHello::Splice(_) => {}
                }
            } else {
                serve_forwarded_challenge(replay, &shared).await;
            }
        });
    }
}

/// Answer an HTTP-01 validation the relay passed on: the token's key authorization, nothing else.
async fn serve_forwarded_challenge<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    shared: &Arc<Shared>,
) {
    let certs = shared.certs.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let certs = certs.clone();
        async move {
            let token = req.uri().path().strip_prefix(meshd_core::relay::route::ACME_CHALLENGE_PATH);
            let response = match token.and_then(|t| certs.key_authorization(t)) {
                Some(answer) => hyper::Response::new(forward::full(answer)),
                None => forward::answer(404, "Not Found"),
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let _ = http1().serve_connection(TokioIo::new(stream), service).await;
}

/// The PROXY v2 header at the start of `stream`: the client's address and the bytes read past the header.
async fn read_proxy_header(stream: &mut TcpStream) -> io::Result<(SocketAddr, Vec<u8>)> {
    let mut bytes = Vec::with_capacity(proxy::MAX_HEADER);
    loop {
        match proxy::read(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            Read::Header { client: Some(client), len } => return Ok((client, bytes.split_off(len))),
            // A LOCAL header (no client): the relay sends none.
            Read::Header { client: None, .. } => return Err(io::ErrorKind::InvalidData.into()),
            Read::Incomplete => {
                let mut chunk = [0u8; proxy::MAX_HEADER];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                bytes.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// Pass the TLS stream of `client` to `upstream` over the mesh, after a PROXY v2 header with its address.
async fn splice(mut replay: Replay<TcpStream>, client: SocketAddr, upstream: SocketAddr, shared: &Shared) {
    let source = *shared.source.read().unwrap_or_else(PoisonError::into_inner);
    let Ok(Ok(mut out)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_from(source, upstream)).await else {
        debug!(%upstream, "the node's terminator did not answer");
        return;
    };
    let local = replay.inner.local_addr().unwrap_or(client);
    if out.write_all(&proxy::header(client, local)).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut replay, &mut out).await;
}

/// A TCP connection to a node's terminator `to`, from `source` (this host's mesh address) and a port below 1024:
/// the terminator takes the relay's mesh address only from such a port, which no other user on the relay can bind.
async fn connect_from(source: Option<IpAddr>, to: SocketAddr) -> io::Result<TcpStream> {
    let unspecified: IpAddr = if to.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let from = source.filter(|s| s.is_ipv4() == to.is_ipv4()).unwrap_or(unspecified);
    let stream = crate::host::socket::connect_from_privileged_port(from, to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Finish the TLS handshake for `name` and serve HTTP/1.1 and HTTP/2 inside it, for `client`. The connection is
/// closed once nothing has crossed it for [`IDLE_TIMEOUT`]; `permit` (its place under the caps) is held as long as
/// the connection or a WebSocket upgraded from it lives.
async fn terminate<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    replay: S,
    client: IpAddr,
    name: String,
    shared: &Shared,
    permit: Arc<Permit>,
) {
    let (io, last) = Idle::new(replay);
    let acceptor = TlsAcceptor::from(shared.server_config.clone());
    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await else { return };
    let conn =
        Conn { name: name.into(), client, table: shared.terminated.clone(), upstreams: shared.upstreams(), permit };
    let service = service_fn(move |req| forward::handle(conn.clone(), req));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_header_list_size(MAX_HEAD as u32)
        .max_concurrent_streams(256);
    tokio::select! {
        _ = builder.serve_connection_with_upgrades(TokioIo::new(tls), service) => {}
        () = idle_for(&last, IDLE_TIMEOUT) => debug!(%client, "idle connection closed"),
    }
}

/// A fatal `unrecognized_name` alert (RFC 8446 section 6.2, RFC 6066 section 3), then close: no certificate and no
/// page for a name not served, but a client (a shop whose DNS is wrong) sees why.
async fn refuse_name<S: AsyncWrite + Unpin>(mut stream: S) {
    // A TLS 1.2-versioned alert record: content type 21, legacy version 3.3, length 2, fatal (2), 112.
    const UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];
    let _ = stream.write_all(&UNRECOGNIZED_NAME).await;
    let _ = stream.shutdown().await;
}

/// Answer the CA's TLS-ALPN-01 validation: the handshake with the challenge certificate is the answer.
async fn answer_challenge<S: AsyncRead + AsyncWrite + Unpin>(replay: S, shared: &Shared) {
    let acceptor = TlsAcceptor::from(shared.challenge_config.clone());
    if let Ok(Ok(mut tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(replay)).await {
        let _ = tls.shutdown().await;
    }
}

/// How long a terminated connection may pass no byte either way before it is closed (nginx closes idle keep-alive
/// connections after 75 s and idle proxied reads after 60 s): idle connections would otherwise hold their places
/// under the caps for ever (HTTP/2 has no idle limit of its own). A WebSocket upgraded from it lives on its own.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Milliseconds since [`Idle::new`] of the last byte read or written.
type LastActive = Arc<(std::time::Instant, std::sync::atomic::AtomicU64)>;

/// A stream that notes when it last moved a byte.
struct Idle<S> {
    inner: S,
    last: LastActive,
}

impl<S> Idle<S> {
    fn new(inner: S) -> (Idle<S>, LastActive) {
        let last = Arc::new((std::time::Instant::now(), std::sync::atomic::AtomicU64::new(0)));
        (Idle { inner, last: last.clone() }, last)
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.last.0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.1.store(elapsed, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves once `last` shows no byte for `limit`.
async fn idle_for(last: &LastActive, limit: Duration) {
    loop {
        let quiet =
            last.0.elapsed().saturating_sub(Duration::from_millis(last.1.load(std::sync::atomic::Ordering::Relaxed)));
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(limit - quiet).await;
    }
}

/// A whole ClientHello: the server name and ALPN protocols it names, and every byte read for it.
struct Hello {
    sni: Option<String>,
    alpn: Vec<Vec<u8>>,
    bytes: Vec<u8>,
}

/// Read until the ClientHello is whole (it may span several TLS records and TCP segments), at most
/// [`MAX_HELLO`] bytes.
async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Hello> {
    let mut acceptor = Acceptor::default();
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if bytes.len() + n > MAX_HELLO {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "ClientHello too large"));
        }
        bytes.extend_from_slice(&chunk[..n]);
        let mut fed = &chunk[..n];
        while !fed.is_empty() {
            acceptor.read_tls(&mut fed)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                return Ok(Hello {
                    sni: hello.server_name().map(str::to_owned),
                    alpn: hello.alpn().map(|a| a.map(<[u8]>::to_vec).collect()).unwrap_or_default(),
                    bytes,
                });
            }
            Ok(None) => {}
            Err((e, _)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// A stream that gives back the bytes already read from it first.
pub struct Replay<S> {
    read: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> Replay<S> {
    fn new(read: Vec<u8>, inner: S) -> Replay<S> {
        Replay { read, at: 0, inner }
    }

    /// Fill `buf` with the next bytes without consuming them.
    async fn peek(&mut self, buf: &mut [u8]) -> io::Result<()> {
        while self.read.len() - self.at < buf.len() {
            let mut chunk = [0u8; 512];
            let n = self.inner.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.read.extend_from_slice(&chunk[..n]);
        }
        buf.copy_from_slice(&self.read[self.at..self.at + buf.len()]);
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.read.len() {
            let n = buf.remaining().min(self.read.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.read[at..at + n]);
            self.at += n;
            if self.at == self.read.len() {
                self.read = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that keeps moving bytes is not idle; one that stops is, after the limit.
    #[tokio::test]
    async fn a_connection_is_idle_only_once_no_byte_moved_for_the_limit() {
        let (near, mut far) = tokio::io::duplex(64);
        let (mut idle, last) = Idle::new(near);
        let limit = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let watch = tokio::spawn(async move { idle_for(&last, limit).await });
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            idle.write_all(b"x").await.unwrap();
            far.read_exact(&mut [0u8; 1]).await.unwrap();
        }
        assert!(!watch.is_finished(), "a busy connection counted as idle");
        watch.await.unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(900), "idle after {elapsed:?}, before the limit");
        assert!(elapsed < Duration::from_millis(1500), "idle only after {elapsed:?}");
    }
}
