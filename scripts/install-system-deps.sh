#!/usr/bin/env bash
# Installs the real protocol peers the integration tests start on 127.0.0.1: Kamailio (SIP
# registrar, with its TLS module), SIPp (sip-tester), nginx, and Node.js (its http2 module is the
# HTTP/2 server that refuses streams in tests/http2/test_node.py), and redis-server (the fleet
# quota backend in tests/fleet). Idempotent: does nothing when
# they are present.
# Services are NOT started by the packages (policy-rc.d); the tests start their own instances.
set -euo pipefail
missing=()
command -v kamailio >/dev/null 2>&1 || [ -x /usr/sbin/kamailio ] || missing+=(kamailio)
# Kamailio's TLS module (tls.so), for the SIP-over-TLS tests; a separate Debian package.
compgen -G '/usr/lib*/**/kamailio/modules/tls.so' >/dev/null \
  || compgen -G '/usr/lib/*/kamailio/modules/tls.so' >/dev/null || missing+=(kamailio-tls-modules)
command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: no apt-get; install ${missing[*]} yourself (tests needing them skip)" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-system-deps: installing ${missing[*]}"
policy=/usr/sbin/policy-rc.d
had_policy=0; [ -e "$policy" ] && had_policy=1
if [ $had_policy -eq 0 ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy"
fi
trap '[ $had_policy -eq 0 ] && $SUDO rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
