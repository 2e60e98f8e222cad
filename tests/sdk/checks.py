"""Bookkeeping shared by the Python SDK scripts: named checks, image decoding, URL fetches."""

import base64
import io
import os
import sys
import time
import traceback
import urllib.request


def base_url(cli_value):
    url = cli_value or os.environ.get("SD_SERVE_URL") or "http://127.0.0.1:7860"
    return url.rstrip("/")


def api_key(cli_value):
    return cli_value if cli_value is not None else os.environ.get("SD_SERVE_KEY", "")


class Checks:
    """Runs named checks, keeps going after a failure, prints one summary line at the end."""

    def __init__(self, name):
        self.name = name
        self.passed = []
        self.failed = []
        self.started = time.monotonic()

    def _record(self, label, err):
        if err is None:
            self.passed.append(label)
            print(f"  ok   {label}", flush=True)
        else:
            self.failed.append(label)
            print(f"  FAIL {label}: {err}", flush=True)

    def run(self, label, fn, *args):
        """Calls fn(*args); an exception fails the check. Returns fn's value or None."""
        t0 = time.monotonic()
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
            self._record(label, describe(e))
            if os.environ.get("SD_SERVE_SDK_TRACE"):
                traceback.print_exc()
            return None
        self._record(f"{label} ({time.monotonic() - t0:.1f}s)", None)
        return value

    async def arun(self, label, coro_fn, *args):
        t0 = time.monotonic()
        try:
            value = await coro_fn(*args)
        except Exception as e:  # noqa: BLE001
            self._record(label, describe(e))
            if os.environ.get("SD_SERVE_SDK_TRACE"):
                traceback.print_exc()
            return None
        self._record(f"{label} ({time.monotonic() - t0:.1f}s)", None)
        return value

    def finish(self):
        total = len(self.passed) + len(self.failed)
        secs = time.monotonic() - self.started
        if self.failed:
            print(f"{self.name}: FAIL {len(self.passed)}/{total} checks passed in {secs:.0f}s; "
                  f"failed: {', '.join(self.failed)}", flush=True)
            sys.exit(1)
        print(f"{self.name}: PASS {total}/{total} checks in {secs:.0f}s", flush=True)
        sys.exit(0)


def describe(e):
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 600 else text[:600] + "..."


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def fetch_bytes(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        expect(resp.status == 200, f"GET {url}: HTTP {resp.status}")
        return resp.read()


def decode_image(data):
    """Bytes of a PNG/JPEG/WebP -> (format, (width, height)). Pillow does the decoding."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.format, img.size


def image_bytes_from(value, timeout=30):
    """An image as an API returns it: URL, data URI or bare base64 -> bytes."""
    expect(isinstance(value, str) and value, f"not an image reference: {value!r}")
    if value.startswith(("http://", "https://")):
        return fetch_bytes(value, timeout)
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        expect(header.endswith(";base64"), f"data URI is not base64: {header}")
        return base64.b64decode(payload, validate=True)
    return base64.b64decode(value, validate=True)


def png_bytes(width, height, seed=0):
    """A small deterministic RGB test picture as PNG bytes."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = ((x * 4 + seed) % 256, (y * 4) % 256, ((x + y) * 2) % 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
