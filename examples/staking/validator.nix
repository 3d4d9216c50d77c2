# The validator host of the staking walk-through: a member of network `stake`, joined with the token the execution
# host's meshd-apply wrote for it (delivered with sops-nix or agenix).
{
  networking.hostName = "validator";
  services.resolved.enable = true;

  services.meshd = {
    enable = true;
    role = "member";
    tokenFile = "/run/secrets/meshd-token";
    # Behind NAT at home: no endpoint; it opens its tunnels itself.
  };
}
