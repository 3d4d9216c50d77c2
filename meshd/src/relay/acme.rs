//! The ACME client (RFC 8555, with instant-acme): obtains and renews the certificates of the names whose TLS
//! ends on this host, answering the CA's validation with TLS-ALPN-01 (RFC 8737) or HTTP-01, the other when one
//! fails. When to order is decided by `meshd_core::acme::renewal` (two thirds of the lifetime, the CA's renewal
//! information window of RFC 9773, backoff after failures); this module only carries it out and keeps, under
//! the state directory's `acme/` (0700, files 0600), the account key and each name's certificate, key and
//! renewal state, so a restart serves the same certificate and keeps its backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RenewalInfo, RetryPolicy,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::AcmeOptions;
use super::certs::{Certificates, certified_key};
use crate::host::statedir::StateDir;
use meshd_core::acme::renewal::{Renewal, Status, Step, Validity, Window};
use meshd_core::input::PublicName;

/// The longest the worker sleeps before looking at the clock again: a wall clock that jumps (a host resumed
/// from suspend) is noticed within this time.
const LONGEST_SLEEP: Duration = Duration::from_secs(600);

/// A name's certificate and key, PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Held {
    chain_pem: String,
    key_pem: String,
}

/// What `acme/NAME.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    certificate: Option<Held>,
    renewal: Renewal,
    /// The CA settings (directory, extra root, contact) the record was written under: a backoff earned under
    /// others does not hold once the operator changed them.
    #[serde(default)]
    settings: Option<String>,
}

/// What `acme/account.json` holds: the account of one directory.
#[derive(Serialize, Deserialize)]
struct AccountRecord {
    directory: String,
    credentials: AccountCredentials,
}

/// The certificates' states, by name, for `service list`.
pub type StatusBoard = Arc<Mutex<BTreeMap<PublicName, Renewal>>>;

/// What the worker is asked to do: order and renew `hold`; delete what it keeps of `forget` (names this host
/// passes through: it must hold no key for them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Wanted {
    hold: BTreeSet<PublicName>,
    forget: BTreeSet<PublicName>,
}

