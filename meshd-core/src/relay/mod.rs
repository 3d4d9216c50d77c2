//! A relay's public HTTPS, as decisions and bytes without I/O: [`route`], what to do with a connection or
//! request by its server name, method and authority; [`proxy`], the PROXY v2 header that carries the client's
//! address with a passed-through stream.

pub mod proxy;
pub mod route;
