//! AFL target `sync`: see [`meshd_core::fuzzing::sync`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::sync(data));
}
