#!/usr/bin/env bash
# Fashion-MNIST for `--source fashion-mnist` and tests/test_fashion_mnist.py: Debian's package
# dataset-fashion-mnist (31 MB, the four idx files in /usr/share/datasets/fashion-mnist).
# Installs it when running as root with apt-get; otherwise says how, and those tests skip.
if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Fashion-MNIST (Debian's dataset-fashion-mnist)..."
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; }
else
  echo "note: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist); its tests will skip"
fi