/// The running worker: it orders for the names last given to [`Worker::want`] and stops when dropped.
pub struct Worker {
    names: watch::Sender<Wanted>,
    board: StatusBoard,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Worker {
    /// Start the worker; it serves every certificate it finds on disk for the names it is given at once.
    pub fn start(options: AcmeOptions, state: StateDir, certs: Arc<Certificates>) -> Worker {
        let (names, wanted) = watch::channel(Wanted::default());
        let board = StatusBoard::default();
        let run = Run { options, state, certs, board: board.clone(), account: None, started: false };
        Worker { names, board, task: tokio::spawn(run.run(wanted)) }
    }

    /// Obtain and renew certificates for exactly `hold` from now on, and delete the certificates and keys kept of
    /// `forget`.
    pub fn want(&self, hold: BTreeSet<PublicName>, forget: BTreeSet<PublicName>) {
        let wanted = Wanted { hold, forget };
        self.names.send_if_modified(|current| {
            let changed = *current != wanted;
            *current = wanted;
            changed
        });
    }

    /// The state of `name`'s certificate at `now` (unix seconds), if this host holds it.
    pub fn status(&self, name: &PublicName, now: u64) -> Option<Status> {
        self.board.lock().unwrap_or_else(PoisonError::into_inner).get(name).map(|r| r.status(now))
    }

    /// The state at `now` of every name's certificate.
    pub fn statuses(&self, now: u64) -> BTreeMap<PublicName, Status> {
        let board = self.board.lock().unwrap_or_else(PoisonError::into_inner);
        board.iter().map(|(name, r)| (name.clone(), r.status(now))).collect()
    }
}

/// The worker's state.
struct Run {
    options: AcmeOptions,
    state: StateDir,
    certs: Arc<Certificates>,
    board: StatusBoard,
    account: Option<Account>,
    /// The first names were taken on: names that come later are new to this run (exposed again, say).
    started: bool,
}

impl Run {
    async fn run(mut self, mut wanted: watch::Receiver<Wanted>) {
        if let Err(e) = self.state.create_acme_dir() {
            warn!(error = %e, "cannot make the ACME directory; certificates cannot be kept");
        }
        loop {
            let Wanted { hold: names, forget } = wanted.borrow_and_update().clone();
            self.follow(&names);
            self.forget(&forget);
            let now = unix_now();
            let mut next_at = now + LONGEST_SLEEP.as_secs();
            for name in &names {
                let Some((step, at)) = self.renewal(name).map(|r| r.next()) else { continue };
                if at > now {
                    next_at = next_at.min(at);
                    continue;
                }
                match step {
                    Step::Order => self.order(name).await,
                    Step::AskWindow => self.ask_window(name).await,
                }
                next_at = now;
            }
            if next_at <= now {
                continue;
            }
            let sleep = Duration::from_secs(next_at - now).min(LONGEST_SLEEP);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                changed = wanted.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Take on the names newly wanted (their certificates on disk are served at once) and drop the others.
    fn follow(&mut self, names: &BTreeSet<PublicName>) {
        let mut board = self.board.lock().unwrap_or_else(PoisonError::into_inner);
        board.retain(|name, _| {
            let keep = names.contains(name);
            if !keep {
                self.certs.withdraw(name.as_str());
            }
            keep
        });
        let new: Vec<PublicName> = names.iter().filter(|n| !board.contains_key(*n)).cloned().collect();
        for name in new {
            let mut record = self.read(&name);
            if let Some(held) = &record.certificate {
                match (certified_key(&held.chain_pem, &held.key_pem), validity_of(&held.chain_pem)) {
                    (Ok(key), Ok(validity)) => {
                        self.certs.serve(name.as_str(), key);
                        info!(%name, not_after = validity.not_after, "serving the kept certificate");
                    }
                    (Err(e), _) => {
                        warn!(%name, error = %e, "the kept certificate cannot be served; ordering another");
                        record.renewal = Renewal::new();
                    }
                    (_, Err(e)) => {
                        warn!(%name, error = %e, "the kept certificate cannot be read; ordering another");
                        record.renewal = Renewal::new();
                    }
                }
            }
            // A name exposed again, or CA settings changed since the failures: the operator wants a try now.
            if self.started || record.settings.as_deref() != Some(&self.settings()) {
                record.renewal.retry_now();
            }
            board.insert(name, record.renewal);
        }
        self.started = true;
    }

    /// Delete what is kept of `names` (certificate, key, renewal state): names this host passes through.
    fn forget(&self, names: &BTreeSet<PublicName>) {
        for name in names {
            let path = self.path(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    info!(%name, "deleted the kept certificate and key: the name is passed through to its node now")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot delete a certificate this host must not keep")
                }
            }
        }
    }

    /// The CA settings in effect, as one text.
    fn settings(&self) -> String {
        let root = self.options.ca_root.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        format!("{} {root} {}", self.options.directory, self.options.contact.as_deref().unwrap_or(""))
    }

    fn renewal(&self, name: &PublicName) -> Option<Renewal> {
        self.board.lock().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    fn path(&self, name: &PublicName) -> PathBuf {
        self.state.acme_dir().join(format!("{name}.json"))
    }

    /// The name's record on disk; a missing one is a name to order, a damaged one is logged and ordered again.
    fn read(&self, name: &PublicName) -> Record {
        let path = self.path(name);
        match self.state.read_private_file(&path) {
            Ok(Some(bytes)) => serde_json::from_slice::<Record>(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "the kept certificate record is damaged; ordering again");
                Record::default()
            }),
            Ok(None) => Record::default(),
            Err(e) => {
                warn!(error = %e, "cannot read the kept certificate; ordering again");
                Record::default()
            }
        }
    }

