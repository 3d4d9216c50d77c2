# The consensus host of the staking walk-through: a member of network `stake`, joined with the token the execution
# host's meshd-apply wrote for it (delivered with sops-nix or agenix).
{
  networking.hostName = "consensus";
  services.resolved.enable = true;

  services.meshd = {
    enable = true;
    role = "member";
    tokenFile = "/run/secrets/meshd-token";
    endpoint = "consensus.stake.example:51820";
  };
}
