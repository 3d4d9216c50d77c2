//! What a relay does with what arrives on its public ports, as decisions without I/O: a TLS connection by
//! the server name (SNI) and protocols (ALPN) of its ClientHello, a request inside terminated TLS by its
//! method, target and authority, and a request on the HTTP port (ACME challenges, else a redirect to HTTPS).
//!
//! Only configured names are served: an unknown or missing server name gets no certificate and no page, a
//! request whose authority is not the name its TLS session was made for is refused (421), and the relay is
//! no open proxy (`CONNECT` other than a WebSocket's extended CONNECT, RFC 8441, and absolute-form targets
//! are refused). It forwards only to the exposed service over the mesh.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The ALPN protocol of a TLS-ALPN-01 validation (RFC 8737 section 6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Where HTTP-01 challenge responses are fetched (RFC 8555 section 8.3).
pub const ACME_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// Where TLS ends for a public name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// On the relay, which holds the certificate and proxies HTTP to the service over the mesh (the default).
    #[default]
    Terminate,
    /// On the service's node: the relay passes the TLS stream through by its server name and never holds
    /// the key or sees plaintext.
    Passthrough,
}

impl TlsMode {
    /// `terminate` or `passthrough`, as in the CLI and the declaration file.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Terminate => "terminate",
            TlsMode::Passthrough => "passthrough",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "terminate" => Ok(TlsMode::Terminate),
            "passthrough" => Ok(TlsMode::Passthrough),
            _ => Err(format!("TLS mode {s:?} is neither terminate nor passthrough")),
        }
    }
}

/// One public name the relay serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// How TLS is handled.
    pub tls: TlsMode,
    /// Where the relay sends the name's traffic over the mesh: the service's mesh address and port
    /// (`Terminate`: plain HTTP), or the service node's TLS terminator (`Passthrough`: the TLS stream, and
    /// HTTP-01 challenges on the HTTP port).
    pub upstream: SocketAddr,
}

/// The relay's public names, lowercase, without a trailing dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    by_name: BTreeMap<String, Route>,
    https_port: u16,
}

/// What to do with a TLS connection, from its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnHello {
    /// Pass the whole stream (the ClientHello read so far first) to this upstream.
    Splice(SocketAddr),
    /// Terminate TLS with the certificate of this name.
    Terminate(String),
    /// Answer this name's TLS-ALPN-01 validation with its challenge certificate, then close.
    AnswerChallenge(String),
    /// Close without a byte: no server name, or one the relay does not serve.
    Refuse,
}

/// The parts of a request's head the relay decides on (HTTP/1.1 request line and `Host`, or HTTP/2
/// pseudo-headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    /// The method.
    pub method: &'a str,
    /// The request target was in absolute form (`GET http://other/ HTTP/1.1`, RFC 9112 section 3.2.2).
    /// HTTP/2 requests carry their authority in `:authority` and are never absolute form here.
    pub absolute_form: bool,
    /// `:protocol` of an HTTP/2 extended CONNECT (RFC 8441), e.g. `websocket`.
    pub protocol: Option<&'a str>,
    /// The `Host` header or `:authority`: host, and port if given.
    pub authority: Option<&'a str>,
    /// The path and query.
    pub path_and_query: &'a str,
}