    /// Save the name's record (certificate and renewal state) and show its state.
    fn keep(&self, name: &PublicName, certificate: Option<Held>, renewal: Renewal) {
        let record = Record { certificate, renewal: renewal.clone(), settings: Some(self.settings()) };
        let path = self.path(name);
        match serde_json::to_vec_pretty(&record) {
            Ok(json) => {
                let saved = self.state.replace_private_file(&path, &json);
                self.state.log_save(&path, "a certificate", &saved);
            }
            Err(e) => warn!(error = %e, "cannot encode a certificate record"),
        }
        self.board.lock().unwrap_or_else(PoisonError::into_inner).insert(name.clone(), renewal);
    }

    /// Order a certificate for `name`, by TLS-ALPN-01 and then, if that fails, HTTP-01.
    async fn order(&mut self, name: &PublicName) {
        let mut renewal = self.renewal(name).unwrap_or_default();
        let held = self.read(name).certificate;
        let mut errors = Vec::new();
        for kind in [ChallengeType::TlsAlpn01, ChallengeType::Http01] {
            match self.order_with(name, kind.clone()).await {
                Ok(new) => {
                    let validity = match validity_of(&new.chain_pem) {
                        Ok(v) => v,
                        Err(e) => {
                            errors.push(format!("{}: {e}", kind_name(&kind)));
                            continue;
                        }
                    };
                    match certified_key(&new.chain_pem, &new.key_pem) {
                        Ok(key) => self.certs.serve(name.as_str(), key),
                        Err(e) => {
                            errors.push(format!("{}: {e}", kind_name(&kind)));
                            continue;
                        }
                    }
                    info!(%name, challenge = kind_name(&kind), not_after = validity.not_after, "certificate issued");
                    renewal.issued(validity, rand::random(), unix_now());
                    self.keep(name, Some(new), renewal);
                    return;
                }
                Err(e) => {
                    warn!(%name, challenge = kind_name(&kind), error = %e, "the order failed");
                    errors.push(format!("{}: {e}", kind_name(&kind)));
                }
            }
        }
        renewal.failed(errors.join("; "), unix_now());
        self.keep(name, held, renewal);
    }

    /// One order for `name` validated by `kind`; the validation's answer is withdrawn whatever the outcome.
    async fn order_with(&mut self, name: &PublicName, kind: ChallengeType) -> Result<Held, String> {
        let account = self.account().await?;
        let result = order(&account, name, kind, &self.certs).await;
        self.certs.set_challenge(name.as_str(), None);
        result
    }

    /// Ask the CA's renewal information (RFC 9773) for `name`'s certificate.
    async fn ask_window(&mut self, name: &PublicName) {
        let mut renewal = self.renewal(name).unwrap_or_default();
        let held = self.read(name).certificate;
        let now = unix_now();
        let asked = match (&held, self.account().await) {
            (Some(held), Ok(account)) => ask(&account, &held.chain_pem).await,
            (None, _) => Err("no certificate held".to_owned()),
            (_, Err(e)) => Err(e),
        };
        match asked {
            Ok((window, retry_after)) => renewal.window(window, Some(retry_after), now),
            Err(e) => {
                tracing::debug!(%name, error = %e, "no renewal information");
                renewal.window_unknown(now);
            }
        }
        self.keep(name, held, renewal);
    }

