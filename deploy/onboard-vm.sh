#!/bin/sh
# Onboard a VM service into the mesh: install meshd's package, write the sidecar's bootstrap and
# token, enable its systemd units. Run as root on the VM. Re-running it upgrades in place
# (new package, new bootstrap; the systemd sockets stay open across the restart).
#
#   deploy/onboard-vm.sh --name svcb --meshd https://10.0.0.10:15010 --token-file ./svcb.token \
#       --app-port 8080 --advertise 10.0.0.12 --labels version=v1,zone=a \
#       --wheels ./wheels --ca-file ./meshd-ca.pem
#
# Writes (and nothing else):
#   /opt/meshd                         venv with meshd (from --wheels DIR offline, or --package SPEC)
#   /etc/systemd/system/meshd.service, mesh-sidecar@.service, mesh-sidecar@.socket
#   /etc/meshd/sidecar-NAME.toml       bootstrap, 0644 (no secret in it)
#   /etc/meshd/sidecar-NAME.token      join token, 0600, owned by mesh-proxy (the sidecar's user)
#   /etc/meshd/meshd-ca.pem            CA of meshd's HTTPS API (--ca-file), 0644
#   /etc/systemd/system/mesh-sidecar@NAME.socket.d/ports.conf   listening addresses
# The certificate, key and last snapshot live in /var/lib/mesh-sidecar/NAME (the unit's
# StateDirectory): after a reboot the sidecar serves with them, and renews by proof of its key.
# Exit codes: 0 ready, 2 usage, 1 a step failed (the message names it).
set -eu

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --name NAME            service name (and unit instance)                          [required]
  --meshd URL            meshd's address, http(s)://host:15010                     [required]
  --token TOKEN | --token-file FILE   join token from `meshd token create --service NAME`
                         (required the first time; kept when omitted on a re-run)
  --app-port PORT        the local app's port                                      [required]
  --advertise ADDR       this VM's address as other sidecars reach it   [default: first IP]
  --labels K=V,K=V       instance labels (e.g. version=v1)
  --instance-id ID       unique instance id                          [default: NAME-hostname]
  --inbound-port P       mesh traffic in                                     [default: 15006]
  --outbound-port P      the app's HTTP_PROXY port (loopback)                [default: 15001]
  --admin-port P         admin /ready /metrics (loopback)                    [default: 15000]
  --mtls-mode MODE       STRICT | PERMISSIVE | DISABLE                      [default: STRICT]
  --ca-file FILE         CA of meshd's HTTPS API (for an https --meshd)
  --wheels DIR           install offline from these wheels (pip --no-index)
  --package SPEC         or install SPEC from the package index          [default: meshd]
  --units DIR            unit files to install         [default: ../systemd next to this script]
  --no-start             write everything, enable, but do not start
  --install-only         only install the package, the user and the unit files (e.g. while
                         the VM image is prepared; --name, --meshd, --app-port not needed)
EOF
}

die() { echo "onboard-vm: $*" >&2; exit 1; }
NAME="" MESHD="" TOKEN="" TOKEN_FILE="" APP_PORT="" ADVERTISE="" LABELS="" INSTANCE=""
IN_PORT=15006 OUT_PORT=15001 ADMIN_PORT=15000 MTLS=STRICT CA_FILE="" WHEELS="" PACKAGE=meshd
UNITS="$(cd "$(dirname "$0")/.." && pwd)/systemd" START=1 INSTALL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --meshd) MESHD=$2; shift 2 ;;
    --token) TOKEN=$2; shift 2 ;;
    --token-file) TOKEN_FILE=$2; shift 2 ;;
    --app-port) APP_PORT=$2; shift 2 ;;
    --advertise) ADVERTISE=$2; shift 2 ;;
    --labels) LABELS=$2; shift 2 ;;
    --instance-id) INSTANCE=$2; shift 2 ;;
    --inbound-port) IN_PORT=$2; shift 2 ;;
    --outbound-port) OUT_PORT=$2; shift 2 ;;
    --admin-port) ADMIN_PORT=$2; shift 2 ;;
    --mtls-mode) MTLS=$2; shift 2 ;;
    --ca-file) CA_FILE=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --package) PACKAGE=$2; shift 2 ;;
    --units) UNITS=$2; shift 2 ;;
    --no-start) START=0; shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "onboard-vm: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ "$INSTALL_ONLY" = 1 ]; then
  NAME=install-only MESHD=http://unused APP_PORT=1 ADVERTISE=unused