/// The `X-Forwarded-*` values a proxied request carries, made from the real connection; any the client
/// sent are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// `X-Forwarded-For`: the client's address.
    pub for_addr: IpAddr,
    /// `X-Forwarded-Proto`: `https`.
    pub proto: &'static str,
    /// `X-Forwarded-Host`: the public name (with the port when it is not the default).
    pub host: String,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnRequest {
    /// Send it to this upstream with these forwarding headers.
    Proxy {
        /// The service's mesh address and port.
        upstream: SocketAddr,
        /// The headers that replace the client's `X-Forwarded-*`.
        forwarded: Forwarded,
    },
    /// Answer an HTTP-01 challenge of this name with the key authorization of `token`.
    AnswerChallenge {
        /// The name.
        name: String,
        /// The token from the path.
        token: String,
    },
    /// Pass an HTTP-01 challenge to the service node, which holds the key authorization (passthrough).
    ForwardChallenge(SocketAddr),
    /// Answer with a redirect (308, method and body kept) to this location.
    Redirect(String),
    /// Answer with this status and reason, and close.
    Refuse(u16, &'static str),
}

impl Routes {
    /// The relay's routes, serving HTTPS on `https_port`; names are taken lowercase and without a trailing dot.
    pub fn new(routes: impl IntoIterator<Item = (String, Route)>, https_port: u16) -> Routes {
        let by_name = routes.into_iter().map(|(name, route)| (normalise(&name), route)).collect();
        Routes { by_name, https_port }
    }

    /// The route of `name`, if served.
    pub fn get(&self, name: &str) -> Option<&Route> {
        self.by_name.get(&normalise(name))
    }

    /// What to do with a TLS connection whose ClientHello names `sni` and offers `alpn`.
    pub fn on_hello(&self, sni: Option<&str>, alpn: &[&[u8]]) -> OnHello {
        let Some((name, route)) = sni.and_then(|sni| self.by_name.get_key_value(&normalise(sni))) else {
            return OnHello::Refuse;
        };
        // The CA's validation offers acme-tls/1 alone (RFC 8737 section 3).
        let validation = alpn == [ACME_TLS_ALPN];
        match (route.tls, validation) {
            (TlsMode::Passthrough, _) => OnHello::Splice(route.upstream),
            (TlsMode::Terminate, true) => OnHello::AnswerChallenge(name.clone()),
            (TlsMode::Terminate, false) => OnHello::Terminate(name.clone()),
        }
    }

    /// What to do with a request inside TLS terminated for `name` (the SNI's), from `client`.
    pub fn on_https_request(&self, name: &str, head: &Head<'_>, client: IpAddr) -> OnRequest {
        let Some(route) = self.get(name) else { return OnRequest::Refuse(421, "Misdirected Request") };
        if let Some(refused) = not_proxied(head) {
            return refused;
        }
        match head.authority.map(|a| self.same_site(a, name, self.https_port)) {
            Some(true) => {}
            Some(false) => return OnRequest::Refuse(421, "Misdirected Request"),
            None => return OnRequest::Refuse(400, "Bad Request"),
        }
        OnRequest::Proxy {
            upstream: route.upstream,
            forwarded: Forwarded { for_addr: client, proto: "https", host: self.public_host(name) },
        }
    }

    /// What to do with a request on the HTTP port: an ACME HTTP-01 challenge of a served name is answered
    /// (terminate) or passed to the service node (passthrough); anything else for a served name is
    /// redirected to HTTPS, path and query kept; other names get no page.
    pub fn on_http_request(&self, head: &Head<'_>) -> OnRequest {
        if let Some(refused) = not_proxied(head) {
            return refused;
        }
        let Some(authority) = head.authority else { return OnRequest::Refuse(400, "Bad Request") };
        let host = host_of(authority);
        let Some((name, route)) = self.by_name.get_key_value(&normalise(host)) else {
            return OnRequest::Refuse(404, "Not Found");
        };
        if let Some(token) = head.path_and_query.strip_prefix(ACME_CHALLENGE_PATH) {
            if head.method == "GET" && is_token(token) {
                return match route.tls {
                    TlsMode::Terminate => OnRequest::AnswerChallenge { name: name.clone(), token: token.to_owned() },
                    TlsMode::Passthrough => OnRequest::ForwardChallenge(route.upstream),
                };
            }
            return OnRequest::Refuse(404, "Not Found");
        }
        OnRequest::Redirect(format!("https://{}{}", self.public_host(name), head.path_and_query))
    }

    /// Whether `authority` (host, and port if given) names `name` on `port`.
    fn same_site(&self, authority: &str, name: &str, port: u16) -> bool {
        let host = host_of(authority);
        let port_given = authority.strip_prefix(host).and_then(|rest| rest.strip_prefix(':'));
        normalise(host) == normalise(name) && port_given.is_none_or(|p| p.parse() == Ok(port))
    }

    /// `name`, with the HTTPS port when it is not 443.
    fn public_host(&self, name: &str) -> String {
        match self.https_port {
            443 => normalise(name),
            port => format!("{}:{port}", normalise(name)),
        }
    }
}

/// The refusal of a request that would make the relay a proxy for something else.
fn not_proxied(head: &Head<'_>) -> Option<OnRequest> {
    if head.absolute_form {
        return Some(OnRequest::Refuse(400, "Bad Request"));
    }
    let websocket = head.protocol.is_some_and(|p| p.eq_ignore_ascii_case("websocket"));
    if head.method == "CONNECT" && !websocket {
        return Some(OnRequest::Refuse(405, "Method Not Allowed"));
    }
    // The asterisk form (`OPTIONS *`, RFC 9112 section 3.2.4) asks about the relay itself, which has no options to
    // announce, and the service could not be asked in that form over the pooled client: 400, as nginx answers it.
    (!head.path_and_query.starts_with('/')).then_some(OnRequest::Refuse(400, "Bad Request"))
}

/// The host of an authority (`name`, `name:port`, `[v6]:port`), without the port.
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |end| &authority[..=end]);
    }
    authority.rsplit_once(':').map_or(authority, |(host, _)| host)
}

