//! Certificates from an ACME CA (RFC 8555) for the names a relay serves, as decisions without I/O:
//! [`renewal`], when to order and renew one name's certificate.

pub mod renewal;
