//! AFL target `input`: see [`meshd_core::fuzzing::input`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::input(data));
}
