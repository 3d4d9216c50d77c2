//! What crosses a process or host boundary, as types: the admin protocol (`meshctl` to the daemon,
//! [`admin`]), the join exchange ([`join`]), the sync protocol between the hub and its members
//! ([`sync`]), the proofs that open sync sessions and standing questions ([`auth`]), and the invite token
//! a new member carries ([`invite`]).

pub mod admin;
pub mod auth;
pub mod invite;
pub mod join;
pub mod sync;
