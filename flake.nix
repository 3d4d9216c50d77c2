{
  description = "meshd: a self-hosted WireGuard mesh with exact per-device access, public names and onion services";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # An example host: the module, the example's configuration, and what any NixOS machine needs to build
      # (a root file system and a boot loader; replace them with your hardware configuration).
      example = file: nixpkgs.lib.nixosSystem {
        system = "x86_64-linux";
        modules = [
          self.nixosModules.default
          file
          {
            fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
            boot.loader.grub.devices = [ "/dev/vda" ];
            system.stateVersion = "26.05";
          }
        ];
      };
    in
    {
      packages = forAll (pkgs: rec {
        meshd = pkgs.callPackage ./nixos/package.nix { };
        default = meshd;
      });

      # services.meshd, with the package built from this flake.
      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos/module.nix ];
        services.meshd.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.meshd;
      };

      # The examples of examples/*/README.md, one per host:
      #   nix build .#nixosConfigurations.phone-node.config.system.build.toplevel
      nixosConfigurations = {
        phone-node = example ./examples/phone/configuration.nix;
        merchant-vps = example ./examples/merchant/vps.nix;
        merchant-home = example ./examples/merchant/home.nix;
        staking-execution = example ./examples/staking/execution.nix;
        staking-consensus = example ./examples/staking/consensus.nix;
        staking-validator = example ./examples/staking/validator.nix;
        staking-monitor = example ./examples/staking/monitor.nix;
      };
    };
}
