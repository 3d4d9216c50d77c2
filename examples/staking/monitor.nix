# The monitor host of the staking walk-through: a member of network `stake`, joined with the token the execution
# host's meshd-apply wrote for it (delivered with sops-nix or agenix).
{
  networking.hostName = "monitor";
  services.resolved.enable = true;

  services.meshd = {
    enable = true;
    role = "member";
    tokenFile = "/run/secrets/meshd-token";
    endpoint = "monitor.stake.example:51820";
  };
}
