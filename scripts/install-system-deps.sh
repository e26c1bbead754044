#!/usr/bin/env bash
# Debian packages the tests and benchmarks use: espeak-ng (speaks test audio), sox (converts it),
# npm (installs the pinned buf binary for the contract checks), chromium and chromium-driver (the
# web page's browser tests drive the system browser; nothing is downloaded at run time), prometheus
# (its promtool checks and unit-tests the alert rules; the Prometheus server the package also ships
# is stopped and disabled).
# Installs only what is missing; uses sudo when not root.
set -euo pipefail
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox libsox-fmt-all)
command -v npm >/dev/null || need+=(npm)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  # Only promtool is wanted: do not leave a Prometheus server running (and holding port 9090).
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