/// An ACME token: base64url characters only (RFC 8555 section 8.3), so nothing else of a path matches.
fn is_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A name as compared: lowercase, without a trailing dot.
fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(https_port: u16) -> Routes {
        let route = |tls, upstream: &str| Route { tls, upstream: upstream.parse().unwrap() };
        Routes::new(
            [
                ("pay.shop.example".to_owned(), route(TlsMode::Terminate, "10.77.0.9:23000")),
                ("Node.Shop.Example.".to_owned(), route(TlsMode::Passthrough, "10.77.0.3:1021")),
            ],
            https_port,
        )
    }

    fn head<'a>(method: &'a str, authority: Option<&'a str>, path_and_query: &'a str) -> Head<'a> {
        Head { method, absolute_form: false, protocol: None, authority, path_and_query }
    }

    #[test]
    fn a_client_hello_is_terminated_spliced_answered_or_refused_by_its_server_name() {
        let r = routes(443);
        let h2: &[&[u8]] = &[b"h2", b"http/1.1"];
        assert_eq!(r.on_hello(Some("pay.shop.example"), h2), OnHello::Terminate("pay.shop.example".into()));
        assert_eq!(r.on_hello(Some("PAY.shop.example."), &[]), OnHello::Terminate("pay.shop.example".into()));
        assert_eq!(r.on_hello(Some("node.shop.example"), h2), OnHello::Splice("10.77.0.3:1021".parse().unwrap()));
        // The CA's TLS-ALPN-01 validation: answered here in terminate mode, by the node in passthrough.
        let acme: &[&[u8]] = &[ACME_TLS_ALPN];
        assert_eq!(r.on_hello(Some("pay.shop.example"), acme), OnHello::AnswerChallenge("pay.shop.example".into()));
        assert_eq!(r.on_hello(Some("node.shop.example"), acme), OnHello::Splice("10.77.0.3:1021".parse().unwrap()));
        // acme-tls/1 among others is no validation: a client cannot get the challenge certificate by asking.
        let mixed: &[&[u8]] = &[b"h2", ACME_TLS_ALPN];
        assert_eq!(r.on_hello(Some("pay.shop.example"), mixed), OnHello::Terminate("pay.shop.example".into()));
        for unknown in [None, Some(""), Some("shop.example"), Some("evil.pay.shop.example"), Some("10.77.0.9")] {
            assert_eq!(r.on_hello(unknown, h2), OnHello::Refuse, "{unknown:?}");
        }
    }

    #[test]
    fn a_request_is_proxied_with_forwarding_headers_only_for_the_name_of_its_tls_session() {
        let r = routes(443);
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let proxied = OnRequest::Proxy {
            upstream: "10.77.0.9:23000".parse().unwrap(),
            forwarded: Forwarded { for_addr: client, proto: "https", host: "pay.shop.example".into() },
        };
        for authority in ["pay.shop.example", "Pay.Shop.Example", "pay.shop.example:443", "pay.shop.example."] {
            let got =
                r.on_https_request("pay.shop.example", &head("POST", Some(authority), "/api/v1/invoices"), client);
            assert_eq!(got, proxied, "{authority}");
        }
        // Another name than the SNI's (domain fronting), another port, none at all.
        let misdirected = OnRequest::Refuse(421, "Misdirected Request");
        for authority in ["node.shop.example", "pay.shop.example:8443", "localhost", "10.77.0.9:23000"] {
            let got = r.on_https_request("pay.shop.example", &head("GET", Some(authority), "/"), client);
            assert_eq!(got, misdirected, "{authority}");
        }
        assert_eq!(
            r.on_https_request("pay.shop.example", &head("GET", None, "/"), client),
            OnRequest::Refuse(400, "Bad Request")
        );
        assert_eq!(r.on_https_request("other.example", &head("GET", Some("other.example"), "/"), client), misdirected);
    }

    #[test]
    fn the_relay_is_no_open_proxy_but_carries_websockets_over_http2() {
        let r = routes(443);
        let client: IpAddr = "2001:db8::7".parse().unwrap();
        let connect = head("CONNECT", Some("pay.shop.example:443"), "");
        assert_eq!(
            r.on_https_request("pay.shop.example", &connect, client),
            OnRequest::Refuse(405, "Method Not Allowed")
        );
        let absolute = Head { absolute_form: true, ..head("GET", Some("pay.shop.example"), "/") };
        assert_eq!(r.on_https_request("pay.shop.example", &absolute, client), OnRequest::Refuse(400, "Bad Request"));
        assert_eq!(r.on_http_request(&absolute), OnRequest::Refuse(400, "Bad Request"));
        let asterisk = head("OPTIONS", Some("pay.shop.example"), "*");
        assert_eq!(r.on_https_request("pay.shop.example", &asterisk, client), OnRequest::Refuse(400, "Bad Request"));
        assert_eq!(r.on_http_request(&asterisk), OnRequest::Refuse(400, "Bad Request"));
        let options = head("OPTIONS", Some("pay.shop.example"), "/api");
        assert!(matches!(r.on_https_request("pay.shop.example", &options, client), OnRequest::Proxy { .. }));
        // RFC 8441: a WebSocket over HTTP/2 is an extended CONNECT to the site itself.
        let websocket = Head { protocol: Some("websocket"), ..head("CONNECT", Some("pay.shop.example"), "/ws") };
        assert!(matches!(r.on_https_request("pay.shop.example", &websocket, client), OnRequest::Proxy { .. }));
        let tunnel = Head { protocol: Some("connect-udp"), ..head("CONNECT", Some("pay.shop.example"), "/") };
        assert_eq!(
            r.on_https_request("pay.shop.example", &tunnel, client),
            OnRequest::Refuse(405, "Method Not Allowed")
        );
    }

    #[test]
    fn the_http_port_answers_challenges_and_redirects_the_rest_keeping_path_and_query() {
        let r = routes(443);
        let token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
        let challenge = format!("{ACME_CHALLENGE_PATH}{token}");
        assert_eq!(
            r.on_http_request(&head("GET", Some("pay.shop.example"), &challenge)),
            OnRequest::AnswerChallenge { name: "pay.shop.example".into(), token: token.into() }
        );
        assert_eq!(
            r.on_http_request(&head("GET", Some("node.shop.example:80"), &challenge)),
            OnRequest::ForwardChallenge("10.77.0.3:1021".parse().unwrap())
        );
        for bad in ["", "../../etc/passwd", "a/b", "tok?x=1", "tok%2e"] {
            let path = format!("{ACME_CHALLENGE_PATH}{bad}");
            assert_eq!(
                r.on_http_request(&head("GET", Some("pay.shop.example"), &path)),
                OnRequest::Refuse(404, "Not Found"),
                "{bad}"
            );
        }
        assert_eq!(
            r.on_http_request(&head("POST", Some("pay.shop.example"), &challenge)),
            OnRequest::Refuse(404, "Not Found")
        );
        assert_eq!(
            r.on_http_request(&head("POST", Some("Pay.Shop.Example:80"), "/i/abc?lang=de&x=%20")),
            OnRequest::Redirect("https://pay.shop.example/i/abc?lang=de&x=%20".into())
        );
        assert_eq!(
            routes(8443).on_http_request(&head("GET", Some("pay.shop.example"), "/")),
            OnRequest::Redirect("https://pay.shop.example:8443/".into())
        );
        assert_eq!(
            r.on_http_request(&head("GET", Some("elsewhere.example"), "/")),
            OnRequest::Refuse(404, "Not Found")
        );
        assert_eq!(r.on_http_request(&head("GET", None, "/")), OnRequest::Refuse(400, "Bad Request"));
        assert_eq!(r.on_http_request(&head("GET", Some("[2001:db8::1]:80"), "/")), OnRequest::Refuse(404, "Not Found"));
        assert_eq!(
            r.on_http_request(&head("OPTIONS", Some("pay.shop.example"), "*")),
            OnRequest::Refuse(400, "Bad Request")
        );
    }

    #[test]
    fn forwarded_host_names_a_port_other_than_443() {
        let r = routes(8443);
        let got = r.on_https_request(
            "pay.shop.example",
            &head("GET", Some("pay.shop.example:8443"), "/"),
            "192.0.2.1".parse().unwrap(),
        );
        let OnRequest::Proxy { forwarded, .. } = got else { panic!("{got:?}") };
        assert_eq!(forwarded.host, "pay.shop.example:8443");
        assert_eq!(forwarded.proto, "https");
    }
}
