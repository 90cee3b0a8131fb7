#!/usr/bin/env bash
# A private Docker engine for CI on a machine that runs none.
#
#   .ci/docker-engine.sh up     # prints `export DOCKER_HOST=...` for the engine it started, for eval
#   .ci/docker-engine.sh down   # stops what `up` started, and nothing else
#
# If an engine already answers `docker info`, `up` starts nothing and prints nothing: the tests use the
# user's engine. Otherwise it installs Debian's docker.io and debootstrap, starts dockerd by hand (no
# systemd) with its own data-root, exec-root, pidfile and socket, and seeds the base image
# debian:bookworm-slim from a debootstrap tarball, because no container registry may be reachable.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# Kept between runs (gitignored): the base tarball, and the engine's data-root with its build cache.
cache=${DOCKER_ENGINE_CACHE:-$root/.cache/docker-engine}
# Socket, pidfile and exec-root. Short and per checkout: a unix socket path may not exceed 107 bytes.
run=${DOCKER_ENGINE_RUN:-/tmp/resnet-docker-$(printf %s "$root" | cksum | cut -d' ' -f1)}
sock=$run/docker.sock
pidfile=$run/dockerd.pid
base_image=debian:bookworm-slim
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { echo "docker-engine: $*" >&2; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || { log "need root to install ${missing[*]}"; exit 1; }
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

start_dockerd() {
    local others
    others=$(pgrep -x dockerd | tr '\n' ' ' || true)
    if [[ -n $others ]]; then
        # Two daemons on one host would fight over the docker0 bridge and the DOCKER iptables chains.
        log "another dockerd runs here (pid $others) but does not answer docker info: point DOCKER_HOST at its socket"
        exit 1
    fi
    mkdir -p "$run" "$cache/data"
    log "starting dockerd on unix://$sock (log: $run/dockerd.log)"
    # Detached from our stdout: `up` runs inside $(...), which would otherwise wait for dockerd to exit.
    setsid dockerd --data-root "$cache/data" --exec-root "$run/exec" --pidfile "$pidfile" \
        -H "unix://$sock" </dev/null >"$run/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        docker -H "unix://$sock" info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log "dockerd did not answer within 30 s; the end of its log:"
    tail -20 "$run/dockerd.log" >&2
    exit 1
}

# What the official debian:bookworm-slim does beyond debootstrap (debuerreotype's --slimify): no docs,
# manuals or translations, now or from later apt installs; no package cache; the security archive.
slim_rootfs() {
    local dir=$1
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/*
    find "$dir"/usr/share/doc -mindepth 2 ! -name copyright -delete 2>/dev/null || true
    rm -rf "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/*
    cat >"$dir"/etc/dpkg/dpkg.cfg.d/docker-slim <<'EOT'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOT
    echo 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
        >"$dir"/etc/apt/apt.conf.d/docker-clean
    rm -f "$dir"/etc/apt/sources.list
    cat >"$dir"/etc/apt/sources.list.d/debian.sources <<EOT
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror}-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
}

seed_base_image() {
    local tarball=$cache/bookworm-minbase.tar
    # Rebuilt monthly, as the official image is, so that point releases and security fixes come in.
    if [[ -s $tarball ]] && [[ -z $(find "$tarball" -mtime +30) ]] \
        && docker -H "unix://$sock" image inspect "$base_image" >/dev/null 2>&1; then
        return 0
    fi
    if [[ ! -s $tarball ]] || [[ -n $(find "$tarball" -mtime +30) ]]; then
        local dir
        dir=$(mktemp -d "$cache/rootfs.XXXXXX")
        log "debootstrap --variant=minbase bookworm from $mirror (one to two minutes)"
        debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$run/debootstrap.log" 2>&1 || {
            tail -20 "$run/debootstrap.log" >&2
            rm -rf "$dir"
            exit 1
        }
        slim_rootfs "$dir"
        tar -C "$dir" -c . >"$tarball.part" && mv "$tarball.part" "$tarball"
        rm -rf "$dir"
    fi
    log "importing $tarball as $base_image"
    docker -H "unix://$sock" import --change 'CMD ["bash"]' - "$base_image" <"$tarball" >/dev/null
}

up() {
    if docker info >/dev/null 2>&1; then
        log "an engine already answers docker info: using it, starting nothing"
        return 0
    fi
    if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        log "reusing the engine this script started earlier (pid $(cat "$pidfile"))"
    else
        install_packages
        # Whatever fails from here on, leave no engine behind.
        trap down EXIT
        start_dockerd
    fi
    seed_base_image
    trap - EXIT
    echo "export DOCKER_HOST=unix://$sock"
}

down() {
    [[ -s $pidfile ]] || return 0
    local pid
    pid=$(cat "$pidfile")
    # Ours alone, so nothing a user runs: leave no container behind even if a test died mid-way.
    local ids
    ids=$(docker -H "unix://$sock" ps -aq 2>/dev/null || true)
    [[ -z $ids ]] || docker -H "unix://$sock" rm -f $ids >/dev/null 2>&1 || true
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "dockerd still runs after 30 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile" "$sock"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
