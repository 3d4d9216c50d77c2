//! AFL target `join`: see [`meshd_core::fuzzing::join`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::join(data));
}
