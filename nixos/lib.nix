# Pure helpers of the meshd NixOS module: the option types that check a value the way meshd does (so a bad
# one is refused at evaluation time, naming the option), and the rendering of the declaration file that
# `meshctl apply` takes (docs/CLI.md, "Declaration files"). Nothing here needs pkgs.
{ lib }:
let
  inherit (lib) types;
  inherit (builtins) match elemAt all length stringLength fromJSON concatStringsSep;

  # A decimal of 1 to 5 digits without a leading zero, as a number (for the port and octet checks).
  number = s: if match "0|[1-9][0-9]{0,4}" s == null then null else fromJSON s;
  between = lo: hi: s: let n = number s; in n != null && n >= lo && n <= hi;

  isLabel = s: match "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?" s != null;
  isDomain = s: stringLength s <= 253 && all isLabel (lib.splitString "." s);
  isIPv4 = s:
    let m = match "([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})" s;
    in m != null && all (between 0 255) m;
  # IPv6 as RFC 4291 section 2.2 writes it: eight groups of 1-4 hex digits, or fewer around one `::`, the last two
  # optionally as a dotted IPv4 address.
  isIPv6 = s:
    let
      isGroup = g: match "[0-9A-Fa-f]{1,4}" g != null;
      # The groups of one side of `::` (or of the whole address): how many 16-bit groups it holds, or null.
      side = part: last:
        if part == "" then 0
        else
          let groups = lib.splitString ":" part;
          in if !(all isGroup (lib.init groups)) then null
          else if isGroup (lib.last groups) then length groups
          else if last && isIPv4 (lib.last groups) then length groups + 1
          else null;
      halves = lib.splitString "::" s;
      left = side (elemAt halves 0) false;
      right = side (elemAt halves 1) true;
      whole = side s true;
    in
    if length halves == 1 then whole == 8
    else length halves == 2 && left != null && right != null && left + right <= 7;
  isHostPort = s:
    let m = match "([[]([0-9A-Fa-f:.]+)[]]|([^:]+)):([0-9]+)" s;
    in m != null && between 1 65535 (elemAt m 3)
      && (if elemAt m 1 != null then isIPv6 (elemAt m 1) else isIPv4 (elemAt m 2) || isDomain (elemAt m 2));
  isCidr = s:
    let
      m = match "(([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3}))/([0-9]{1,2})" s;
      octets = map fromJSON (lib.sublist 1 4 m);
      value = builtins.foldl' (acc: o: acc * 256 + o) 0 octets;
      hostBits = builtins.foldl' (acc: _: acc * 2) 1 (lib.range 1 (32 - fromJSON (elemAt m 5)));
    in
    m != null && isIPv4 (elemAt m 0) && between 8 30 (elemAt m 5)
    # The network's own address: no host bits set (meshd refuses 10.77.0.1/16).
    && lib.mod value hostBits == 0;
  isInterface = s: match "[A-Za-z0-9_.-]{1,15}" s != null && s != "." && s != "..";
  isDuration = s: match "[1-9][0-9]*(s|m|h|d)" s != null;
  # Letters, digits and ._-+@ between slashes: nothing a unit file, systemd's specifiers (%) or a shell would read
  # as more than a path (sops-nix's /run/secrets/NAME and agenix's /run/agenix/NAME are such paths).
  isStatePath = s: match "(/[A-Za-z0-9._+@-]+)+" s != null && match "/nix/store(/.*)?" s == null
    && match ".*/\\.\\.?(/.*)?" s == null;
in
rec {
  # The option types. Each names what it wants in its description, which the evaluation error quotes.
  label = types.addCheck types.str isLabel // {
    name = "meshdLabel";
    description = "DNS label (1-63 letters, digits and '-', not starting or ending with '-')";
  };
  domain = types.addCheck types.str isDomain // {
    name = "meshdDomain";
    description = "DNS name (labels of letters, digits and '-' joined by '.', at most 253 characters)";
  };
  hostPort = types.addCheck types.str isHostPort // {
    name = "meshdHostPort";
    description = "HOST:PORT (an IPv4 address, [IPv6] or DNS name, and a port 1-65535)";
  };
  cidr = types.addCheck types.str isCidr // {
    name = "meshdCidr";
    description = "IPv4 network in CIDR notation, prefix /8 to /30, no host bits set (e.g. \"10.77.0.0/16\")";
  };
  ipAddress = types.addCheck types.str (s: isIPv4 s || isIPv6 s) // {
    name = "meshdIpAddress";
    description = "IPv4 or IPv6 address";
  };
  interface = types.addCheck types.str isInterface // {
    name = "meshdInterface";
    description = "network interface name (1-15 letters, digits, '-', '_' or '.')";
  };
  port = types.ints.between 1 65535;
  mtu = types.ints.between 1280 9000;
  duration = types.addCheck types.str isDuration // {
    name = "meshdDuration";
    description = "duration such as \"30m\", \"24h\" or \"7d\"";
  };
  # A secret's path: read on the host at run time, so it never enters the Nix store (a Nix path value such as
  # ./token would be copied there, so only a string is taken).
  secretPath = types.addCheck types.str isStatePath // {
    name = "meshdSecretPath";
    description = "absolute path (a string) outside the Nix store, of letters, digits and ._-+@, e.g. \"/run/secrets/meshd-token\"";
  };

  # One argument of a unit's Exec*= line, as systemd reads it (systemd.service(5), "Command lines"): double-quoted
  # with C escapes (a JSON string is one), `%` and `$` doubled so that no specifier or variable is expanded.
  escapeExecArg = s: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s);
  execLine = args: concatStringsSep " " (map escapeExecArg args);

  # Exposed for the module's own checks of attribute names (option types do not see attribute names).
  inherit isLabel isCidr;

  # TOML (v1.0.0) text of a declaration. Strings are written as JSON strings, which are TOML basic strings
  # (TOML section 'String': the same escapes, \uXXXX included).
  toml = rec {
    str = builtins.toJSON;
    value = v:
      if builtins.isString v then str v
      else if builtins.isBool v then lib.boolToString v
      else if builtins.isInt v then toString v
      else if builtins.isList v then "[" + concatStringsSep ", " (map value v) + "]"
      else if builtins.isAttrs v then
        "{ " + concatStringsSep ", " (lib.mapAttrsToList (k: x: "${k} = ${value x}") v) + " }"
      else throw "meshd: cannot write ${builtins.typeOf v} as TOML";
    # One `[[KIND]]` table per entry; attributes whose value is null are left out.
    tables = kind: entries:
      concatStringsSep "\n" (map (e:
        "[[${kind}]]\n" + concatStringsSep "" (lib.mapAttrsToList (k: v: "${k} = ${value v}\n")
          (lib.filterAttrs (_: v: v != null) e))) entries);
  };
}
