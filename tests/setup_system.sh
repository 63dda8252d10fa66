#!/usr/bin/env bash
# What `make test` needs beyond pip, so that a fresh machine and CI take the same path:
#   - Debian's Chromium (the browser tests drive it through Playwright; no browser download) and
#     dicom3tools (`dciodvfy` validates the DICOM objects scoring writes), installed with apt-get
#     when running as root, else the command to run is named;
#   - the local PostgreSQL (127.0.0.1:5432, trust auth) running: started when it is down.
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "make test needs Debian's ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}', then make test again" >&2
    exit 1
  fi
  echo "installing ${missing[*]} (apt-get)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if ! command -v pg_isready >/dev/null; then
  echo "make test needs a local PostgreSQL on 127.0.0.1:5432 with trust auth for local connections" \
       "(Debian: 'apt-get install -y postgresql', then allow 'host all all 127.0.0.1/32 trust' in pg_hba.conf)" >&2
  exit 1
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting the local PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi
