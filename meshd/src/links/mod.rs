//! The daemon's links to other processes and hosts: the local admin socket `meshctl` talks to
//! ([`admin`]), the TLS exchange that joins a new member ([`join`]), and the sync stream between the hub
//! and each member inside the mesh ([`sync`]). Each carries the messages of [`meshd_core::wire`].

pub mod admin;
pub mod join;
pub mod sync;
