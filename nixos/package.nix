# meshd and meshctl, built from the repository with the versions in Cargo.lock (no network at build time
# beyond the crates Cargo.lock names, fetched by hash). Needs Rust 1.95 or newer (nixos-unstable of 2026).
{ lib, rustPlatform }:
let
  # The sources that go into the build, by name: the workspace's manifests and crates, nothing else of the
  # checkout (no .git, no build output, no state directory a quickstart left there: keys must not reach the store).
  workspace = [ "Cargo.toml" "Cargo.lock" "meshd" "meshctl" "meshd-core" "tests" "benches" ];
  root = toString ../.;
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let rel = lib.removePrefix (root + "/") (toString path);
      in builtins.any (top: rel == top || lib.hasPrefix (top + "/") rel) workspace
        && !(lib.hasSuffix ".nix" rel);
  };
in
rustPlatform.buildRustPackage {
  pname = "meshd";
  version = "0.1.0";
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--package" "meshd" "--package" "meshctl" ];
  # The tests build network namespaces as root and run real peers (wireguard-go, Pebble, tor): `scripts/test`,
  # not the Nix sandbox.
  doCheck = false;
  meta = {
    description = "Self-hosted WireGuard mesh and remote-access provisioner";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "meshd";
    platforms = lib.platforms.linux;
  };
}
