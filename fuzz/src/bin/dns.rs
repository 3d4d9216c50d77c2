//! AFL target `dns`: see [`meshd::fuzzing::dns`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd::fuzzing::dns(data));
}
