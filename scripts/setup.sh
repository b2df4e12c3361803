#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine. Idempotent: each step
# checks first and does nothing when its tool is already there.
set -euo pipefail

# Root runs apt-get itself; anyone else needs sudo, or is told what to install.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "setup: '$*' needs root, and this user is not root and has no sudo; run this script" \
      "as root, or have an administrator install: ${need_apt[*]}" >&2
    exit 1
  fi
}

# The oldest Rust the workspace builds with (Cargo.toml's rust-version).
required_rust=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml" | head -1)
# Whether `cargo` on PATH is at least $required_rust.
cargo_recent_enough() {
  local have
  have=$(cargo --version 2>/dev/null | sed -n 's/^cargo \([0-9][0-9.]*\).*/\1/p')
  [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$required_rust" "$have" | sort -V | head -1)" = "$required_rust" ]
}

need_apt=()
command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || need_apt+=(build-essential)
# Plots are drawn with this font (src/plot.rs); the fuzz target's libFuzzer needs c++.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# The model tooling runs in a venv; Debian's python3 ships venv/ensurepip separately.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# rust-toolchain.toml pins the release the tests pass with. Every cargo call inside the
# repository goes to that toolchain, so it must be there before the first one (even
# `cargo --version`, which would otherwise try to download it): installed with rustup, or,
# where toolchains cannot be downloaded and the installed stable is that very release, the
# stable one under the pinned name.
ensure_pinned_toolchain() {
  command -v rustup >/dev/null 2>&1 || return 0
  local pinned host stable_version toolchains
  pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$(dirname "$0")/../rust-toolchain.toml")
  [ -n "$pinned" ] || return 0
  RUSTUP_AUTO_INSTALL=0 rustup toolchain list | grep -q "^$pinned-" && return 0
  host=$(RUSTUP_TOOLCHAIN=stable rustc -vV 2>/dev/null | sed -n 's/^host: //p') || true
  stable_version=$(RUSTUP_TOOLCHAIN=stable rustc --version 2>/dev/null | cut -d' ' -f2) || true
  toolchains="${RUSTUP_HOME:-$HOME/.rustup}/toolchains"
  if [ "$stable_version" = "$pinned" ] && [ -d "$toolchains/stable-$host" ]; then
    echo "setup: using the installed stable ($stable_version) as the pinned $pinned"
    ln -s "stable-$host" "$toolchains/$pinned-$host"
  else
    echo "setup: installing Rust $pinned (rust-toolchain.toml) with rustup"
    rustup toolchain install "$pinned" --profile minimal --component rustfmt,clippy || {
      echo "setup: could not install Rust $pinned; install it (rustup toolchain install" \
        "$pinned) or, to build with another release at your own risk, set" \
        "RUSTUP_TOOLCHAIN=stable" >&2
      exit 1
    }
  fi
}

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
ensure_pinned_toolchain
if command -v cargo >/dev/null 2>&1 && ! cargo_recent_enough; then
  if command -v rustup >/dev/null 2>&1; then
    echo "setup: $(cargo --version) is older than Rust $required_rust; updating stable with rustup"
    rustup update stable && rustup default stable
  else
    # A distribution's cargo (Debian's apt package, say): rustup's goes first on PATH.
    echo "setup: $(cargo --version) (from $(command -v cargo)) is older than Rust $required_rust;" \
      "installing rustup's stable in ~/.cargo, ahead of it on PATH"
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! cargo_recent_enough; then
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
        --component rustfmt,clippy --no-modify-path || {
        echo "setup: rustup could not be fetched; install Rust >= $required_rust and retry" >&2
        exit 1
      }
    fi
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found; installing stable with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
    --component rustfmt,clippy || {
    echo "setup: rustup could not be fetched; install Rust >= $required_rust (edition 2024) and retry" >&2
    exit 1
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
ensure_pinned_toolchain
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" ||
      rustup component add "$component" || echo "setup: could not add $component" >&2
  done
fi
echo "setup: $(cargo --version)"
