# The execution host of the staking walk-through (examples/staking/README.md): the controller and hub of network
# `stake`, with a public address; it runs the execution client (geth, its engine API on 127.0.0.1:8551).
{
  networking.hostName = "execution";
  services.resolved.enable = true;

  services.meshd = {
    enable = true;
    role = "controller";
    network = "stake";
    endpoint = "execution.stake.example:51820";
    cidr = "10.88.0.0/16";

    nodes.consensus.endpoint = "consensus.stake.example:51820";
    nodes.validator = { };                        # at home, behind NAT: no endpoint
    nodes.monitor.endpoint = "monitor.stake.example:51820";

    services.engine-api = { target = "127.0.0.1:8551"; };                      # on this host
    services.beacon-api = { node = "consensus"; target = "127.0.0.1:5052"; };
    services.validator-metrics = { node = "validator"; target = "127.0.0.1:5064"; };

    # Default deny for the hosts that hold what matters: only the validator (and monitoring) reaches the beacon
    # node, only monitoring reaches the validator. The hub itself has no rule: it routes for every host.
    access.consensus.from = [ "validator" "monitor" "execution" ];
    access.validator.from = [ "monitor" ];
  };
}
