# Evaluates NixOS configurations that use the meshd module with the real nixpkgs `lib` (lib.evalModules and its
# option types) and minimal stand-in declarations of the NixOS options the module sets, so that the option types
# and the module's assertions check them as NixOS would. Used by tests/tests/nixos.rs:
#
#   NIX_PATH=nixpkgs=../shared/nixpkgs-lib nix-instantiate --eval --strict --json tests/nix/eval.nix \
#     --arg configuration ./examples/phone/configuration.nix
#
# Returns { declaration; unit; applyUnit; firewall; users; } or fails as NixOS would, with the option's name or
# the failed assertions. On a machine with a full nixpkgs checkout, evaluate the examples with
# `nixos-rebuild build` or `nix build .#nixosConfigurations.NAME.config.system.build.toplevel` instead.
{ configuration, lib ? import <nixpkgs/lib> }:
let
  inherit (lib) mkOption types;
  anything = mkOption { type = types.anything; default = { }; };
  # What the module takes from pkgs: every package is /usr (nothing is built at evaluation time), so that a rendered
  # script runs in a test with Debian's tools; files written at evaluation time hold text only.
  fakePackage = name: { type = "derivation"; inherit name; outPath = "/usr"; };
  pkgs = {
    callPackage = _: _: fakePackage "meshd";
    tor = fakePackage "tor";
    iproute2 = fakePackage "iproute2";
    nftables = fakePackage "nftables";
    gnused = fakePackage "gnused";
    gnugrep = fakePackage "gnugrep";
    util-linux = fakePackage "util-linux";
    coreutils = fakePackage "coreutils";
    findutils = fakePackage "findutils";
    gnutar = fakePackage "gnutar";
    gawk = fakePackage "gawk";
    writeText = name: text: builtins.toFile name text;
    writeShellScript = name: text: builtins.toFile name ("#!/bin/bash\n" + text);
  };
  # Stand-ins for the NixOS options the module sets or reads.
  nixos = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      networking.hostName = mkOption { type = types.str; default = "nixos"; };
      networking.firewall.allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      users.users = mkOption { type = types.attrsOf types.anything; default = { }; };
      users.groups = mkOption { type = types.attrsOf types.anything; default = { }; };
      services.resolved.enable = mkOption { type = types.bool; default = false; };
      networking.resolvconf.enable = mkOption { type = types.bool; default = false; };
      networking.resolvconf.package = mkOption { type = types.package; default = fakePackage "openresolv"; };
      services.tor.enable = mkOption { type = types.bool; default = false; };
      services.tor.settings = mkOption { type = types.attrsOf types.anything; default = { }; };
      systemd.paths = mkOption { type = types.attrsOf types.anything; default = { }; };
      systemd.package = mkOption { type = types.package; default = fakePackage "systemd"; };
      systemd.services = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options = {
            description = mkOption { type = types.str; default = ""; };
            wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
            wants = mkOption { type = types.listOf types.str; default = [ ]; };
            requires = mkOption { type = types.listOf types.str; default = [ ]; };
            after = mkOption { type = types.listOf types.str; default = [ ]; };
            before = mkOption { type = types.listOf types.str; default = [ ]; };
            path = mkOption { type = types.listOf types.package; default = [ ]; };
            environment = mkOption { type = types.attrsOf types.str; default = { }; };
            restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
            startLimitIntervalSec = mkOption { type = types.nullOr types.int; default = null; };
            serviceConfig = anything;
            unitConfig = anything;
          };
        });
      };
    };
  };
  evaluated = lib.evalModules {
    modules = [ nixos ../../nixos/module.nix configuration { _module.args.pkgs = pkgs; } ];
  };
  config = evaluated.config;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  # A unit's [Service] section as NixOS writes it: one Key=value line per value (a list gives a line per
  # element), booleans as true/false.
  render = v: if builtins.isBool v then lib.boolToString v else toString v;
  serviceLines = sc: lib.concatLists (lib.mapAttrsToList (k: v:
    if builtins.isList v then map (x: "${k}=${render x}") v else [ "${k}=${render v}" ]) sc);
  unitOf = name:
    let s = config.systemd.services.${name}; in {
      inherit (s) description wantedBy wants requires after environment startLimitIntervalSec;
      service = serviceLines s.serviceConfig;
      scripts = lib.concatMap (k: map (x: builtins.readFile (lib.removePrefix "+" (toString x)))
        (lib.toList (s.serviceConfig.${k} or [ ]))) [ "ExecStartPre" "ExecStartPost" ];
      exec = s.serviceConfig.ExecStart;
    };
in
if failed != [ ] then throw "Failed assertions:\n- ${lib.concatStringsSep "\n- " failed}"
else {
  declaration = config.services.meshd.declarationText;
  unit = unitOf "meshd";
  joinUnit = if config.systemd.services ? meshd-join then unitOf "meshd-join" // {
    script = builtins.readFile config.systemd.services.meshd-join.serviceConfig.ExecStart;
    inherit (config.systemd.services.meshd-join) unitConfig before wantedBy;
  } else null;
  applyUnit = if config.systemd.services ? meshd-apply then unitOf "meshd-apply" // {
    script = builtins.readFile config.systemd.services.meshd-apply.serviceConfig.ExecStart;
  } else null;
  firewall = config.networking.firewall;
  users = lib.attrNames config.users.users;
  kernelModules = config.boot.kernelModules;
  tor = if config.systemd.services ? meshd-tor then {
    inherit (config.services.tor) enable settings;
    unit = let s = config.systemd.services.meshd-tor; in { inherit (s) wantedBy before; service = serviceLines s.serviceConfig; };
    script = builtins.readFile config.systemd.services.meshd-tor.serviceConfig.ExecStart;
    path = config.systemd.paths.meshd-tor;
  } else null;
}
