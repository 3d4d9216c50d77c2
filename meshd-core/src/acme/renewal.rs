//! When to order a certificate for one public name, as a state machine driven by `now` (unix seconds): the
//! first order, renewal at two thirds of the lifetime or earlier when the CA's renewal information says so
//! (ARI, RFC 9773), and backing off after failures instead of hammering the CA (Let's Encrypt counts failed
//! validations per name and hour, and certificates per name set and week).
//!
//! The daemon asks [`Renewal::next`] what to do and when, carries it out (an ACME order, an ARI query) and
//! reports the outcome ([`Renewal::issued`], [`Renewal::failed`], [`Renewal::window`],
//! [`Renewal::window_unknown`]); [`Renewal::status`] is what `service list` shows.

use serde::{Deserialize, Serialize};

/// The first wait after a failed order, seconds; each further failure doubles it, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: u64 = 60;

/// The longest wait between two orders after failures, seconds (6 hours): a broken setup asks the CA about
/// 4 times a day, well within Let's Encrypt's limits, and a fixed one is served again the same day.
pub const MAX_BACKOFF: u64 = 6 * 3600;

/// ARI is asked again no sooner than this after an answer, seconds, whatever its `Retry-After` says (RFC 9773
/// section 4.3: clients set reasonable limits on it; values under a minute are taken as a minute).
pub const MIN_ARI_INTERVAL: u64 = 60;

/// ARI is asked again no later than this after an answer, seconds (a day, RFC 9773 section 4.3), and this
/// long after a failed query.
pub const MAX_ARI_INTERVAL: u64 = 24 * 3600;

/// A certificate's validity, unix seconds (its `notBefore` and `notAfter`, RFC 5280 section 4.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validity {
    /// The first second it is valid.
    pub not_before: u64,
    /// The last second it is valid.
    pub not_after: u64,
}

impl Validity {
    /// Two thirds into the lifetime: when a certificate is renewed without other advice.
    pub fn two_thirds(&self) -> u64 {
        let lifetime = self.not_after.saturating_sub(self.not_before);
        self.not_before + lifetime / 3 * 2 + lifetime % 3 * 2 / 3
    }
}

/// The CA's suggested renewal window for the certificate, unix seconds (RFC 9773 section 4.2,
/// `suggestedWindow`: `start` before `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// The window's start.
    pub start: u64,
    /// The window's end.
    pub end: u64,
}

/// What to do for the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Order a certificate (the first, or a renewal).
    Order,
    /// Ask the CA's renewal information about the certificate held.
    AskWindow,
}

/// What `service list` shows of a name's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Status {
    /// No certificate yet.
    Pending {
        /// Why the last order failed, if it did.
        #[serde(skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
        /// When the next order may be made (unix seconds), while backing off after a failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<u64>,
    },
    /// A certificate that is served, valid until `until` (unix seconds).
    Valid {
        /// Its `notAfter`.
        until: u64,
        /// Why the last renewal failed, if one did since it was issued.
        #[serde(skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
        /// When the next renewal may be tried (unix seconds), while backing off after a failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<u64>,
    },
    /// The certificate held has expired (renewals failed): nothing valid is served.
    Expired {
        /// Its `notAfter`.
        since: u64,
        /// Why the last renewal failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
        /// When the next renewal may be tried (unix seconds), while backing off after a failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<u64>,
    },
}

/// The renewal state of one name: what is held, what the CA advised, and the failures since the last success.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// The certificate held.
    held: Option<Validity>,
    /// Where in a suggested window this name renews, as a fraction of it in millionths: chosen once per
    /// certificate (RFC 9773 section 4.2 asks for a uniform random time in the window), so that restarts and
    /// repeated queries do not move it.
    spot: u32,
    /// The CA's last suggested window for the certificate held.
    window: Option<Window>,
    /// When to ask the CA's renewal information next.
    ask_window_at: Option<u64>,
    /// Orders failed in a row since the last success.
    failures: u32,
    /// No order before this (backing off after a failure).
    not_before: u64,
    /// Why the last order failed, until one succeeds.
    last_error: Option<String>,
}

impl Renewal {
    /// A name with no certificate yet: to be ordered at once.
    pub fn new() -> Renewal {
        Renewal::default()
    }

    /// A name that holds a certificate valid for `validity` (read back at start): its window is asked at
    /// once. `spot` as for [`Renewal::issued`].
    pub fn holding(validity: Validity, spot: u32) -> Renewal {
        Renewal { held: Some(validity), spot: spot % 1_000_000, ask_window_at: Some(0), ..Renewal::default() }
    }

    /// What to do next and from when (unix seconds; at or before `now`: at once).
    pub fn next(&self) -> (Step, u64) {
        let Some(held) = self.held else { return (Step::Order, self.not_before) };
        let due = match self.window {
            Some(window) => held.two_thirds().min(self.point_in(window)),
            None => held.two_thirds(),
        };
        let order_at = due.max(self.not_before);
        match self.ask_window_at {
            Some(ask) if ask < order_at => (Step::AskWindow, ask),
            _ => (Step::Order, order_at),
        }
    }

