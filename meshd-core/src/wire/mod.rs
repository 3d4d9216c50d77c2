//! What crosses a process or host boundary, as types: the admin protocol (`meshctl` to the daemon) and
//! the join exchange ([`admin`]), the sync protocol between the hub and its members ([`sync`]), and the
//! invite token a new member carries ([`invite`]).

pub mod admin;
pub mod invite;
pub mod sync;