    /// The ACME account: the one kept for this directory, else a new one (kept, 0600).
    async fn account(&mut self) -> Result<Account, String> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        let builder = || match &self.options.ca_root {
            Some(root) => {
                Account::builder_with_root(root).map_err(|e| format!("--acme-ca-root {}: {e}", root.display()))
            }
            None => Account::builder().map_err(|e| e.to_string()),
        };
        let path = self.state.acme_dir().join("account.json");
        let kept = self.state.read_private_file(&path).map_err(|e| e.to_string())?;
        let kept = kept.and_then(|bytes| serde_json::from_slice::<AccountRecord>(&bytes).ok());
        let account = match kept {
            Some(record) if record.directory == self.options.directory => builder()?
                .from_credentials(record.credentials)
                .await
                .map_err(|e| format!("the ACME account: {}", chain(&e)))?,
            _ => {
                let contact = self.options.contact.as_ref().map(|c| format!("mailto:{c}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
                let (account, credentials) = builder()?
                    .create(&new, self.options.directory.clone(), None)
                    .await
                    .map_err(|e| format!("creating an account at {}: {}", self.options.directory, chain(&e)))?;
                let record = AccountRecord { directory: self.options.directory.clone(), credentials };
                let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
                self.state.replace_private_file(&path, &json).map_err(|e| e.to_string())?;
                info!(directory = %self.options.directory, "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }
}

/// `error` with its sources (a TLS failure below an HTTP client error, say), as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = e.source();
    }
    text
}

/// The challenge type as the CA names it.
fn kind_name(kind: &ChallengeType) -> &'static str {
    match kind {
        ChallengeType::Http01 => "http-01",
        ChallengeType::TlsAlpn01 => "tls-alpn-01",
        _ => "other",
    }
}

/// One order for `name`, its authorization answered by `kind` through `certs`.
async fn order(
    account: &Account,
    name: &PublicName,
    kind: ChallengeType,
    certs: &Certificates,
) -> Result<Held, String> {
    let identifiers = [Identifier::Dns(name.to_string())];
    let mut order =
        account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| format!("new order: {}", chain(&e)))?;
    let mut tokens = Vec::new();
    let mut authorizations = order.authorizations();
    let mut answered = Ok(());
    while let Some(authz) = authorizations.next().await {
        let mut authz = match authz {
            Ok(authz) => authz,
            Err(e) => {
                answered = Err(format!("authorization: {}", chain(&e)));
                break;
            }
        };
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            status => {
                answered = Err(format!("authorization is {status:?}"));
                break;
            }
        }
        let Some(mut challenge) = authz.challenge(kind.clone()) else {
            answered = Err(format!("the CA offers no {} challenge", kind_name(&kind)));
            break;
        };
        let key_authorization = challenge.key_authorization();
        match kind {
            ChallengeType::TlsAlpn01 => match alpn_certificate(name, key_authorization.digest().as_ref()) {
                Ok(key) => certs.set_challenge(name.as_str(), Some(key)),
                Err(e) => {
                    answered = Err(e);
                    break;
                }
            },
            _ => {
                certs.set_token(&challenge.token, Some(key_authorization.as_str().to_owned()));
                tokens.push(challenge.token.clone());
            }
        }
        if let Err(e) = challenge.set_ready().await {
            answered = Err(format!("challenge: {}", chain(&e)));
            break;
        }
    }
    let result = match answered {
        Ok(()) => finish(&mut order).await,
        Err(e) => Err(e),
    };
    for token in tokens {
        certs.set_token(&token, None);
    }
    result
}

/// Wait for the CA's validation, then finalize with a new key and fetch the chain.
async fn finish(order: &mut instant_acme::Order) -> Result<Held, String> {
    let status = order.poll_ready(&RetryPolicy::default()).await.map_err(|e| format!("validation: {}", chain(&e)))?;
    if status != OrderStatus::Ready {
        let why =
            order.state().error.as_ref().map(|p| p.to_string()).unwrap_or_else(|| format!("the order is {status:?}"));
        return Err(format!("validation failed: {why}"));
    }
    let key_pem = order.finalize().await.map_err(|e| format!("finalize: {}", chain(&e)))?;
    let chain_pem =
        order.poll_certificate(&RetryPolicy::default()).await.map_err(|e| format!("certificate: {}", chain(&e)))?;
    Ok(Held { chain_pem, key_pem })
}

/// The self-signed TLS-ALPN-01 certificate of `name` carrying `digest` (RFC 8737 section 3).
fn alpn_certificate(name: &PublicName, digest: &[u8]) -> Result<rustls::sign::CertifiedKey, String> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    certified_key(&cert.pem(), &key.serialize_pem()).map_err(|e| e.to_string())
}

/// The first certificate of a PEM chain: the leaf.
fn leaf(chain_pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("the chain holds no certificate")?
        .map_err(|e| format!("the chain is not PEM: {e}"))
}

