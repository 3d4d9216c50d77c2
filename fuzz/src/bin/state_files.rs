//! AFL target `state_files`: see [`meshd_core::fuzzing::state_files`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::state_files(data));
}
