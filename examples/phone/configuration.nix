# The home node of the phone walk-through (examples/phone/README.md): the controller and hub of network `home`,
# serving two services that run in their own network namespaces, nix-bitcoin style (nix-bitcoin's
# `nix-bitcoin.netns-isolation.enable = true` puts each service in a namespace on 169.254.1.0/24), to one phone.
# Import it beside nix-bitcoin and the meshd module (`imports = [ meshd.nixosModules.default ]`, see the README).
{
  networking.hostName = "node";
  services.resolved.enable = true;

  services.meshd = {
    enable = true;
    role = "controller";
    network = "home";
    # A DNS name: phones keep the endpoint in their config, and dynamic DNS follows a new home address.
    endpoint = "node.example.net:51820";

    services.wallet = {
      # The wallet's address in its namespace (nix-bitcoin's netns-isolation gives each service one on
      # 169.254.1.0/24: take the wallet's and electrs's from `nix-bitcoin.netns-isolation` on your node).
      target = "169.254.1.17:9737";
      expose.wireguard.allow = [ "alice-phone" ];
    };
    services.electrs = {
      target = "169.254.1.14:50001";
      expose.wireguard.allow = [ "alice-phone" "laptop" ];
    };
    # The laptop reaches electrs only; the phone both. Configs appear in /var/lib/meshd/handout/.
    devices.laptop.dns = [ "10.77.0.1" ];
  };
}
