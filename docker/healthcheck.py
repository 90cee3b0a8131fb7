"""Container health probe: exit 0 only while the service reports ready (the slim image has no curl)."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('RESNET_PORT', '8000')}/health/ready"
# No proxy: an HTTP_PROXY in the container's environment must not route a loopback probe.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as e:  # URLError and HTTPError (503 while loading) are OSErrors
    print(f"not ready: {e}", file=sys.stderr)
    sys.exit(1)
