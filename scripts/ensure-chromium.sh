#!/usr/bin/env sh
# The report's screenshot test opens report.html in headless Chromium. Install Debian's chromium when it is
# missing and this machine can (root with apt-get); otherwise say the test will be skipped. Never fails.
command -v chromium >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium for the report screenshot test (Debian package)..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "could not install chromium: the report screenshot test will be skipped"
else
    echo "chromium not found: the report screenshot test will be skipped"
fi
exit 0
