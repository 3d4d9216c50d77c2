# services.meshd: a WireGuard mesh host (controller, member or relay), declared.
#
# The controller's network (nodes, devices, services, their exposures, access rules) is rendered into the
# declaration file of `meshctl apply` (docs/CLI.md, "Declaration files") and applied whenever it changes. Keys
# are made on the host at run time by meshd and meshctl, never at evaluation time and never in the Nix store; a
# member joins with an invite token read from a file at run time (sops-nix, agenix). See nixos/README.md.
{ config, options, lib, pkgs, ... }:
let
  inherit (builtins) elemAt;
  inherit (lib) mkOption mkEnableOption mkIf mkMerge types optional optionals optionalString
    concatStringsSep escapeShellArg escapeShellArgs mapAttrsToList attrNames filterAttrs;
  meshdLib = import ./lib.nix { inherit lib; };
  t = meshdLib;
  cfg = config.services.meshd;
  # The controller's name; empty (and refused by an assertion) when the host name is no DNS label.
  hubName = if cfg.name != null then cfg.name else "";
  stateDir = "/var/lib/meshd";
  handoutDir = "${stateDir}/handout";
  isController = cfg.role == "controller";
  isMember = !isController;

  httpsOptions = types.submodule {
    options = {
      hostname = mkOption {
        type = t.domain;
        example = "pay.shop.example";
        description = "The public DNS name (an A/AAAA record pointing at the relay's public address).";
      };
      relay = mkOption {
        type = t.label;
        description = "The node that serves the name: the controller (hub) or a node declared with `role = \"relay\"`.";
      };
      tls = mkOption {
        type = types.enum [ "terminate" "passthrough" ];
        default = "terminate";
        description = ''
          `terminate`: the relay holds the certificate and proxies requests over the mesh. `passthrough`: the relay
          routes the TLS stream by its server name (SNI) and the service's node holds the certificate.
        '';
      };
    };
  };

  serviceOptions = { name, ... }: {
    options = {
      node = mkOption {
        type = t.label;
        default = hubName;
        defaultText = lib.literalExpression "config.services.meshd.name (the controller)";
        description = "The node that reaches the service at `target`: the controller or a declared node.";
      };
      target = mkOption {
        type = t.hostPort;
        example = "169.254.1.17:9737";
        description = "HOST:PORT where that node reaches the service (a nix-bitcoin network namespace address, say).";
      };
      port = mkOption {
        type = types.nullOr t.port;
        default = null;
        description = "The port at the service's mesh address (default: the target's port).";
      };
      protocol = mkOption {
        type = types.enum [ "tcp" "udp" ];
        default = "tcp";
        description = "What the forwarder carries: TCP connections or UDP datagrams.";
      };
      expose.wireguard.allow = mkOption {
        type = types.listOf t.label;
        default = [ ];
        example = [ "alice-phone" ];
        description = "Devices (phones, laptops) that reach the service over WireGuard, by its mesh name.";
      };
      expose.tor = {
        enable = mkEnableOption "the service as a Tor v3 onion service from its node";
        port = mkOption {
          type = types.nullOr t.port;
          default = null;
          description = "The port at the .onion address (default: the service's mesh port).";
        };
        clients = mkOption {
          type = types.listOf t.label;
          default = [ ];
          description = ''
            Devices that alone may find the service (Tor client authorization); each gets a key made by meshctl,
            written to ${handoutDir}/DEVICE.SERVICE.auth_private. Empty: anyone with the address.
          '';
        };
      };
      expose.https = mkOption {
        type = types.either httpsOptions (types.listOf httpsOptions);
        default = [ ];
        apply = v: if builtins.isList v then v else [ v ];
        description = "Public names served over HTTPS through a relay: one, or a list.";
      };
    };
  };

  nodeOptions = {
    options = {
      role = mkOption {
        type = types.enum [ "node" "relay" ];
        default = "node";
        description = "`relay`: a public host that serves public names and relays between hosts behind NAT.";
      };
      endpoint = mkOption {
        type = types.nullOr t.hostPort;
        default = null;
        description = "Where other hosts reach it (default: as it joined; none behind NAT).";
      };
      mtu = mkOption {
        type = types.nullOr t.mtu;
        default = null;
        description = "Its interface's own MTU (default: as it is).";
      };
      disabled = mkOption {
        type = types.bool;
        default = false;
        description = "Out of the mesh until enabled again.";
      };
    };
  };

  deviceOptions = {
    options.dns = mkOption {
      type = types.either types.bool (types.listOf t.ipAddress);
      default = true;
      description = "The new config's DNS line: the hub (true), none (false) or these addresses.";
    };
  };

  # The declaration, as `meshctl apply` reads it. Devices: those declared and those any service allows.
  services = cfg.services;
  allowedDevices = lib.unique (lib.concatMap (s: s.expose.wireguard.allow) (builtins.attrValues services));
  deviceNames = lib.unique (attrNames cfg.devices ++ allowedDevices);
  deviceDns = d: if cfg.devices ? ${d} then cfg.devices.${d}.dns else true;
  allowOf = d: builtins.filter (s: builtins.elem d services.${s}.expose.wireguard.allow) (attrNames services);
  declaration = {
    mtu = if isController then cfg.mtu else null;
    nodes = mapAttrsToList (name: n: {
      inherit name;
      inherit (n) role endpoint mtu;
      disabled = if n.disabled then true else null;
    }) cfg.nodes;
    services = mapAttrsToList (name: s: {
      inherit name;
      inherit (s) node target port protocol;
      https = if s.expose.https == [ ] then null else s.expose.https;
      tor =
        if !s.expose.tor.enable then null
        else if s.expose.tor.port == null && s.expose.tor.clients == [ ] then true
        else filterAttrs (_: v: v != null && v != [ ]) { inherit (s.expose.tor) port clients; };
    }) services;
    devices = map (d: { name = d; allow = allowOf d; dns = deviceDns d; }) deviceNames;
    access = mapAttrsToList (to: a: { inherit to; inherit (a) from; }) cfg.access;
  };
  declarationText = concatStringsSep "\n" (builtins.filter (s: s != "") [
    "# Rendered by the meshd NixOS module (services.meshd); applied by meshd-apply.service."
    (optionalString (declaration.mtu != null) "mtu = ${toString declaration.mtu}\n")
    (t.toml.tables "node" declaration.nodes)
    (t.toml.tables "service" declaration.services)
    (t.toml.tables "device" declaration.devices)
    (t.toml.tables "access" declaration.access)
  ]) + "\n";
  declarationFile = pkgs.writeText "meshd-network.toml" declarationText;

  # Checks across options that types cannot make, each naming the option at fault.
  labelKeys = option: names:
    map (n: {
      assertion = t.isLabel n;
      message = "services.meshd.${option}.\"${n}\": \"${n}\" is not a DNS label (1-63 letters, digits and '-')";
    }) names;
  nodeNames = [ hubName ] ++ attrNames cfg.nodes;
  relays = [ hubName ] ++ attrNames (filterAttrs (_: n: n.role == "relay") cfg.nodes);
  perService = name: s:
    [
      {
        assertion = builtins.elem s.node nodeNames;
        message = "services.meshd.services.${name}.node: \"${s.node}\" is neither the controller (${hubName}) nor a node in services.meshd.nodes";
      }
      {
        assertion = s.protocol == "tcp" || (!s.expose.tor.enable && s.expose.https == [ ]);
        message = "services.meshd.services.${name}.expose: a UDP service can be exposed over WireGuard only";
      }
      {
        assertion = s.expose.tor.enable || (s.expose.tor.clients == [ ] && s.expose.tor.port == null);
        message = "services.meshd.services.${name}.expose.tor: clients and port need enable = true";
      }
      {
        assertion = builtins.length s.expose.tor.clients <= 320;
        message = "services.meshd.services.${name}.expose.tor.clients: at most 320 (what a descriptor can hold)";
      }
    ]
    ++ map (d: {
      assertion = builtins.elem d deviceNames;
      message = "services.meshd.services.${name}.expose.tor.clients: \"${d}\" is not a device (name it in some service's expose.wireguard.allow)";
    }) s.expose.tor.clients
    ++ map (h: {
      assertion = builtins.elem h.relay relays;
      message = "services.meshd.services.${name}.expose.https: relay \"${h.relay}\" is neither the controller nor a node with role = \"relay\"";
    }) s.expose.https;
  declared = attrNames cfg.nodes ++ attrNames services ++ deviceNames;
  duplicates = list: lib.unique (builtins.filter (n: lib.count (x: x == n) list > 1) list);
  httpsNames = lib.concatMap (s: map (h: lib.toLower h.hostname) s.expose.https) (builtins.attrValues services);
  httpsRelays = lib.concatMap (s: map (h: h.relay) s.expose.https) (builtins.attrValues services);
  assertions =
    [
      {
        assertion = isController -> cfg.endpoint != null;
        message = "services.meshd.endpoint: the controller needs one (HOST:PORT where devices and hosts reach it)";
      }
      {
        assertion = isController -> cfg.network != null;
        message = "services.meshd.network: the controller needs the network's name";
      }
      {
        assertion = isMember -> cfg.tokenFile != null;
        message = "services.meshd.tokenFile: a ${cfg.role} joins with an invite token (`meshctl node invite NAME`) read from this file";
      }
      {
        assertion = isMember -> (cfg.nodes == { } && services == { } && cfg.devices == { } && cfg.access == { });
        message = "services.meshd: nodes, services, devices and access are declared on the controller only (role = \"controller\")";
      }
      {
        assertion = duplicates (map lib.toLower ([ hubName ] ++ declared)) == [ ];
        message = "services.meshd: nodes, services and devices share one namespace with the controller's name (${hubName}): ${
          concatStringsSep ", " (duplicates (map lib.toLower ([ hubName ] ++ declared)))} declared twice";
      }
      {
        assertion = duplicates httpsNames == [ ];
        message = "services.meshd.services: the public name ${concatStringsSep ", " (duplicates httpsNames)} is in more than one expose.https";
      }
      {
        assertion = !(builtins.elem cfg.dnsPort [ 1021 51871 ]);
        message = "services.meshd.dnsPort: ${toString cfg.dnsPort} is a port meshd uses itself";
      }
      {
        assertion = cfg.dnsPort != listenPort;
        message = "services.meshd.listenPort (or the endpoint's port) and services.meshd.dnsPort are both ${toString listenPort}";
      }
      {
        assertion = listenPort != 1021;
        message = "services.meshd.listenPort: 1021 (${if cfg.listenPort == null then "the endpoint's port" else "given"}) is meshd's own port on mesh addresses: choose another";
      }
      {
        assertion = isMember -> (cfg.network == null && cfg.domain == null && options.services.meshd.cidr.highestPrio >= 1500);
        message = "services.meshd: network, domain and cidr are the controller's (a member takes them from its token)";
      }
      {
        assertion = cfg.tor.backend == "system" -> cfg.tor.configFile == null;
        message = "services.meshd.tor.configFile is for meshd's own tor: with tor.backend = \"system\" configure services.tor instead";
      }
      {
        assertion = cfg.setHostResolver -> (useResolved || useResolvconf);
        message = "services.meshd.setHostResolver needs services.resolved or networking.resolvconf";
      }
      {
        assertion = (cfg.setHostResolver && useResolvconf) -> cfg.dnsPort == 53;
        message = "services.meshd.dnsPort: resolv.conf names no port: with openresolv the mesh DNS must be on 53 (or set setHostResolver = false)";
      }
      {
        assertion = isController -> cfg.name != null;
        message = "services.meshd.name: networking.hostName (\"${config.networking.hostName}\") is not a DNS label: set services.meshd.name";
      }
    ]
    ++ labelKeys "nodes" (attrNames cfg.nodes)
    ++ labelKeys "services" (attrNames services)
    ++ labelKeys "devices" deviceNames
    ++ labelKeys "access" (attrNames cfg.access)
    ++ lib.concatLists (mapAttrsToList perService services)
    ++ map (d: {
      assertion = allowOf d != [ ];
      message = "services.meshd.devices.${d}: the device is allowed no service (name it in a service's expose.wireguard.allow)";
    }) deviceNames
    ++ lib.concatLists (mapAttrsToList (to: a:
      map (from: {
        assertion = builtins.elem from nodeNames && from != to;
        message = "services.meshd.access.${to}.from: \"${from}\" is not another node (the controller or one in services.meshd.nodes)";
      }) a.from
      ++ [{
        assertion = builtins.elem to nodeNames;
        message = "services.meshd.access.${to}: \"${to}\" is not a node (the controller or one in services.meshd.nodes)";
      }]) cfg.access);

  # The system's tor (tor.backend = "system"): meshd writes the keys, client lists and services.torrc under its
  # state directory; this copies them where that tor reads them, reading as meshd and writing as tor, so that
  # neither side gets more than its own rights (no link, device or FIFO is handed over: files and directories only).
  systemTor = cfg.tor.backend == "system";
  torKeeperDir = "/var/lib/tor/meshd";
  torHandOver = pkgs.writeShellScript "meshd-tor-hand-over" ''
    set -euo pipefail
    umask 077
    from=${stateDir}/tor
    to=${torKeeperDir}
    # Root only starts these: every file operation runs as tor in tor's directory or as meshd in meshd's, so a
    # link either user plants there bends nothing of root's.
    as_tor="${pkgs.util-linux}/bin/setpriv --reuid=tor --regid=tor --clear-groups"
    as_meshd="${pkgs.util-linux}/bin/setpriv --reuid=meshd --regid=meshd --clear-groups"
    $as_tor ${pkgs.coreutils}/bin/mkdir -p -m 0700 "$to"
    if [ -d "$to/new" ]; then $as_tor ${pkgs.coreutils}/bin/chmod -R u+rwX "$to/new"; fi
    $as_tor ${pkgs.coreutils}/bin/rm -rf "$to/new"
    $as_tor ${pkgs.coreutils}/bin/mkdir -m 0700 "$to/new" "$to/new/onion"
    if [ -d "$from/onion" ]; then
      # Directories and regular files of at most 16 KiB (keys, client lists, the lines), 20000 entries at most, as
      # meshd lists them; nothing else. tor's tar may write no file larger (a file grown after it was listed).
      (cd "$from" && $as_meshd ${pkgs.findutils}/bin/find onion services.torrc \
          \( -type d -o -type f -size -17k \) -print0 2>/dev/null || true) \
        | ${pkgs.coreutils}/bin/head -z -n 20000 \
        | $as_meshd ${pkgs.gnutar}/bin/tar -C "$from" --null --no-recursion -T - -cf - \
        | $as_tor ${pkgs.util-linux}/bin/prlimit --fsize=16384 -- \
            ${pkgs.gnutar}/bin/tar -C "$to/new" -xf - --no-same-permissions
      $as_tor ${pkgs.findutils}/bin/find "$to/new" ! -type f ! -type d -delete
      $as_tor ${pkgs.coreutils}/bin/chmod -R u+rwX,go-rwx "$to/new"
      # A key tor could not load would keep it from starting: one that is not a C tor ed25519 secret key (96 bytes
      # under its header) is left out, and tor makes that service a new one.
      for key in "$to/new/onion"/*/hs_ed25519_secret_key; do
        [ -f "$key" ] || continue
        if [ "$($as_tor ${pkgs.coreutils}/bin/stat -c %s "$key")" != 96 ] \
          || [ "$($as_tor ${pkgs.coreutils}/bin/head -c 29 "$key")" != "== ed25519v1-secret: type0 ==" ]; then
          echo "meshd-tor: $key is not an onion service key: left out" >&2
          $as_tor ${pkgs.coreutils}/bin/rm -f "$key" "''${key%_secret_key}_public_key" "''${key%/*}/hostname"
        fi
      done
    fi
    $as_tor ${pkgs.coreutils}/bin/touch "$to/new/services.torrc"
    $as_tor ${pkgs.coreutils}/bin/mv "$to/new/services.torrc" "$to/new/services.torrc.in"
    # Of services.torrc only what meshd writes is kept, written anew here: a HiddenServiceDir of a service copied
    # here, each once and only with at least one port, then its HiddenServicePort lines (a port 1-65535 and an IPv4
    # or [IPv6] address with a port). Any other line (a SocksPort, a ControlPort, a directory elsewhere, an address
    # tor would not parse) is dropped and counted, so meshd's user can neither configure the system's tor nor
    # keep it from starting.
    $as_tor ${pkgs.gawk}/bin/awk -v out="$to/new/services.torrc" -v dir="$to/onion/" '
      function port(p) { return p ~ /^[1-9][0-9]*$/ && length(p) <= 5 && p + 0 <= 65535 }
      function ipv4(a,   o, n, i) {
        n = split(a, o, ".")
        if (n != 4) return 0
        for (i = 1; i <= 4; i++) if (o[i] !~ /^(0|[1-9][0-9]*)$/ || length(o[i]) > 3 || o[i] + 0 > 255) return 0
        return 1
      }
      function ipv6(a,   b, g, n, i) {
        if (a !~ /^[0-9A-Fa-f:]+$/ || a ~ /:::/ || a ~ /^:[^:]/ || a ~ /[^:]:$/) return 0
        b = a
        if (gsub(/::/, "", b) > 1) return 0
        n = split(a, g, ":")
        if (a ~ /::/) { if (n > 9) return 0 } else if (n != 8) return 0
        for (i = 1; i <= n; i++) if (length(g[i]) > 4 || (a !~ /::/ && g[i] == "")) return 0
        return 1
      }
      function target(t,   n, parts) {
        if (substr(t, 1, 1) == "[") {
          n = index(t, "]:")
          if (n == 0) return ""
          return ipv6(substr(t, 2, n - 2)) && port(substr(t, n + 2)) ? t : ""
        }
        n = split(t, parts, ":")
        return n == 2 && ipv4(parts[1]) && port(parts[2]) ? t : ""
      }
      function flush() { if (ports != "") printf "\nHiddenServiceDir \"%s\"\n%s", current, ports > out; current = ""; ports = "" }
      BEGIN { printf "" > out }
      /^#/ || /^$/ { next }
      $1 == "HiddenServiceDir" && NF == 2 {
        name = $2
        if (substr(name, 1, 1) == "\"" && substr(name, length(name), 1) == "\"") name = substr(name, 2, length(name) - 2)
        label = substr(name, length(dir) + 1)
        if (substr(name, 1, length(dir)) == dir && label ~ /^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/ && !(label in seen)) {
          flush(); seen[label] = 1; current = name; next
        }
      }
      $1 == "HiddenServicePort" && NF == 3 && current != "" && port($2) && target($3) != "" {
        ports = ports sprintf("HiddenServicePort %d %s\n", $2, $3); next
      }
      { flush(); dropped++ }
      END {
        flush()
        if (dropped) printf "meshd-tor: %d lines of services.torrc were not handed over\n", dropped > "/dev/stderr"
      }
    ' "$to/new/services.torrc.in"
    $as_tor ${pkgs.coreutils}/bin/rm -f "$to/new/services.torrc.in"
    # The file first (replaced at once: tor never finds it missing), then the keys.
    $as_tor ${pkgs.coreutils}/bin/mv -f "$to/new/services.torrc" "$to/services.torrc"
    if [ -d "$to/onion" ]; then
      $as_tor ${pkgs.coreutils}/bin/chmod -R u+rwX "$to/onion"
      $as_tor ${pkgs.coreutils}/bin/rm -rf "$to/onion.old"
      $as_tor ${pkgs.coreutils}/bin/mv "$to/onion" "$to/onion.old"
    fi
    $as_tor ${pkgs.coreutils}/bin/mv "$to/new/onion" "$to/onion"
    $as_tor ${pkgs.coreutils}/bin/rm -rf "$to/onion.old" "$to/new"
  '';

  endpointPort = e: lib.toInt (lib.last (lib.splitString ":" e));
  listenPort =
    if cfg.listenPort != null then cfg.listenPort
    else if cfg.endpoint != null then endpointPort cfg.endpoint
    else 51820;

  flag = name: value: optionals (value != null) [ "--${name}" (toString value) ];
  # Free text is given as one `--NAME=VALUE` argument, so that a value starting with `-` is not read as a flag.
  flagEq = name: value: optional (value != null) "--${name}=${toString value}";
  setupArgs =
    if isController then
      [ "init" "--network" cfg.network "--name" hubName "--endpoint" cfg.endpoint "--cidr" cfg.cidr ]
      ++ flag "domain" cfg.domain ++ [ "--interface" cfg.interface "--listen-port" (toString listenPort) ]
      ++ flag "mtu" cfg.mtu
    else
      [ "join" "-" ] ++ flag "endpoint" cfg.endpoint
      ++ [ "--interface" cfg.interface "--listen-port" (toString listenPort) ] ++ flag "mtu" cfg.mtu;
  runArgs =
    [ "run" "--state-dir" stateDir "--wireguard" cfg.wireguard "--dns-port" (toString cfg.dnsPort) ]
    ++ flagEq "acme-directory" cfg.acme.directory ++ flagEq "acme-ca-root" cfg.acme.caRoot
    ++ flagEq "acme-contact" cfg.acme.contact
    ++ [ "--http-port" (toString cfg.acme.httpPort) "--https-port" (toString cfg.acme.httpsPort) ]
    ++ (if systemTor then [ "--tor-external" "${torKeeperDir}/onion" ]
        else [ "--tor-binary" "${cfg.tor.package}/bin/tor" ] ++ flagEq "tor-config" cfg.tor.configFile);

  # Made once, on the first start: the network (controller, meshd.service's ExecStartPre) or the join (member,
  # meshd-join.service, which runs only while the host has not joined: the token file may go once it has). Keys are
  # made here, on the host; the token is read from systemd's credential on standard input, never from the command
  # line.
  setup = pkgs.writeShellScript "meshd-setup" ''
    set -eu
    if [ -e ${stateDir}/${if isController then "meshd.db" else "member.json"} ]; then exit 0; fi
    exec ${cfg.package}/bin/meshd ${escapeShellArgs setupArgs} --state-dir ${stateDir} ${
      optionalString isMember ''< "$CREDENTIALS_DIRECTORY/token"''}
  '';

  # Point the host's resolver at this host's mesh DNS for the mesh domain (systemd-resolved's per-link DNS), as
  # docs/CLI.md describes for other systems. Runs privileged ("+") after meshd reports it is ready.
  resolver = pkgs.writeShellScript "meshd-resolver" ''
    set -euo pipefail
    # As meshd's user: root reads no state directory another user owns (meshd refuses to). What comes back is
    # checked before root hands it on: one IPv4 address, and a DNS name${optionalString isController " (the network's)"}.
    info=$(${pkgs.util-linux}/bin/runuser -u meshd -- ${cfg.package}/bin/meshd info --state-dir ${stateDir})
    address=$(printf '%s\n' "$info" | ${pkgs.gnused}/bin/sed -n 's/^address //p' | ${pkgs.coreutils}/bin/head -n 1)
    domain=$(printf '%s\n' "$info" | ${pkgs.gnused}/bin/sed -n 's/^domain //p' | ${pkgs.coreutils}/bin/head -n 1)
    if ! printf '%s' "$address" | ${pkgs.gnugrep}/bin/grep -Eqx '([0-9]{1,3}\.){3}[0-9]{1,3}'; then
      echo "meshd info gave no mesh address (\"$address\"): the resolver is left as it is" >&2; exit 1
    fi
    if ! printf '%s' "$domain" | ${pkgs.gnugrep}/bin/grep -Eqx '${domainRegex}'${
      optionalString isController '' || [ "$domain" != ${escapeShellArg controllerDomain} ]''}; then
      echo "meshd info gave an unexpected domain (\"$domain\"): the resolver is left as it is" >&2; exit 1
    fi
    ${if useResolved then ''
      ${config.systemd.package}/bin/resolvectl dns ${cfg.interface} "$address${optionalString (cfg.dnsPort != 53) ":${toString cfg.dnsPort}"}"
      ${config.systemd.package}/bin/resolvectl domain ${cfg.interface} "~$domain"
    '' else ''
      # openresolv: this host's mesh DNS first (metric 0) with the mesh domain to search; it forwards other names
      # to the resolvers meshd read when it started (its own address left out). Taken back when meshd stops.
      printf 'nameserver %s\nsearch %s\n' "$address" "$domain" \
        | ${config.networking.resolvconf.package}/bin/resolvconf -m 0 -a ${cfg.interface}
    ''}
  '';
  useResolved = config.services.resolved.enable;
  useResolvconf = !useResolved && config.networking.resolvconf.enable;

  # Values fixed when the network is made (controller) or joined (member), checked before every start against what
  # meshd has: a change would otherwise be ignored while the firewall followed it. The controller's endpoint is not
  # fixed: a new one is carried out as `meshctl node update NAME --endpoint` (members follow within a second).
  domainRegex = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?([.][A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*";
  controllerDomain = lib.toLower (if cfg.domain != null then cfg.domain else "${toString cfg.network}.internal");
  fixed = [ [ "interface" cfg.interface "interface" ] [ "listen_port" (toString listenPort) "listenPort" ] ]
    ++ optionals isController [
      [ "network" (lib.toLower (toString cfg.network)) "network" ]
      [ "domain" controllerDomain "domain" ]
      [ "cidr" cfg.cidr "cidr" ]
    ];
  check = pkgs.writeShellScript "meshd-check" ''
    set -euo pipefail
    info=$(${cfg.package}/bin/meshd info --state-dir ${stateDir})
    get() { printf '%s\n' "$info" | ${pkgs.gnused}/bin/sed -n "s/^$1 //p" | ${pkgs.coreutils}/bin/head -n 1; }
    wrong=""
    ${lib.concatMapStrings (f: ''
      if [ "$(get ${elemAt f 0})" != ${escapeShellArg (elemAt f 1)} ]; then
        wrong="$wrong services.meshd.${elemAt f 2} is ${elemAt f 1} but this host's is $(get ${elemAt f 0});"
      fi
    '') fixed}
    if [ -n "$wrong" ]; then
      echo "meshd:$wrong these are fixed when the network is ${if isController then "made" else "joined"}: set them back (or move ${stateDir} away to start anew)" >&2
      exit 1
    fi
    ${optionalString (isController && cfg.endpoint != null) ''
      if [ "$(get endpoint)" != ${escapeShellArg cfg.endpoint} ]; then
        echo "meshd: the endpoint moves from $(get endpoint) to ${cfg.endpoint}"
        ${cfg.package}/bin/meshctl --state-dir ${stateDir} node update ${hubName} --endpoint ${escapeShellArg cfg.endpoint}
      fi
    ''}
  '';

  # Applies the rendered declaration. Invite tokens and device configs are secrets: they go to files under
  # ${handoutDir} (0600), and the journal gets the plan lines only.
  apply = pkgs.writeShellScript "meshd-apply" ''
    set -eu
    umask 077
    mkdir -p ${handoutDir}
    out=${handoutDir}/last-apply.txt
    status=0
    ${cfg.package}/bin/meshctl --state-dir ${stateDir} apply ${declarationFile} \
      --out-dir ${handoutDir} --expires ${cfg.inviteExpires} > "$out.new" || status=$?
    mv "$out.new" "$out"
    ${pkgs.gnugrep}/bin/grep -E '^([-+~!] |applied |no changes|device |Tor client )' "$out" || true
    # Each new invite in a file of its own, kept until the next token for that node: NAME.token.
    ${pkgs.gnugrep}/bin/grep -E '^[a-z0-9-]+ meshd-invite:[^ ]+$' "$out" | while read -r name token; do
      printf '%s\n' "$token" > "${handoutDir}/$name.token.new"
      mv "${handoutDir}/$name.token.new" "${handoutDir}/$name.token"
      echo "invite for node $name in ${handoutDir}/$name.token (valid ${cfg.inviteExpires}): put it in that host's services.meshd.tokenFile"
    done
    exit "$status"
  '';

  hardening = {
    User = "meshd";
    Group = "meshd";
    UMask = "0077";
    StateDirectory = "meshd";
    StateDirectoryMode = "0700";
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateMounts = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged @obsolete" ];
    SystemCallErrorNumber = "EPERM";
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
    CapabilityBoundingSet = "";
  };
in
{
  options.services.meshd = {
    enable = mkEnableOption "meshd, a WireGuard mesh host";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The meshd package (meshd and meshctl).";
    };

    role = mkOption {
      type = types.enum [ "controller" "member" "relay" ];
      description = ''
        `controller`: makes the network (`meshd init`), is its hub, and applies the declared nodes, devices,
        services and access rules. `member`: joins it with the token in `tokenFile`. `relay`: a member with a public
        address that serves public names (HTTPS) and relays between hosts behind NAT (invite it with `role = "relay"`
        in the controller's `nodes`).
      '';
    };

    network = mkOption {
      type = types.nullOr t.label;
      default = null;
      description = "The network's name (controller); the default domain is NETWORK.internal.";
    };

    name = mkOption {
      type = types.nullOr t.label;
      default = if t.isLabel config.networking.hostName then config.networking.hostName else null;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "This host's name in the network (controller; a member's name is the one it was invited as).";
    };

    cidr = mkOption {
      type = t.cidr;
      default = "10.77.0.0/16";
      description = "The mesh's IPv4 range (controller); an IPv6 ULA /48 is drawn beside it.";
    };

    domain = mkOption {
      type = types.nullOr t.domain;
      default = null;
      description = "The mesh's DNS domain (controller; default NETWORK.internal).";
    };

    endpoint = mkOption {
      type = types.nullOr t.hostPort;
      default = null;
      example = "node.example.net:51820";
      description = ''
        HOST:PORT where devices and other hosts reach this host (a DNS name survives a change of address). Required
        on the controller; leave it null on a member behind NAT.
      '';
    };

    interface = mkOption {
      type = t.interface;
      default = "meshd0";
      description = "The WireGuard interface's name.";
    };

    listenPort = mkOption {
      type = types.nullOr t.port;
      default = null;
      description = "WireGuard's UDP port (and the controller's join port, TCP). Default: the endpoint's port, else 51820.";
    };

    mtu = mkOption {
      type = types.nullOr t.mtu;
      default = null;
      description = "The network's MTU (controller) or this host's own (member). Default 1420.";
    };

    wireguard = mkOption {
      type = types.enum [ "kernel" "userspace" "auto" ];
      default = "auto";
      description = "The WireGuard backend: the kernel module, boringtun embedded in meshd, or the kernel's if present.";
    };

    dnsPort = mkOption {
      type = t.port;
      default = 53;
      description = "The mesh DNS's port on this host's mesh addresses (another port next to a DNS server on 53).";
    };

    tokenFile = mkOption {
      type = types.nullOr t.secretPath;
      default = null;
      example = "/run/secrets/meshd-token";
      description = ''
        A member's invite token (`meshctl node invite NAME`), read once at the first start through systemd's
        credentials. A path as a string: a Nix path would be copied into the world-readable Nix store.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Open WireGuard's UDP port (it answers authenticated peers only), the controller's join port (TCP, silent to
        anyone without a token) and, on a relay or controller serving public names, TCP 80 and 443.
      '';
    };

    setHostResolver = mkOption {
      type = types.bool;
      default = config.services.resolved.enable || config.networking.resolvconf.enable;
      defaultText = lib.literalExpression "config.services.resolved.enable || config.networking.resolvconf.enable";
      description = ''
        Point the host's resolver at this host's mesh DNS (the mesh's names everywhere on the host, also without the
        controller): systemd-resolved's per-link DNS for the mesh domain, or else openresolv (NixOS's resolvconf)
        with the mesh DNS first and the mesh domain searched.
      '';
    };

    inviteExpires = mkOption {
      type = t.duration;
      default = "24h";
      description = "How long the invite tokens that applying the declaration makes stay valid.";
    };

    nodes = mkOption {
      type = types.attrsOf (types.submodule nodeOptions);
      default = { };
      description = "The member hosts (controller): each invited once, its token written under ${handoutDir}.";
    };

    services = mkOption {
      type = types.attrsOf (types.submodule serviceOptions);
      default = { };
      description = "Services and how each is exposed: over WireGuard to devices, as an onion service, on public names.";
    };

    devices = mkOption {
      type = types.attrsOf (types.submodule deviceOptions);
      default = { };
      description = ''
        Devices' settings (controller). A device named in a service's `expose.wireguard.allow` exists without an
        entry here; its config (and QR code) is written to ${handoutDir}/DEVICE.conf when it is added.
      '';
    };

    access = mkOption {
      type = types.attrsOf (types.submodule { options.from = mkOption { type = types.listOf t.label; }; });
      default = { };
      example = { validator.from = [ "consensus" ]; };
      description = "Access rules (controller): `access.NODE.from = [ ... ]`: only those nodes reach NODE. Nodes without a rule are reached by every node.";
    };

    acme = {
      directory = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The CA's ACME directory URL (default Let's Encrypt's production directory).";
      };
      contact = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The ACME account's contact email.";
      };
      caRoot = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "A PEM root to trust for the CA's own HTTPS (a test CA).";
      };
      httpPort = mkOption { type = t.port; default = 80; description = "The relay's public HTTP port."; };
      httpsPort = mkOption { type = t.port; default = 443; description = "The relay's public HTTPS port."; };
    };

    tor = {
      backend = mkOption {
        type = types.enum [ "meshd" "system" ];
        default = "meshd";
        description = ''
          Who runs tor for this host's onion services; meshd makes and keeps their keys either way. `meshd` (the
          default): meshd's own tor, its child, under meshd's unprivileged user, running only while it serves
          something and reloaded the moment a client is added or taken off (client keys are made at run time by
          `meshctl`, so no rebuild is involved). `system`: NixOS's `services.tor` serves them: meshd writes the
          onion-service lines to ${stateDir}/tor/services.torrc, a path unit copies them with the keys to
          ${torKeeperDir} (read as meshd, written as tor) and reloads tor, which includes the file; for hosts
          that run services.tor anyway (one tor, its own hardening and updates). See nixos/README.md.
        '';
      };
      package = mkOption {
        type = types.package;
        default = pkgs.tor;
        defaultText = lib.literalExpression "pkgs.tor";
        description = "The tor that meshd runs (backend meshd).";
      };
      configFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "A file of torrc lines meshd appends to its tor's configuration (bridges).";
      };
    };

    declarationText = mkOption {
      type = types.str;
      readOnly = true;
      internal = true;
      default = declarationText;
      description = "The rendered declaration file (`meshctl apply`), for tests and inspection.";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      inherit assertions;

      users.users.meshd = { isSystemUser = true; group = "meshd"; description = "meshd WireGuard mesh"; };
      users.groups.meshd = { };

      environment.systemPackages = [ cfg.package ];

      boot.kernelModules = optional (cfg.wireguard != "userspace") "wireguard";

      networking.firewall = mkIf cfg.openFirewall {
        allowedUDPPorts = [ listenPort ];
        allowedTCPPorts = optional isController listenPort
          ++ optionals (cfg.role == "relay" || builtins.elem hubName httpsRelays) [ cfg.acme.httpPort cfg.acme.httpsPort ];
      };

      systemd.services.meshd = {
        description = "meshd WireGuard mesh (${cfg.role})";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ optional isMember "meshd-join.service";
        after = [ "network-online.target" "nss-lookup.target" ] ++ optional isMember "meshd-join.service";
        path = [ pkgs.iproute2 pkgs.nftables ];
        environment.RUST_LOG = "info";
        startLimitIntervalSec = 0;
        serviceConfig = hardening // {
          Type = "notify";
          ExecStartPre = optional isController "${setup}" ++ [ "${check}" ];
          ExecStart = t.execLine ([ "${cfg.package}/bin/meshd" ] ++ runArgs);
          ExecStartPost = optional cfg.setHostResolver "+${resolver}";
          ExecStopPost = optional (cfg.setHostResolver && useResolvconf)
            "+${config.networking.resolvconf.package}/bin/resolvconf -f -d ${cfg.interface}";
          Restart = "on-failure";
          RestartSec = "5s";
          TimeoutStopSec = "30s";
          LimitNOFILE = 65536;
          AmbientCapabilities = [ "CAP_NET_ADMIN" "CAP_NET_BIND_SERVICE" ];
          CapabilityBoundingSet = [ "CAP_NET_ADMIN" "CAP_NET_BIND_SERVICE" ];
          # The embedded WireGuard (boringtun) opens the TUN device and keeps its UAPI socket in /run/wireguard;
          # /run/meshd holds the lock of the interface meshd runs.
          DeviceAllow = [ "/dev/net/tun rw" ];
          DevicePolicy = "closed";
          # /run/wireguard only for the embedded device: systemd makes it meshd's, so no other userspace WireGuard
          # (wireguard-go) may run on the host beside it.
          RuntimeDirectory = [ "meshd" ] ++ optional (cfg.wireguard == "userspace") "wireguard";
          RuntimeDirectoryMode = "0700";
        };
      };
    }

    (mkIf isMember {
      # The join, once: skipped (its condition) once the host has joined, so the spent token may be deleted. Until
      # it succeeds (a controller not reachable yet) it is tried again every 10 s, and meshd.service after it.
      systemd.services.meshd-join = {
        description = "meshd: join the network with the invite token in ${cfg.tokenFile}";
        wantedBy = [ "meshd.service" ];
        before = [ "meshd.service" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" "nss-lookup.target" ];
        startLimitIntervalSec = 0;
        unitConfig.ConditionPathExists = "!${stateDir}/member.json";
        serviceConfig = hardening // {
          Type = "oneshot";
          ExecStart = "${setup}";
          LoadCredential = "token:${cfg.tokenFile}";
          Restart = "on-failure";
          RestartSec = "10s";
        };
      };
    })

    (mkIf systemTor {
      services.tor.enable = true;
      services.tor.settings."%include" = "${torKeeperDir}/services.torrc";
      systemd.services.meshd-tor = {
        description = "meshd: hand this host's onion services to the system's tor";
        wantedBy = [ "tor.service" ];
        before = [ "tor.service" ];
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${torHandOver}";
          ExecStartPost = "${config.systemd.package}/bin/systemctl --no-block try-reload-or-restart tor.service";
        };
      };
      systemd.paths.meshd-tor = {
        wantedBy = [ "paths.target" ];
        pathConfig.PathChanged = "${stateDir}/tor/services.torrc";
      };
    })

    (mkIf isController {
      systemd.services.meshd-apply = {
        description = "meshd: make the network match services.meshd";
        wantedBy = [ "multi-user.target" ];
        # Once meshd is ready (Type=notify): the running meshd carries every change out at once (and hands out the
        # Tor client keys, which need it).
        requires = [ "meshd.service" ];
        after = [ "meshd.service" ];
        restartTriggers = [ declarationFile ];
        serviceConfig = hardening // {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${apply}";
          RestrictAddressFamilies = [ "AF_UNIX" ];
        };
      };
    })

  ]);
}
