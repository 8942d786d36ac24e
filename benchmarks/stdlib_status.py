"""The published ``sora2_generate.py status`` reduced to its core: one POST, one JSON line.

The baseline of ``benchmarks/cli_status.py``: what a status check costs with
the standard library and nothing else (no retries, no checks), run with the
same interpreter as ``sora2``. It imports nothing from this project.

Usage: ``python benchmarks/stdlib_status.py TASK_ID`` (NANOPHOTO_BASE_URL and
NANOPHOTO_API_KEY from the environment).
"""

import json
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    """Print ``{"stage": "status", "response": ...}`` for the task in argv[1]."""
    base = os.environ.get("NANOPHOTO_BASE_URL", "https://nanophoto.ai").rstrip("/")
    request = urllib.request.Request(
        f"{base}/api/sora-2/check-status",
        data=json.dumps({"taskId": sys.argv[1]}).encode(),
        headers={
            "Authorization": f"Bearer {os.environ['NANOPHOTO_API_KEY']}",
            "Content-Type": "application/json",
            "User-Agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/133.0.0.0 Safari/537.36",
            "Accept": "application/json, text/plain, */*",
            "Origin": "https://nanophoto.ai",
            "Referer": "https://nanophoto.ai/",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            document = json.load(answer)
    except urllib.error.HTTPError as error:
        document = json.load(error)
    print(json.dumps({"stage": "status", "response": document}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
