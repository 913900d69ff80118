#!/bin/sh
# nbdserve container entry point.
#
#   (no arguments)        serve the exports of $NBDSERVE_CONFIG on $NBDSERVE_BIND:$NBDSERVE_PORT
#   --max-connections 64 --log-format json -v ...
#                         the same, with these options added to `nbdserve serve`: server-wide
#                         ones (limits, --tls*, --metrics, logging) override the [server]
#                         table; per-export ones (--allow, -r, ...) are refused, as with any
#                         --config: set `allow`, `read_only`, ... on the export in the file
#   nbdserve img info /exports/vm1.qcow2, sh, ...
#                         run that command instead (a first argument not starting with "-")
#
# Environment (defaults suit the image; tests point them elsewhere):
#   NBDSERVE_CONFIG  configuration file   (/etc/nbdserve/exports.toml)
#   NBDSERVE_BIND    TCP address          (0.0.0.0: every interface of the container)
#   NBDSERVE_PORT    TCP port             (10809, the IANA NBD port)
#   NBDSERVE         the nbdserve program (nbdserve, from PATH)
#
# The checks here catch the usual mistake, a configuration that was not mounted, with a
# message saying what to do; nbdserve itself reports anything wrong inside the file.
set -eu

config="${NBDSERVE_CONFIG:-/etc/nbdserve/exports.toml}"
bind="${NBDSERVE_BIND:-0.0.0.0}"
port="${NBDSERVE_PORT:-10809}"
nbdserve="${NBDSERVE:-nbdserve}"

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

fail() {
    echo "nbdserve-entrypoint: $*" >&2
    exit 78  # EX_CONFIG
}

if [ -d "$config" ]; then
    fail "$config is a directory, not a configuration file (was the file missing on the host when it was mounted?)"
fi
if [ ! -e "$config" ]; then
    fail "no configuration at $config: mount one, e.g. -v \"\$PWD/exports.toml:$config:ro\" (see /etc/nbdserve/exports.example.toml)"
fi
if [ ! -r "$config" ]; then
    fail "$config is not readable by uid $(id -u): make it world-readable or mount it with a matching owner"
fi

exec "$nbdserve" serve --config "$config" --bind "$bind" --port "$port" "$@"
