//! AFL target `admin`: see [`meshd_core::fuzzing::admin`].

fn main() {
    afl::fuzz!(|data: &[u8]| meshd_core::fuzzing::admin(data));
}
