// TEMPORARY placeholder so the crate compiles until the real module lands (being written in parallel).
use std::net::{IpAddr, SocketAddr};
pub type DnsRecords = std::collections::BTreeMap<String, Vec<IpAddr>>;
#[derive(Debug, thiserror::Error)]
#[error("dns placeholder")]
pub struct DnsError;
pub struct MeshDns;
impl MeshDns {
    pub async fn start(_l: &[SocketAddr], _d: &str, _r: DnsRecords, _u: Vec<SocketAddr>) -> Result<MeshDns, DnsError> {
        Ok(MeshDns)
    }
    pub async fn update(&self, _r: DnsRecords) {}
    pub async fn shutdown(self) {}
}
pub fn upstreams_from_resolv_conf(_p: &std::path::Path, _e: &[IpAddr]) -> Vec<SocketAddr> {
    Vec::new()
}
