//! HTTP inside terminated TLS, over the mesh to the service: each request is decided by
//! `meshd_core::relay::route` (served name, same authority, no `CONNECT` or absolute form), rewritten
//! (hop-by-hop headers and every `X-Forwarded-*`/`Forwarded` the client sent dropped, ours set from the real
//! connection) and sent as HTTP/1.1 over pooled connections from this host's mesh address. WebSockets pass
//! through: an HTTP/1.1 `Upgrade`, and an HTTP/2 extended `CONNECT` (RFC 8441) turned into the HTTP/1.1
//! handshake the service expects.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipnet::IpNet;
use tracing::debug;

use crate::host::admission::Permit;

use meshd_core::relay::route::{Forwarded, Head, OnRequest, Routes};

/// The body of what the relay sends: the service's, or its own short answer.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The longest a connection to a service may take to open over the mesh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that describe one hop only (RFC 9110 section 7.6.1), never passed on.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Headers a client could forge to pass for another address, scheme or host; replaced by the relay's own.
const FORWARDING: [&str; 5] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"];

/// The routes terminated TLS is decided by, replaced in place when the network changes.
pub type Table = Arc<RwLock<Arc<Routes>>>;

/// The read side of [`Table`].
pub fn current(table: &Table) -> Arc<Routes> {
    table.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Pooled HTTP/1.1 connections to services: over the mesh from this host's mesh address (so the service's node
/// admits them), or straight to a service of this host's own.
#[derive(Clone, Debug)]
pub struct Upstreams {
    mesh: Client<HttpConnector, Body>,
    local: Client<HttpConnector, Body>,
    ranges: Vec<IpNet>,
}

impl Upstreams {
    /// Connections to addresses in `ranges` (the mesh) leave from `source`; others as the host routes them.
    pub fn new(source: Option<IpAddr>, ranges: Vec<IpNet>) -> Upstreams {
        let client = |source| {
            let mut connector = HttpConnector::new();
            connector.set_local_address(source);
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
            Client::builder(TokioExecutor::new()).build(connector)
        };
        Upstreams { mesh: client(source), local: client(None), ranges }
    }

    /// The client for `upstream`.
    fn to(&self, upstream: SocketAddr) -> &Client<HttpConnector, Body> {
        if self.ranges.iter().any(|r| r.contains(&upstream.ip())) { &self.mesh } else { &self.local }
    }
}

/// One TLS connection's requests: for server name `name`, from `client`.
#[derive(Clone)]
pub struct Conn {
    /// The SNI of the connection.
    pub name: Arc<str>,
    /// The client's address (the real one: from the TCP connection, or the relay's PROXY header).
    pub client: IpAddr,
    /// The routes, read at every request.
    pub table: Table,
    /// Where requests go.
    pub upstreams: Upstreams,
    /// The connection's place under the listener's caps, held by a WebSocket upgraded from it too.
    pub permit: Arc<Permit>,
}

/// Answer one request of `conn`.
pub async fn handle(conn: Conn, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // More than one Host is a bad request (RFC 9112 section 3.2): which one a proxy and a service read may differ.
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return Ok(answer(400, "Bad Request"));
    }
    let routes = current(&conn.table);
    let decision = routes.on_https_request(&conn.name, &head(&req), conn.client);
    Ok(match decision {
        OnRequest::Proxy { upstream, forwarded } => forward(&conn, req, upstream, forwarded).await,
        OnRequest::Refuse(status, reason) => answer(status, reason),
        OnRequest::Redirect(location) => redirect(&location),
        // Not decided for terminated TLS (challenges come on the HTTP port or as TLS-ALPN-01).
        OnRequest::AnswerChallenge { .. } | OnRequest::ForwardChallenge(_) => answer(404, "Not Found"),
    })
}

