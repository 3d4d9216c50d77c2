//! AFL target `wg_quick`: see [`meshd_core::fuzzing::wg_quick`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::wg_quick(data));
}
