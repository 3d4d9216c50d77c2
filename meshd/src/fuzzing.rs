//! Fuzz targets for the daemon's parsers of untrusted input that live behind I/O: the mesh DNS's
//! answers to the bytes of a query, through the same catalog of zones the server runs, without sockets.
//! The AFL binaries of `fuzz/` call them, as they call [`meshd_core::fuzzing`]'s, and the corpus replay
//! test below runs every committed corpus file through them.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::{NetError, runtime::TokioTime, xfer::Protocol};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{Catalog, MessageResponse};
use meshd_core::fixtures::sample_state;
use meshd_core::fuzzing::Target;
use meshd_core::plan::{dns::parse_domain, plan_host};

use crate::host::dns::mesh_catalog;

/// Every target of this crate, by the name of its AFL binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[("dns", dns)];

/// The bytes of one DNS query (UDP or TCP payload), answered by the hub's mesh DNS of the sample
/// network (names, reverse names, no upstreams) as the server answers it: a message that does not
/// decode or is a response gets no answer; a query gets exactly one, a response with its id, which
/// decodes whenever the query is well-formed.
pub fn dns(data: &[u8]) {
    static MESH: OnceLock<(tokio::runtime::Runtime, Catalog)> = OnceLock::new();
    let (runtime, catalog) = MESH.get_or_init(|| {
        let plan = plan_host(&sample_state().snapshot(), "hub").expect("the sample network plans");
        let origin = parse_domain(&plan.dns.domain).expect("the sample domain");
        let (catalog, _zones) =
            mesh_catalog(&origin, &plan.dns.reverse, &plan.dns.records, 1).expect("the sample zones");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        (runtime, catalog)
    });
    let src = SocketAddr::from((Ipv4Addr::new(10, 77, 0, 5), 40000));
    let Ok(request) = Request::from_bytes(data.to_vec(), src, Protocol::Udp) else { return };
    if request.metadata.message_type == MessageType::Response {
        return;
    }
    let answers = Answers::default();
    runtime.block_on(catalog.handle_request::<_, TokioTime>(&request, answers.clone()));
    let answers = answers.0.lock().unwrap_or_else(PoisonError::into_inner);
    assert_eq!(answers.len(), 1, "one answer to a query");
    let answer = &answers[0];
    assert!(answer.len() >= 12, "an answer has a header");
    assert_eq!(answer[..2], data[..2], "the answer carries the query's id");
    assert_eq!(answer[2] & 0x80, 0x80, "the answer is a response");
    // hickory-server echoes the question section byte for byte (hickory-dns issue 2210), so a question
    // whose name points into the query's header points into the answer's, which no longer decodes. A
    // query as clients write it (what hickory writes back the same) gets an answer that decodes.
    if Message::from_vec(data).ok().and_then(|query| query.to_vec().ok()).is_some_and(|canonical| canonical == data) {
        let answer = Message::from_vec(answer).expect("the answer to a well-formed query decodes");
        assert_eq!(answer.metadata.message_type, MessageType::Response);
    }
}

/// The encoded answers the catalog sent.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<Vec<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Answers {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let info = response.destructive_emit(&mut BinEncoder::new(&mut bytes))?;
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(bytes);
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn every_committed_dns_fuzz_input_still_passes_its_target() {
        meshd_core::fuzzing::replay(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus"), TARGETS);
    }
}