/// The leaf's validity, unix seconds.
fn validity_of(chain_pem: &str) -> Result<Validity, String> {
    let leaf = leaf(chain_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| format!("the certificate: {e}"))?;
    let seconds = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Ok(Validity { not_before: seconds(cert.validity().not_before), not_after: seconds(cert.validity().not_after) })
}

/// The CA's suggested window for the leaf of `chain_pem`, and when to ask again (seconds).
async fn ask(account: &Account, chain_pem: &str) -> Result<(Window, u64), String> {
    let leaf = leaf(chain_pem)?;
    let id = CertificateIdentifier::try_from(&leaf)?;
    let (info, retry_after) = account.renewal_info(&id).await.map_err(|e| e.to_string())?;
    Ok((window_of(&info), retry_after.as_secs()))
}

/// The suggested window of a renewal information answer (RFC 9773 section 4.2), unix seconds; a time before
/// 1970 counts as 1970 (a window already open).
fn window_of(info: &RenewalInfo) -> Window {
    let seconds = |t: i64| u64::try_from(t).unwrap_or(0);
    Window {
        start: seconds(info.suggested_window.start.unix_timestamp()),
        end: seconds(info.suggested_window.end.unix_timestamp()),
    }
}

/// Unix seconds now, from the host's wall clock.
fn unix_now() -> u64 {
    u64::try_from(crate::host::clock::wall_now()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renewal information as a CA sends it (RFC 9773 section 4.2's example, as Let's Encrypt answers), read
    /// the way the worker reads it, then followed by the renewal schedule: the certificate is renewed inside
    /// the window, whatever two thirds of its lifetime says.
    #[test]
    fn a_recorded_renewal_information_answer_moves_the_renewal_into_its_window() {
        let recorded = r#"{
            "suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"},
            "explanationURL": "https://acme.example.com/docs/ari"
        }"#;
        let info: RenewalInfo = serde_json::from_str(recorded).unwrap();
        let window = window_of(&info);
        assert_eq!(window, Window { start: 1_735_790_400, end: 1_735_876_800 });

        // A 90-day certificate from 2024-12-01 would renew at two thirds (2025-01-30); the CA asks for earlier.
        let held = Validity { not_before: 1_733_011_200, not_after: 1_733_011_200 + 90 * 86_400 };
        let mut renewal = Renewal::holding(held, 250_000);
        let (step, _) = renewal.next();
        assert_eq!(step, Step::AskWindow, "a certificate read back asks the CA's window first");
        // The CA answers the same every 6 hours (its Retry-After) until the renewal is due.
        let mut now = 1_735_700_000;
        let mut asked = 0;
        while let (Step::AskWindow, at) = renewal.next() {
            now = at.max(now);
            renewal.window(window, Some(21_600), now);
            asked += 1;
        }
        assert_eq!(asked, 6, "asked at once, then again at each Retry-After until the renewal is due");
        let (_, at) = renewal.next();
        assert_eq!(at, window.start + 86_400 / 4, "a quarter into the window");
        assert!(at < held.two_thirds());
    }

    /// A window whose end is not after its start (a CA's mistake) is ignored: two thirds still decides.
    #[test]
    fn a_recorded_answer_with_an_empty_window_leaves_two_thirds() {
        let recorded = r#"{"suggestedWindow": {"start": "2025-01-03T04:00:00Z", "end": "2025-01-02T04:00:00Z"}}"#;
        let info: RenewalInfo = serde_json::from_str(recorded).unwrap();
        let held = Validity { not_before: 1_733_011_200, not_after: 1_733_011_200 + 90 * 86_400 };
        let mut renewal = Renewal::holding(held, 0);
        renewal.window(window_of(&info), Some(60), 1_735_700_000);
        assert_eq!(renewal.next(), (Step::AskWindow, 1_735_700_060));
        while let (Step::AskWindow, at) = renewal.next() {
            renewal.window(window_of(&info), Some(86_400), at);
        }
        assert_eq!(renewal.next(), (Step::Order, held.two_thirds()));
    }
}
