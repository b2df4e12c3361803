#!/usr/bin/env bash
# Puts Fashion-MNIST (Debian package dataset-fashion-mnist) under data/fashion-mnist/ without
# root: `apt-get download` fetches the .deb, `dpkg -x` unpacks it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=data/fashion-mnist
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
have_all() { for f in "${files[@]}"; do [ -s "$dest/$f" ] || return 1; done; }
if have_all; then
  echo "fashion-mnist: already in $dest"
  exit 0
fi
# A machine with the package installed already has the files.
if [ -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p "$dest"
  for f in "${files[@]}"; do cp /usr/share/datasets/fashion-mnist/"$f" "$dest/"; done
  have_all && { echo "fashion-mnist: copied from /usr/share/datasets"; exit 0; }
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download dataset-fashion-mnist >/dev/null 2>&1) || {
  # A fresh machine may have empty package lists; refreshing them needs root.
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; elif command -v sudo >/dev/null; then sudo apt-get update -qq; fi
  (cd "$work" && apt-get download dataset-fashion-mnist)
}
dpkg -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
src=$(dirname "$(find "$work/root" -name train-images-idx3-ubyte.gz | head -n 1)")
mkdir -p "$dest"
for f in "${files[@]}"; do
  [ -s "$src/$f" ] || { echo "fashion-mnist: $f missing from the package" >&2; exit 1; }
  cp "$src/$f" "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"
done
echo "fashion-mnist: unpacked into $dest"
