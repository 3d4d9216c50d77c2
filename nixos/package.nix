# meshd and meshctl, built from the repository with the versions in Cargo.lock (no network at build time
# beyond the crates Cargo.lock names, fetched by hash). Needs Rust 1.95 or newer (nixos-unstable of 2026).
{ lib, rustPlatform }:
let
  # The sources that go into the build: the workspace's crates, not the tests' data, docs or build output.
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let rel = lib.removePrefix (toString ../. + "/") (toString path);
      in !(lib.hasPrefix "target" rel || lib.hasPrefix "fuzz" rel || lib.hasPrefix "examples" rel
        || lib.hasPrefix "docs" rel || lib.hasPrefix "nixos" rel || lib.hasPrefix "benches" rel
        || lib.hasSuffix ".nix" rel || lib.hasSuffix ".lock" rel && rel != "Cargo.lock");
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
