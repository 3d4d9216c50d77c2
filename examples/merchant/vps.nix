# The VPS of the merchant walk-through (examples/merchant/README.md): a small public host that is the controller,
# the hub and the relay of network `shop`. pay.shop.example and admin.shop.example point at it (A/AAAA records).
{
  networking.hostName = "vps";

  services.meshd = {
    enable = true;
    role = "controller";
    network = "shop";
    endpoint = "vps.shop.example:51820";
    acme.contact = "ops@shop.example";

    # BTCPay's home box, behind NAT: invited once, its token written to /var/lib/meshd/handout/last-apply.txt.
    nodes.home = { };

    services.btcpay = {
      node = "home";
      target = "127.0.0.1:23000";
      expose.https = [
        # Customers' checkout: TLS ends here on the VPS, which proxies requests to BTCPay over the mesh.
        { hostname = "pay.shop.example"; relay = "vps"; tls = "terminate"; }
        # The merchant's own logins and API keys: TLS ends at home; the VPS routes the stream by its server name
        # and never holds the key or sees a request.
        { hostname = "admin.shop.example"; relay = "vps"; tls = "passthrough"; }
      ];
      # The web shop's server reaches BTCPay privately, as btcpay.shop.internal, over WireGuard only.
      expose.wireguard.allow = [ "webshop" ];
    };
    devices.webshop.dns = true;
  };
}