elif [ -z "$NAME" ] || [ -z "$MESHD" ] || [ -z "$APP_PORT" ]; then
  usage >&2; exit 2
fi
echo "$NAME" | grep -Eq '^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$' || { echo "onboard-vm: --name must be a lower-case DNS name" >&2; exit 2; }
case "$MESHD" in http://*|https://*) ;; *) echo "onboard-vm: --meshd must start with http:// or https://" >&2; exit 2 ;; esac
case "$MTLS" in STRICT|PERMISSIVE|DISABLE) ;; *) echo "onboard-vm: --mtls-mode STRICT|PERMISSIVE|DISABLE" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || die "run as root"
[ -f "$UNITS/mesh-sidecar@.service" ] || die "unit files not found in $UNITS (--units DIR)"

ETC=/etc/meshd
CONF=$ETC/sidecar-$NAME.toml
TOKEN_PATH=$ETC/sidecar-$NAME.token
[ -n "$INSTANCE" ] || INSTANCE="$NAME-$(hostname)"
[ -n "$ADVERTISE" ] || ADVERTISE=$(hostname -I 2>/dev/null | awk '{print $1}')
[ -n "$ADVERTISE" ] || die "cannot find this VM's address: pass --advertise"

# 1. the package, in a venv at /opt/meshd (the path the units use)
echo "onboard-vm: installing meshd into /opt/meshd"
[ -x /opt/meshd/bin/python ] || python3 -m venv /opt/meshd || die "python3 -m venv failed (apt-get install python3-venv)"
if [ -n "$WHEELS" ]; then
  /opt/meshd/bin/pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" --upgrade meshd \
    || die "pip install from $WHEELS failed"
else
  /opt/meshd/bin/pip install -q --disable-pip-version-check --upgrade "$PACKAGE" || die "pip install $PACKAGE failed"
fi
/opt/meshd/bin/mesh-sidecar --help >/dev/null || die "mesh-sidecar does not run"

# 2. the sidecar's user (fixed uid 1337 when free: a future iptables mode exempts it by uid)
if ! getent group mesh-proxy >/dev/null; then
  if getent group 1337 >/dev/null; then groupadd --system mesh-proxy; else groupadd --system --gid 1337 mesh-proxy; fi
fi
if ! getent passwd mesh-proxy >/dev/null; then
  uid_opt="--uid 1337"; if getent passwd 1337 >/dev/null; then uid_opt=""; fi
  # shellcheck disable=SC2086
  useradd --system $uid_opt --gid mesh-proxy --home-dir /var/lib/mesh-sidecar --no-create-home \
    --shell /usr/sbin/nologin mesh-proxy
fi

# 3. units
install -m 0644 "$UNITS/meshd.service" "$UNITS/mesh-sidecar@.service" "$UNITS/mesh-sidecar@.socket" /etc/systemd/system/
if [ "$INSTALL_ONLY" = 1 ]; then systemctl daemon-reload; echo "onboard-vm: package, user and units installed"; exit 0; fi
DROPIN=/etc/systemd/system/mesh-sidecar@$NAME.socket.d/ports.conf
install -d -m 0755 "$(dirname "$DROPIN")"
cat > "$DROPIN.tmp" <<EOF
# written by deploy/onboard-vm.sh: the ports of /etc/meshd/sidecar-$NAME.toml
[Socket]
ListenStream=
ListenStream=0.0.0.0:$IN_PORT
ListenStream=127.0.0.1:$OUT_PORT
EOF
PORTS_CHANGED=0
cmp -s "$DROPIN.tmp" "$DROPIN" || PORTS_CHANGED=1
mv "$DROPIN.tmp" "$DROPIN"

