//! AFL target `invite`: see [`meshd_core::fuzzing::invite`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::invite(data));
}
