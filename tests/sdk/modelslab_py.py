#!/usr/bin/env python3
"""End-to-end checks of sd-serve's ModelsLab dialect through ModelsLab's Python SDK (`modelslab_py`).

Usage: modelslab_py.py [--url http://127.0.0.1:PORT] [--key KEY] [--processing-url URL]
       (or SD_SERVE_URL / SD_SERVE_KEY / SD_SERVE_URL_PROCESSING in the environment).
--url: a server that answers within its ModelsLab wait (the default 30 s is plenty for the tiny
model): requests end in status "success" (a "processing" answer is fetched until it succeeds).
--processing-url: optional, a server started with `[modelslab] wait_secs = 0.0`, whose first answer
must be status "processing"; the job is then fetched with the SDK's fetch().
Exits 0 when every check passed, 1 otherwise; the last line is a one-line summary.
"""

import argparse
import base64
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)  # pydantic v1-style calls in the SDK

# This file shares the SDK's name: keep its folder off the path while the SDK is imported.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
from modelslab_py.core.apis.community import Community  # noqa: E402
from modelslab_py.core.client import Client  # noqa: E402
from modelslab_py.schemas.community import Image2Image, Inpainting, Text2Image  # noqa: E402

sys.path.insert(0, HERE)
from checks import (  # noqa: E402
    Checks,
    api_key,
    base_url,
    decode_image,
    expect,
    image_bytes_from,
    png_bytes,
)

MODEL = "tiny-sd15"
PROMPT = "a red apple on a wooden table"
SEED = 1234
SIDE = 64


def community(base, key, fetch_retry=60, fetch_timeout=1):
    client = Client(api_key=key, fetch_retry=fetch_retry, fetch_timeout=fetch_timeout)
    # The SDK joins paths with `+`: the base must end in "/api/", and be set before Community().
    client.base_url = base + "/api/"
    return Community(client)


def check_outputs(resp, count, side=SIDE):
    expect(isinstance(resp, dict), f"response is not a JSON object: {resp!r}")
    expect(resp.get("status") == "success", f"status {resp.get('status')!r}: {short(resp)}")
    output = resp.get("output")
    expect(isinstance(output, list) and len(output) == count, f"expected {count} outputs: {short(resp)}")
    images = []
    for item in output:
        data = image_bytes_from(item)
        try:
            fmt, size = decode_image(data)
        except Exception:  # noqa: BLE001 - with base64 "yes" a link may serve base64 text
            data = base64.b64decode(data.strip(), validate=True)
            fmt, size = decode_image(data)
        expect(size == (side, side), f"expected {side}x{side}, got {size[0]}x{size[1]} ({fmt})")
        images.append(data)
    return images


def refusal(e):
    """The SDK raises `Exception("Request failed with status code N: BODY")` on a non-200 answer.
    Returns BODY as a ModelsLab error object; anything else fails the check."""
    text = str(e)
    head, sep, body = text.partition(": ")
    expect(sep and head.startswith("Request failed with status code"), f"unexpected failure: {text}")
    try:
        obj = json.loads(body)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {text}") from None
    expect(isinstance(obj, dict) and obj.get("status") == "error",
           f"not a ModelsLab error (status: error): {text}")
    return obj


def error_text(obj):
    return f"{obj.get('message', '')} {obj.get('messege', '')}"


def short(resp):
    text = repr(resp)
    return text if len(text) <= 400 else text[:400] + "..."