# 4. bootstrap, token, CA
install -d -m 0755 "$ETC"
if [ -n "$TOKEN_FILE" ]; then TOKEN=$(cat "$TOKEN_FILE") || die "cannot read $TOKEN_FILE"; fi
if [ -n "$TOKEN" ]; then
  (umask 077; printf '%s\n' "$TOKEN" > "$TOKEN_PATH.tmp"); mv "$TOKEN_PATH.tmp" "$TOKEN_PATH"
elif [ ! -s "$TOKEN_PATH" ]; then
  die "no join token: pass --token or --token-file (meshd token create --service $NAME)"
fi
chown mesh-proxy:mesh-proxy "$TOKEN_PATH"; chmod 0600 "$TOKEN_PATH"
CA_LINE=""
if [ -n "$CA_FILE" ]; then
  install -m 0644 "$CA_FILE" "$ETC/meshd-ca.pem"
  CA_LINE="meshd_ca_file = \"$ETC/meshd-ca.pem\""
fi
LABELS_TOML=$(printf '%s' "$LABELS" | awk -F, '{for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] != "") printf "%s%s = \"%s\"", (n++ ? ", " : ""), kv[1], kv[2] }}')
cat > "$CONF.tmp" <<EOF
# written by deploy/onboard-vm.sh for mesh-sidecar@$NAME; fields: docs/sidecar.md
service = "$NAME"
instance_id = "$INSTANCE"
labels = { $LABELS_TOML }
app_address = "127.0.0.1"
app_port = $APP_PORT
inbound_address = "0.0.0.0"
inbound_port = $IN_PORT
outbound_address = "127.0.0.1"
outbound_port = $OUT_PORT
admin_address = "127.0.0.1"
admin_port = $ADMIN_PORT
advertise_address = "$ADVERTISE"
meshd_addr = "$MESHD"
$CA_LINE
# the join token: a 0600 file (never in this world-readable bootstrap)
token_file = "$TOKEN_PATH"
mtls_mode = "$MTLS"
data_dir = "/var/lib/mesh-sidecar/$NAME"
ttl = 10.0
drain_seconds = 5.0
EOF
chmod 0644 "$CONF.tmp"; mv "$CONF.tmp" "$CONF"
/opt/meshd/bin/python -c "import sys; from sidecar.bootstrap import load; load(sys.argv[1], env={})" "$CONF" \
  || die "the bootstrap $CONF does not validate"

# 5. enable (and start, or restart on a re-run: the socket stays open, nothing is refused)
systemctl daemon-reload
systemctl enable "mesh-sidecar@$NAME.socket" "mesh-sidecar@$NAME.service" >/dev/null 2>&1 \
  || die "systemctl enable failed"
[ "$START" = 1 ] || { echo "onboard-vm: $NAME enabled (not started)"; exit 0; }
# the socket is restarted only when its ports changed: that would refuse connections for a moment
if [ "$PORTS_CHANGED" = 1 ]; then systemctl restart "mesh-sidecar@$NAME.socket"; else systemctl start "mesh-sidecar@$NAME.socket"; fi
if systemctl is-active --quiet "mesh-sidecar@$NAME.service"; then
  systemctl restart "mesh-sidecar@$NAME.service"   # Type=notify: returns once READY=1
else
  systemctl start "mesh-sidecar@$NAME.service"
fi || { journalctl -u "mesh-sidecar@$NAME" -n 30 --no-pager >&2 || true; die "mesh-sidecar@$NAME did not start"; }
/opt/meshd/bin/mesh-sidecar ready --admin "127.0.0.1:$ADMIN_PORT" || die "mesh-sidecar@$NAME is not ready"
echo "onboard-vm: mesh-sidecar@$NAME ready: $INSTANCE at $ADVERTISE:$IN_PORT -> app 127.0.0.1:$APP_PORT"
echo "onboard-vm: point the app at its sidecar: HTTP_PROXY=http://127.0.0.1:$OUT_PORT"