    /// A certificate valid for `validity` was issued at `now`. `spot` (any number; the daemon draws it at
    /// random) places its renewal within the CA's windows; the window is asked at once.
    pub fn issued(&mut self, validity: Validity, spot: u32, now: u64) {
        *self =
            Renewal { held: Some(validity), spot: spot % 1_000_000, ask_window_at: Some(now), ..Renewal::default() };
    }

    /// An order failed at `now` with `error`: the next waits [`FIRST_BACKOFF`], doubled per failure in a row,
    /// at most [`MAX_BACKOFF`]. A certificate held keeps being served.
    pub fn failed(&mut self, error: String, now: u64) {
        self.failures = self.failures.saturating_add(1);
        let doublings = self.failures.saturating_sub(1).min(16);
        let wait = FIRST_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF);
        self.not_before = now.saturating_add(wait);
        self.last_error = Some(error);
    }

    /// The CA answered at `now` with `window` for the certificate held, and asked not to be asked again for
    /// `retry_after` seconds (its `Retry-After`; clamped to [`MIN_ARI_INTERVAL`]..=[`MAX_ARI_INTERVAL`]). A
    /// window whose end is not after its start is ignored (RFC 9773 section 4.2).
    pub fn window(&mut self, window: Window, retry_after: Option<u64>, now: u64) {
        if window.start < window.end {
            self.window = Some(window);
        }
        let wait = retry_after.unwrap_or(MAX_ARI_INTERVAL).clamp(MIN_ARI_INTERVAL, MAX_ARI_INTERVAL);
        self.ask_window_at = Some(now.saturating_add(wait));
    }

    /// The CA's renewal information could not be had at `now` (no ARI, an error): asked again after
    /// [`MAX_ARI_INTERVAL`]; until then the last window, or two thirds, decides.
    pub fn window_unknown(&mut self, now: u64) {
        self.ask_window_at = Some(now.saturating_add(MAX_ARI_INTERVAL));
    }

    /// What `service list` shows at `now`.
    pub fn status(&self, now: u64) -> Status {
        let last_error = self.last_error.clone();
        let retry_at = (self.failures > 0 && self.not_before > now).then_some(self.not_before);
        match self.held {
            None => Status::Pending { last_error, retry_at },
            Some(held) if now > held.not_after => Status::Expired { since: held.not_after, last_error, retry_at },
            Some(held) => Status::Valid { until: held.not_after, last_error, retry_at },
        }
    }

    /// Order at once, whatever the backoff says: the operator changed what the failures came from (another CA,
    /// contact or root; the name exposed again). The failures' reason is kept until an order succeeds.
    pub fn retry_now(&mut self) {
        self.failures = 0;
        self.not_before = 0;
    }

    /// This name's renewal time within `window`.
    fn point_in(&self, window: Window) -> u64 {
        let span = u128::from(window.end.saturating_sub(window.start));
        let offset = span * u128::from(self.spot) / 1_000_000;
        window.start + u64::try_from(offset).unwrap_or(u64::MAX - window.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;
    /// A 90-day certificate issued at day 100.
    const CERT: Validity = Validity { not_before: 100 * DAY, not_after: 190 * DAY };

    #[test]
    fn a_new_name_is_ordered_at_once_and_backs_off_doubling_up_to_six_hours() {
        let mut r = Renewal::new();
        assert_eq!(r.next(), (Step::Order, 0));
        assert_eq!(r.status(5), Status::Pending { last_error: None, retry_at: None });
        let mut now = 1_000;
        let mut waits = Vec::new();
        for attempt in 0..12 {
            r.failed(format!("attempt {attempt}: connection refused"), now);
            let (step, at) = r.next();
            assert_eq!(step, Step::Order);
            waits.push(at - now);
            now = at;
        }
        assert_eq!(waits[..5], [60, 120, 240, 480, 960]);
        assert!(waits.iter().all(|&w| w <= MAX_BACKOFF));
        assert_eq!(waits[11], MAX_BACKOFF, "{waits:?}");
        // Orders a day, once backed off all the way: well within a CA's hourly and weekly limits.
        assert_eq!(DAY / MAX_BACKOFF, 4);
        assert!(
            matches!(r.status(now - 1), Status::Pending { last_error: Some(e), retry_at: Some(at) } if e == "attempt 11: connection refused" && at == now),
            "the reason, and when the next order is made"
        );
        r.retry_now();
        assert_eq!(r.next(), (Step::Order, 0), "the operator's retry orders at once");
        assert!(
            matches!(r.status(now - 1), Status::Pending { last_error: Some(_), retry_at: None }),
            "the reason stays"
        );
    }

    #[test]
    fn a_certificate_is_renewed_at_two_thirds_of_its_lifetime_without_advice() {
        let mut r = Renewal::new();
        r.failed("once".into(), 10);
        r.issued(CERT, 0, 100 * DAY);
        assert_eq!(
            r.status(150 * DAY),
            Status::Valid { until: 190 * DAY, last_error: None, retry_at: None },
            "a success clears it"
        );
        // The window is asked first; without one (no ARI at this CA), two thirds: day 160.
        assert_eq!(r.next(), (Step::AskWindow, 100 * DAY));
        r.window_unknown(100 * DAY);
        assert_eq!(r.next(), (Step::AskWindow, 101 * DAY));
        assert_eq!(until_order(&mut r), 160 * DAY);
        assert_eq!(CERT.two_thirds(), 160 * DAY);
        assert_eq!(Validity { not_before: 0, not_after: 10 }.two_thirds(), 6);
    }

    #[test]
    fn the_cas_window_brings_the_renewal_forward_never_past_two_thirds() {
        let mut r = Renewal::new();
        r.issued(CERT, 250_000, 100 * DAY);
        // A window well before two thirds (a revocation coming): renew a quarter into it.
        r.window(Window { start: 120 * DAY, end: 124 * DAY }, Some(6 * 3600), 100 * DAY);
        assert_eq!(r.next(), (Step::AskWindow, 100 * DAY + 6 * 3600), "asked again first, as Retry-After says");
        r.window(Window { start: 120 * DAY, end: 124 * DAY }, Some(6 * 3600), 119 * DAY);
        r.window(Window { start: 120 * DAY, end: 124 * DAY }, Some(30 * DAY), 120 * DAY);
        assert_eq!(r.next(), (Step::Order, 121 * DAY));
        // A window later than two thirds: two thirds still decides.
        r.window(Window { start: 170 * DAY, end: 175 * DAY }, None, 121 * DAY);
        assert_eq!(r.next(), (Step::AskWindow, 122 * DAY), "a missing Retry-After: a day");
        r.window(Window { start: 170 * DAY, end: 175 * DAY }, Some(100 * DAY), 159 * DAY);
        assert_eq!(r.next(), (Step::Order, 160 * DAY), "Retry-After is capped at a day, and two thirds is earlier");
        // A window already past: at once (its point is in the past).
        r.window(Window { start: 10 * DAY, end: 11 * DAY }, Some(1), 159 * DAY);
        assert_eq!(r.next(), (Step::Order, 10 * DAY + DAY / 4));
        assert_eq!(r.ask_window_at, Some(159 * DAY + MIN_ARI_INTERVAL), "Retry-After under a minute: a minute");
        // An invalid window changes nothing.
        let before = r.clone();
        r.window(Window { start: 5 * DAY, end: 5 * DAY }, Some(3600), 159 * DAY);
        assert_eq!(r.window, before.window);
    }

    #[test]
    fn the_spot_in_a_window_is_fixed_per_certificate_and_spans_the_window() {
        let window = Window { start: 1_000, end: 2_000 };
        let at = |spot| Renewal::holding(CERT, spot).point_in(window);
        assert_eq!([at(0), at(500_000), at(999_999), at(1_000_000)], [1_000, 1_500, 1_999, 1_000]);
        let huge = Window { start: u64::MAX - 10, end: u64::MAX };
        assert_eq!(Renewal::holding(CERT, 999_999).point_in(huge), u64::MAX - 1, "no overflow at the end of time");
    }

    /// Carries out `r`'s steps with a CA that has no renewal information, until an order is due.
    fn until_order(r: &mut Renewal) -> u64 {
        loop {
            match r.next() {
                (Step::Order, at) => return at,
                (Step::AskWindow, at) => r.window_unknown(at),
            }
        }
    }

    #[test]
    fn a_failed_renewal_keeps_the_certificate_served_and_says_why_until_it_expires() {
        let mut r = Renewal::holding(CERT, 0);
        assert_eq!(r.next(), (Step::AskWindow, 0), "read back at start: the window is asked at once");
        let at = until_order(&mut r);
        assert_eq!(at, 160 * DAY);
        r.failed("urn:ietf:params:acme:error:connection: port 80 refused".into(), at);
        assert_eq!(until_order(&mut r), 160 * DAY + FIRST_BACKOFF);
        let status = r.status(161 * DAY);
        assert_eq!(
            status,
            Status::Valid {
                until: 190 * DAY,
                last_error: Some("urn:ietf:params:acme:error:connection: port 80 refused".into()),
                retry_at: None,
            },
            "past the backoff: the reason, no wait"
        );
        let json = serde_json::to_value(r.status(160 * DAY + 1)).unwrap();
        assert_eq!(json["retry_at"], 160 * DAY + FIRST_BACKOFF, "within the backoff: when the next try is");
        assert!(matches!(r.status(190 * DAY + 1), Status::Expired { since, .. } if since == 190 * DAY));
        let json = serde_json::to_value(r.status(161 * DAY)).unwrap();
        assert_eq!(json["state"], "valid");
        assert_eq!(json["until"], 190 * DAY);
        assert_eq!(serde_json::to_value(Renewal::new().status(0)).unwrap(), serde_json::json!({"state": "pending"}));
    }

    #[test]
    fn the_state_survives_a_restart_as_json() {
        let mut r = Renewal::new();
        r.issued(CERT, 123_456, 100 * DAY);
        r.window(Window { start: 150 * DAY, end: 151 * DAY }, Some(3600), 100 * DAY);
        r.failed("rate limited".into(), 152 * DAY);
        let back: Renewal = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.next(), r.next());
    }
}