class Suite:
    def __init__(self, base, key, processing_base):
        self.base = base
        self.key = key
        self.processing_base = processing_base
        self.api = community(base, key)
        self.first_url = None

    def settle(self, resp):
        """A "processing" answer is fetched (the SDK polls) until it succeeds."""
        if isinstance(resp, dict) and resp.get("status") == "processing":
            expect(resp.get("id") is not None, f"processing without id: {short(resp)}")
            return self.api.fetch(str(resp["id"]))
        return resp

    def text2img(self):
        resp = self.api.text_to_image(Text2Image(
            prompt=PROMPT, model_id=MODEL, negative_prompt="blurry", width=SIDE, height=SIDE,
            samples=2, num_inference_steps=2, guidance_scale=7.5, seed=SEED, safety_checker="no"))
        resp = self.settle(resp)
        images = check_outputs(resp, 2)
        expect(images[0] != images[1], "the two samples are the same image")
        expect(resp.get("id") is not None, f"no id: {short(resp)}")
        meta = resp.get("meta")
        expect(isinstance(meta, dict), f"no meta object: {short(resp)}")
        self.first_url = resp["output"][0]
        expect(self.first_url.startswith("http"), f"output is not a URL: {self.first_url[:60]!r}")

    def text2img_strings(self):
        # Options the SDK does not declare pass through with the type they are given.
        resp = self.api.text_to_image(Text2Image(
            prompt=PROMPT, model_id=MODEL, width=SIDE, height=SIDE, samples=1,
            num_inference_steps=2, seed=SEED + 1, safety_checker="no", enhance_prompt="no",
            scheduler="EulerDiscreteScheduler", use_karras_sigmas="yes", tomesd="yes", temp="no",
            track_id="7"))
        check_outputs(self.settle(resp), 1)

    def img2img_url(self):
        expect(self.first_url, "no URL from the text2img check")
        resp = self.api.image_to_image(Image2Image(
            prompt=PROMPT, model_id=MODEL, init_image=self.first_url, width=SIDE, height=SIDE,
            samples=1, num_inference_steps=2, seed=SEED, safety_checker="no", strength=0.7))
        check_outputs(self.settle(resp), 1)

    def img2img_base64(self):
        init = base64.b64encode(png_bytes(SIDE, SIDE)).decode()
        resp = self.api.image_to_image(Image2Image(
            prompt=PROMPT, model_id=MODEL, init_image=init, width=SIDE, height=SIDE, samples=1,
            num_inference_steps=2, seed=SEED, safety_checker="no", strength="0.6", base64="yes"))
        check_outputs(self.settle(resp), 1)

    def inpaint(self):
        expect(self.first_url, "no URL from the text2img check")
        from PIL import Image
        import io

        mask = Image.new("L", (SIDE, SIDE), 0)
        mask.paste(255, (SIDE // 4, SIDE // 4, 3 * SIDE // 4, 3 * SIDE // 4))
        buf = io.BytesIO()
        mask.save(buf, format="PNG")
        resp = self.api.inpainting(Inpainting(
            prompt=PROMPT, model_id=MODEL, init_image=self.first_url,
            mask_image="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            width=SIDE, height=SIDE, samples=1, num_inference_steps=2, seed=SEED,
            safety_checker="no", strength=1.0))
        check_outputs(self.settle(resp), 1)

    def error_width(self):
        try:
            resp = self.api.text_to_image(Text2Image(
                prompt=PROMPT, model_id=MODEL, width=1032, height=SIDE, samples=1,
                num_inference_steps=2))
        except Exception as e:  # noqa: BLE001 - the SDK raises on a non-200 answer
            resp = refusal(e)
        expect(resp.get("status") == "error", f"width 1032 was accepted: {short(resp)}")
        expect("width" in error_text(resp), f"error does not name width: {short(resp)}")

    def bad_key(self):
        api = community(self.base, self.key + "-not-a-key")
        try:
            resp = api.text_to_image(Text2Image(prompt=PROMPT, model_id=MODEL, width=SIDE, height=SIDE))
        except Exception as e:  # noqa: BLE001 - a non-200 answer is a refusal too
            resp = refusal(e)
        expect(resp.get("status") == "error", f"a wrong key was accepted: {short(resp)}")

    def fetch_unknown(self):
        api = community(self.base, self.key, fetch_retry=1, fetch_timeout=0)
        try:
            resp = api.fetch("999999999")
        except Exception as e:  # noqa: BLE001
            resp = refusal(e)
        expect(resp.get("status") == "error", f"fetch of an unknown id: {short(resp)}")

    def processing_then_fetch(self):
        api = community(self.processing_base, self.key, fetch_retry=60, fetch_timeout=1)
        resp = api.text_to_image(Text2Image(
            prompt=PROMPT, model_id=MODEL, width=SIDE, height=SIDE, samples=2,
            num_inference_steps=2, seed=SEED, safety_checker="no"))
        expect(isinstance(resp, dict) and resp.get("status") == "processing",
               f"expected status processing with wait_secs = 0, got {short(resp)}")
        job = resp.get("id")
        expect(job is not None, f"processing answer without id: {short(resp)}")
        expect(resp.get("fetch_result"), f"processing answer without fetch_result: {short(resp)}")
        expect("eta" in resp, f"processing answer without eta: {short(resp)}")
        done = api.fetch(str(job))
        check_outputs(done, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="server base URL (default $SD_SERVE_URL)")
    ap.add_argument("--key", help="API key (default $SD_SERVE_KEY)")
    ap.add_argument("--processing-url", default=os.environ.get("SD_SERVE_URL_PROCESSING"),
                    help="a server with [modelslab] wait_secs = 0.0 (default $SD_SERVE_URL_PROCESSING)")
    args = ap.parse_args()

    processing = args.processing_url.rstrip("/") if args.processing_url else None
    s = Suite(base_url(args.url), api_key(args.key), processing)
    c = Checks("modelslab_py")
    print(f"modelslab_py: {s.api.base_url}", flush=True)
    c.run("text2img 64x64, 2 samples, URLs", s.text2img)
    c.run("text2img with string options passed through", s.text2img_strings)
    c.run("img2img with a URL init_image", s.img2img_url)
    c.run("img2img with a base64 init_image", s.img2img_base64)
    c.run("inpaint with a URL init_image and a data URI mask", s.inpaint)
    c.run("width 1032 -> error naming width", s.error_width)
    if s.key:
        c.run("wrong API key is refused", s.bad_key)
    c.run("fetch of an unknown id -> error", s.fetch_unknown)
    if processing:
        c.run("status processing, then fetch()", s.processing_then_fetch)
    c.finish()


if __name__ == "__main__":
    main()
