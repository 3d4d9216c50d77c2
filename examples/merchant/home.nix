# The home box of the merchant walk-through: BTCPay Server (nix-bitcoin's `services.btcpayserver`, listening on
# 127.0.0.1:23000), a member of network `shop` behind NAT (no endpoint, no port opened at home).
{
  networking.hostName = "home";

  services.meshd = {
    enable = true;
    role = "member";
    # The invite token from the VPS (/var/lib/meshd/handout/last-apply.txt there), delivered as a secret:
    # sops-nix (`sops.secrets.meshd-token = { };`) or agenix. Read once, at the first start.
    tokenFile = "/run/secrets/meshd-token";
    # admin.shop.example is in passthrough mode: this host obtains its certificate itself.
    acme.contact = "ops@shop.example";
  };
}
