# For Nix users without flakes:
#   nix-build                                   # meshd and meshctl (result/bin/)
#   imports = [ "${meshd-checkout}/nixos/module.nix" ];   # in configuration.nix: services.meshd
# `pkgs` defaults to <nixpkgs> (nixos-unstable of 2026 or newer: Rust 1.95).
{ pkgs ? import <nixpkgs> { } }:
pkgs.callPackage ./nixos/package.nix { }
