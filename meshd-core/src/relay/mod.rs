//! A relay's public HTTPS, as decisions without I/O: [`route`], what to do with a connection or request
//! by its server name, method and authority.

pub mod route;
