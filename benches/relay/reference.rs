//! What meshd is measured against and in front of, each configured as its documentation shows: nginx as the
//! backend (one short body), Caddy as a TLS-terminating reverse proxy with the certificate meshd got, and nginx's
//! `stream` module with `ssl_preread` as a plain TCP SNI proxy. Each runs in the foreground with its files in its
//! own directory; the guards stop them by PID.

use std::fs;
use std::path::{Path, PathBuf};

use meshd_e2e::{Netns, Proc};

/// What the backend answers to every request.
pub const BODY: &str = "hello from the backend\n";

/// Debian's dynamic `stream` module (package `libnginx-mod-stream`).
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// The lines every nginx here starts with: foreground, its PID file and errors in `dir`, one worker per core.
fn nginx_main(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n"
    )
}

/// Start nginx in `ns` with `config`, its files in `dir`.
fn nginx(ns: &Netns, dir: &Path, config: &str) -> Proc {
    fs::create_dir_all(dir).expect("create nginx's directory");
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config).expect("write nginx.conf");
    let (conf, prefix, errors) = (conf.display().to_string(), dir.display().to_string(), dir.join("error.log"));
    let argv = ["nginx", "-p", &prefix, "-e", &errors.display().to_string(), "-c", &conf];
    ns.spawn_logged(&argv, &dir.join("stderr.log"))
}

/// The backend: nginx answering [`BODY`] to every request on each of `listen` (`IP:PORT`), no access log. It
/// never closes a kept-alive connection during a run (`keepalive_requests`; its default of 1000 would make the
/// proxies' pools reconnect every 1000 requests).
pub fn nginx_backend(ns: &Netns, dir: &Path, listen: &[String]) -> Proc {
    let d = dir.display();
    let listen: String = listen.iter().map(|l| format!("        listen {l};\n")).collect();
    let body = BODY.replace('\n', "\\n");
    let config = format!(
        "{main}http {{\n    access_log off;\n    keepalive_requests 1000000;\n    default_type text/plain;\n    \
         client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
         uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    \
         server {{\n{listen}        location / {{ return 200 \"{body}\"; }}\n    }}\n}}\n",
        main = nginx_main(dir)
    );
    nginx(ns, dir, &config)
}

/// Whether Debian's nginx `stream` module is installed (`apt-get install libnginx-mod-stream`).
pub fn has_stream_module() -> bool {
    Path::new(STREAM_MODULE).is_file()
}

/// A plain TCP SNI proxy: nginx's `stream` module on `listen`, reading the ClientHello's server name
/// (`ssl_preread`) and passing the stream unread to the address `routes` gives it; other names are refused.
pub fn nginx_sni_proxy(ns: &Netns, dir: &Path, listen: &str, routes: &[(&str, &str)]) -> Proc {
    let map: String = routes.iter().map(|(name, to)| format!("        {name} {to};\n")).collect();
    let config = format!(
        "load_module {STREAM_MODULE};\n{main}stream {{\n    map $ssl_preread_server_name $upstream {{\n{map}    }}\n    \
         server {{\n        listen {listen};\n        ssl_preread on;\n        proxy_pass $upstream;\n    }}\n}}\n",
        main = nginx_main(dir)
    );
    nginx(ns, dir, &config)
}

/// One site of a Caddy: `address` (`NAME:PORT`) served with the certificate files, on `bind` when given, proxied to
/// `upstream` (`IP:PORT`, plain HTTP).
pub struct CaddySite {
    /// The site's name and port.
    pub address: String,
    /// The address to listen on (all of the host's when None).
    pub bind: Option<String>,
    /// The certificate chain (PEM).
    pub crt: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// Where requests go.
    pub upstream: String,
}

/// Caddy (Debian's 2.6) as a TLS-terminating reverse proxy for `sites`, as its documentation shows it
/// (`tls CERT KEY`, `reverse_proxy UPSTREAM`): no admin endpoint, no redirect listener on port 80 (meshd holds it),
/// its data in `dir`; session tickets on, as shipped.
pub fn caddy(ns: &Netns, dir: &Path, sites: &[CaddySite]) -> Proc {
    fs::create_dir_all(dir).expect("create Caddy's directory");
    let d = dir.display();
    let mut config = format!("{{\n\tadmin off\n\tauto_https disable_redirects\n\tstorage file_system {d}/data\n}}\n");
    for site in sites {
        config.push_str(&format!("{} {{\n", site.address));
        if let Some(bind) = &site.bind {
            config.push_str(&format!("\tbind {bind}\n"));
        }
        config.push_str(&format!(
            "\ttls {} {}\n\treverse_proxy {}\n}}\n",
            site.crt.display(),
            site.key.display(),
            site.upstream
        ));
    }
    let caddyfile = dir.join("Caddyfile");
    fs::write(&caddyfile, config).expect("write the Caddyfile");
    let mut cmd = ns.command("caddy");
    cmd.args(["run", "--adapter", "caddyfile", "--config"]).arg(&caddyfile);
    cmd.env("HOME", dir).env("XDG_DATA_HOME", dir.join("data")).env("XDG_CONFIG_HOME", dir.join("config"));
    Proc::spawn_logged(cmd, "caddy", &dir.join("caddy.log"))
}