/// The parts of `req` the routes decide on.
pub fn head<B>(req: &Request<B>) -> Head<'_> {
    let h2 = req.version() == Version::HTTP_2;
    let authority = if h2 {
        req.uri().authority().map(|a| a.as_str())
    } else {
        req.headers().get(header::HOST).and_then(|v| v.to_str().ok())
    };
    Head {
        method: req.method().as_str(),
        // Absolute form (`GET http://host/`) and authority form (`GET host:443`, CONNECT's): a target naming a
        // host, which HTTP/1.1 sends to proxies only (RFC 9112 section 3.2).
        absolute_form: !h2 && (req.uri().scheme().is_some() || req.uri().authority().is_some()),
        protocol: req.extensions().get::<hyper::ext::Protocol>().map(hyper::ext::Protocol::as_str),
        authority,
        path_and_query: req.uri().path_and_query().map_or("/", |p| p.as_str()),
    }
}

/// A short plain-text answer with `status`.
pub fn answer(status: u16, text: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("{text}\n")));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A permanent redirect keeping the method (308) to `location`.
pub fn redirect(location: &str) -> Response<Body> {
    let mut response = answer(308, "Permanent Redirect");
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// `text` as a body.
pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// No body.
fn empty() -> Body {
    Empty::new().map_err(|never: Infallible| match never {}).boxed()
}

/// Whether `req` is an HTTP/1.1 WebSocket handshake (`Connection: upgrade`, `Upgrade: websocket`).
fn is_h1_websocket<B>(req: &Request<B>) -> bool {
    let has = |name, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    req.version() != Version::HTTP_2 && has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

/// Send `req` to `upstream` with `forwarded`, and the service's answer back.
async fn forward(
    conn: &Conn,
    mut req: Request<Incoming>,
    upstream: SocketAddr,
    forwarded: Forwarded,
) -> Response<Body> {
    let h1_websocket = is_h1_websocket(&req);
    let h2_websocket = req.method() == Method::CONNECT
        && req.extensions().get::<hyper::ext::Protocol>().is_some_and(|p| p.as_str() == "websocket");
    let client_side = (h1_websocket || h2_websocket).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    join_cookies(&mut parts.headers);
    for name in FORWARDING {
        parts.headers.remove(name);
    }
    let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set(&mut parts.headers, "x-forwarded-for", &forwarded.for_addr.to_string());
    set(&mut parts.headers, "x-forwarded-proto", forwarded.proto);
    set(&mut parts.headers, "x-forwarded-host", &forwarded.host);
    set(&mut parts.headers, "host", &forwarded.host);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let Ok(uri) = format!("http://{upstream}{path}").parse() else { return answer(400, "Bad Request") };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let body = if h2_websocket {
        // RFC 8441 section 5: the HTTP/1.1 handshake the service expects, with a key of our own.
        parts.method = Method::GET;
        parts.headers.remove("sec-websocket-key");
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        set(&mut parts.headers, "sec-websocket-key", &key);
        empty()
    } else {
        body.boxed()
    };
    if h1_websocket || h2_websocket {
        set(&mut parts.headers, "connection", "upgrade");
        set(&mut parts.headers, "upgrade", "websocket");
    }
    let mut response = match conn.upstreams.to(upstream).request(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(e) => {
            debug!(%upstream, error = %e, "the service did not answer");
            return answer(502, "Bad Gateway");
        }
    };
    if let Some(client_side) = client_side
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let service_side = hyper::upgrade::on(&mut response);
        let permit = conn.permit.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let (Ok(client), Ok(service)) = tokio::join!(client_side, service_side) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(service)).await;
            }
        });
        let (mut parts, _) = response.into_parts();
        if h2_websocket {
            // An extended CONNECT is accepted with 200 and carries no handshake headers of HTTP/1.1.
            parts.status = StatusCode::OK;
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove("sec-websocket-accept");
        }
        return Response::from_parts(parts, empty());
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// Drop the hop-by-hop headers, and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// HTTP/2 may split cookies over several headers (RFC 9113 section 8.2.3); HTTP/1.1 wants one.
fn join_cookies(headers: &mut HeaderMap) {
    let cookies: Vec<&str> = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).collect();
    if cookies.len() > 1
        && let Ok(joined) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, joined);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["accept"]);
    }

    #[test]
    fn split_cookies_are_joined_for_http_1_1() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut headers);
        assert_eq!(headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    }
}
