//! The admin socket: a root-only unix socket in the state directory where `meshctl` sends one JSON
//! request per connection and reads one JSON reply.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use meshd_core::wire::admin::{Outcome, Request};

/// Largest request accepted (a batch of some thousands of changes).
pub const MAX_REQUEST: u64 = 1 << 20;

/// A request from the socket with the channel its outcome goes back on.
pub type Call = (Request, oneshot::Sender<Outcome>);

/// Errors of the admin socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    // The I/O error is part of the message, not a source: the one-line error shows it once.
    #[error("admin socket {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// Nothing was sent: the daemon is not listening (yet).
    #[error("admin socket {path}: {error}")]
    Connect { path: PathBuf, error: std::io::Error },
    #[error("admin socket {0}: the daemon sent an unreadable reply")]
    BadReply(PathBuf),
    #[error("the request is {0} bytes, more than the admin socket takes ({MAX_REQUEST}); split it up")]
    TooLarge(usize),
}

/// Bind the socket at `path` with mode 0600 (any stale socket file is replaced: the caller holds the
/// state directory's daemon lock).
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |error| AdminError::Io { path: path.to_path_buf(), error };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Accept connections forever, passing each request to `calls`.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_one(stream, calls.clone()));
            }
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, calls: mpsc::Sender<Call>) {
    // The socket is 0600 in a 0700 directory; checking the caller's uid as well keeps a mistaken
    // chmod from opening the controller to other users.
    let me = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == me => {}
        Ok(cred) => {
            return warn!(
                uid = cred.uid(),
                "admin socket: refused a caller that is neither root nor the daemon's user"
            );
        }
        Err(e) => return warn!(error = %e, "admin socket: cannot identify caller"),
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let outcome = match AsyncBufReader::new(read.take(MAX_REQUEST)).read_line(&mut line).await {
        Err(e) => Outcome::Error(format!("reading request: {e}")),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Outcome::Error(format!("malformed request: {e}")),
            Ok(request) => {
                debug!(?request, "admin request");
                let (tx, rx) = oneshot::channel();
                if calls.send((request, tx)).await.is_err() {
                    Outcome::Error("meshd is shutting down".into())
                } else {
                    rx.await.unwrap_or_else(|_| Outcome::Error("meshd is shutting down".into()))
                }
            }
        },
    };
    let mut reply =
        serde_json::to_vec(&outcome).unwrap_or_else(|e| format!("{{\"error\":\"encoding reply: {e}\"}}").into_bytes());
    reply.push(b'\n');
    if let Err(e) = write.write_all(&reply).await {
        debug!(error = %e, "admin reply not delivered");
    }
}

/// Send `request` to the daemon at `path` and wait for its outcome (blocking; for `meshctl`).
pub fn call(path: &Path, request: &Request) -> Result<Outcome, AdminError> {
    let err = |error| AdminError::Io { path: path.to_path_buf(), error };
    let mut line = serde_json::to_vec(request).map_err(|e| err(e.into()))?;
    line.push(b'\n');
    if line.len() as u64 > MAX_REQUEST {
        return Err(AdminError::TooLarge(line.len()));
    }
    let stream =
        StdUnixStream::connect(path).map_err(|error| AdminError::Connect { path: path.to_path_buf(), error })?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(err)?;
    send_all(&stream, &line).map_err(err)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(err)?;
    serde_json::from_str(&reply).map_err(|_| AdminError::BadReply(path.to_path_buf()))
}

/// Write all of `bytes` with `MSG_NOSIGNAL`: a daemon gone mid-request is an error here, never a
/// SIGPIPE (the command-line programs restore SIGPIPE's default action).
fn send_all(stream: &StdUnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    while !bytes.is_empty() {
        match socket.send_with_flags(bytes, libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_over_the_limit_is_refused_before_anything_is_sent() {
        let name: meshd_core::input::Label = "a".parse().unwrap();
        let one = Request::ServiceRemove { name };
        let per_request = serde_json::to_vec(&one).unwrap().len();
        let requests = vec![one; MAX_REQUEST as usize / per_request + 1];
        // No daemon listens at this path: the size is checked before connecting.
        let missing = Path::new("/nonexistent/meshd.sock");
        assert!(matches!(call(missing, &Request::Batch { requests }), Err(AdminError::TooLarge(_))));
        assert!(matches!(call(missing, &Request::Status), Err(AdminError::Connect { .. })));
    }
}
