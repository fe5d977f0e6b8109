#!/bin/sh
# The container's entry command (docker/Dockerfile): `vla-foundry serve` on VLA_HOST:VLA_PORT.
#
# - serves VLA_CONFIG when set (an operator's explicit choice wins), else the deployment YAML at
#   $VLA_DEPLOY_FILE (default /config/deploy.yaml) when that file exists, else the demo pack from
#   $VLA_DEMO_DIR (built first if missing);
# - binds VLA_HOST (default 0.0.0.0: inside a container only; the CLI's own default is 127.0.0.1)
#   and VLA_PORT (default 8000), passed as --host/--port so that they win over a host or port
#   written in the deployment YAML;
# - arguments are appended to `vla-foundry serve` (`--checkpoint /checkpoints/x`, `--dtype bfloat16`),
#   except `--host` and `--port`, refused: the image's healthcheck probes
#   VLA_PORT on 127.0.0.1, so a port or address given otherwise left the container unhealthy while it
#   served (set VLA_PORT, and VLA_HOST to an address that includes 127.0.0.1); a first argument that is
#   not an option is run as a command instead
#   (`docker run IMAGE vla-foundry demo`, `docker run -it IMAGE sh`);
# - `exec`s the server, so it gets the container's signals (SIGTERM, SIGINT) itself;
# - VLA_ENTRYPOINT_DRY_RUN=1 prints the command, one argument a line, instead of running it.
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

for argument in "$@"; do
    case "$argument" in
        --host|--host=*|--port|--port=*)  # (the CLI takes no abbreviation of an option)
            echo "vla-foundry-entrypoint: ${argument%%=*} is not taken as an argument here; set VLA_PORT or" \
                 "VLA_HOST instead (the image's healthcheck probes VLA_PORT on 127.0.0.1, which VLA_HOST must" \
                 "include: 0.0.0.0, the default)" >&2
            exit 2 ;;
    esac
done

deploy_file="${VLA_DEPLOY_FILE:-/config/deploy.yaml}"
host="${VLA_HOST:-0.0.0.0}"
port="${VLA_PORT:-8000}"

if [ -n "${VLA_CONFIG:-}" ]; then
    echo "vla-foundry-entrypoint: serving VLA_CONFIG=$VLA_CONFIG" >&2
elif [ -f "$deploy_file" ]; then
    echo "vla-foundry-entrypoint: serving the deployments in $deploy_file" >&2
    set -- --config "$deploy_file" "$@"
else
    echo "vla-foundry-entrypoint: no $deploy_file; serving the demo pack from" \
         "${VLA_DEMO_DIR:-the default demo dir} (built first if missing) unless a --checkpoint is given" >&2
fi
set -- vla-foundry serve --host "$host" --port "$port" "$@"

if [ "${VLA_ENTRYPOINT_DRY_RUN:-0}" = "1" ]; then
    printf '%s\n' "$@"
    exit 0
fi
exec "$@"
