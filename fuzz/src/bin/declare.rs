//! AFL target `declare`: see [`meshd_core::fuzzing::declare`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::declare(data));
}
