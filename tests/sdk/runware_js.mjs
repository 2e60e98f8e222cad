#!/usr/bin/env node
// End-to-end checks of sd-serve's Runware dialect through Runware's JS SDK (@runware/sdk-js).
//
// Usage: node runware_js.mjs [--url http://127.0.0.1:PORT] [--key KEY] [--timeout SECONDS]
//        (or SD_SERVE_URL / SD_SERVE_KEY in the environment). The SDK is pointed at ws://HOST:PORT/v1.
// @runware/sdk-js is resolved from this folder's node_modules (run.sh installs it there) or from
// $SD_SERVE_NPM_DIR/node_modules.
// Exits 0 when every check passed, 1 otherwise; the last line is a one-line summary.

import { createRequire } from "node:module";
import path from "node:path";
import process from "node:process";

const MODEL = "civitai:102438@133677"; // an alias of the tiny SD1.5 test model
const PROMPT = "a red apple on a wooden table";
const SEED = 1234;
const SIDE = 128;

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(argv[i]);
    if (!m) throw new Error(`unexpected argument ${argv[i]}`);
    out[m[1]] = m[2] !== undefined ? m[2] : argv[++i];
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
const BASE = (args.url || process.env.SD_SERVE_URL || "http://127.0.0.1:7860").replace(/\/+$/, "");
const KEY = args.key ?? process.env.SD_SERVE_KEY ?? "";
const TIMEOUT_MS = Number(args.timeout || process.env.SD_SERVE_TIMEOUT || 300) * 1000;

function wsUrl(base) {
  if (/^wss?:\/\//.test(base)) return base.endsWith("/v1") ? base : `${base}/v1`;
  if (base.startsWith("https://")) return `wss://${base.slice(8)}/v1`;
  if (base.startsWith("http://")) return `ws://${base.slice(7)}/v1`;
  return `ws://${base}/v1`;
}
const WS = wsUrl(BASE);

async function loadSdk() {
  try {
    return await import("@runware/sdk-js");
  } catch (first) {
    const dir = process.env.SD_SERVE_NPM_DIR;
    if (!dir) throw first;
    const require = createRequire(path.join(path.resolve(dir), "package.json"));
    return await import(require.resolve("@runware/sdk-js"));
  }
}
const { Runware } = await loadSdk();

// ---- bookkeeping -------------------------------------------------------------------------------

const passed = [];
const failed = [];
const started = Date.now();

function describe(e) {
  let text;
  if (e instanceof Error) text = `${e.name}: ${e.message}`;
  else if (typeof e === "string") text = e;
  else {
    try {
      text = JSON.stringify(e);
    } catch {
      text = String(e);
    }
  }
  return text.length > 600 ? `${text.slice(0, 600)}...` : text;
}

async function check(label, fn) {
  const t0 = Date.now();
  try {
    const value = await fn();
    passed.push(label);
    console.log(`  ok   ${label} (${((Date.now() - t0) / 1000).toFixed(1)}s)`);
    return value;
  } catch (e) {
    failed.push(label);
    console.log(`  FAIL ${label}: ${describe(e)}`);
    if (process.env.SD_SERVE_SDK_TRACE && e instanceof Error) console.log(e.stack);
    return undefined;
  }
}

function finish() {
  const total = passed.length + failed.length;
  const secs = ((Date.now() - started) / 1000).toFixed(0);
  if (failed.length) {
    console.log(`runware_js: FAIL ${passed.length}/${total} checks passed in ${secs}s; failed: ${failed.join(", ")}`);
    process.exit(1);
  }
  console.log(`runware_js: PASS ${total}/${total} checks in ${secs}s`);
  process.exit(0);
}

function expect(cond, message) {
  if (!cond) throw new Error(message);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms / 1000}s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---- images ------------------------------------------------------------------------------------

// Format and size of PNG, JPEG or WebP bytes, read from the headers.
function imageInfo(buf) {
  if (buf.length > 24 && buf.readUInt32BE(0) === 0x89504e47 && buf.toString("ascii", 12, 16) === "IHDR") {
    return { format: "PNG", width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
  }
  if (buf.length > 4 && buf[0] === 0xff && buf[1] === 0xd8) {
    let i = 2;
    while (i + 9 < buf.length) {
      if (buf[i] !== 0xff) throw new Error("corrupt JPEG marker stream");
      const marker = buf[i + 1];
      if (marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) {
        i += 2;
        continue;
      }
      const len = buf.readUInt16BE(i + 2);
      if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
        return { format: "JPEG", height: buf.readUInt16BE(i + 5), width: buf.readUInt16BE(i + 7) };
      }
      i += 2 + len;
    }
    throw new Error("JPEG without a frame header");
  }
  if (buf.length > 30 && buf.toString("ascii", 0, 4) === "RIFF" && buf.toString("ascii", 8, 12) === "WEBP") {
    const chunk = buf.toString("ascii", 12, 16);
    if (chunk === "VP8X") {
      return { format: "WEBP", width: 1 + buf.readUIntLE(24, 3), height: 1 + buf.readUIntLE(27, 3) };
    }
    if (chunk === "VP8L") {
      const bits = buf.readUInt32LE(21);
      return { format: "WEBP", width: 1 + (bits & 0x3fff), height: 1 + ((bits >> 14) & 0x3fff) };
    }
    if (chunk === "VP8 ") {
      return { format: "WEBP", width: buf.readUInt16LE(26) & 0x3fff, height: buf.readUInt16LE(28) & 0x3fff };
    }
  }
  throw new Error(`not a PNG/JPEG/WebP image (first bytes ${buf.subarray(0, 8).toString("hex")})`);
}

async function fetchBytes(url) {
  const resp = await fetch(url, { signal: AbortSignal.timeout(30000) });
  expect(resp.ok, `GET ${url}: HTTP ${resp.status}`);
  return Buffer.from(await resp.arrayBuffer());
}

async function bytesFrom(value) {
  expect(typeof value === "string" && value.length > 0, `not an image reference: ${value}`);
  if (/^https?:\/\//.test(value)) return fetchBytes(value);
  if (value.startsWith("data:")) {
    const comma = value.indexOf(",");
    expect(value.slice(0, comma).endsWith(";base64"), "data URI is not base64");
    return Buffer.from(value.slice(comma + 1), "base64");
  }
  return Buffer.from(value, "base64");
}

function expectImage(buf, format, side = SIDE) {
  const info = imageInfo(buf);
  expect(info.format === format, `expected ${format}, got ${info.format}`);
  expect(info.width === side && info.height === side, `expected ${side}x${side}, got ${info.width}x${info.height}`);
}

// ---- the checks --------------------------------------------------------------------------------

const runware = new Runware({ apiKey: KEY, url: WS, timeoutDuration: TIMEOUT_MS, globalMaxRetries: 1 });
const infer = (params) => withTimeout(runware.imageInference(params), TIMEOUT_MS + 5000, "imageInference");
const base = { model: MODEL, positivePrompt: PROMPT, width: SIDE, height: SIDE, steps: 2 };
let firstPng = null;
let firstUrl = null;

console.log(`runware_js: ${WS}`);

const connected = await check("connect + authentication", async () => {
  await withTimeout(runware.ensureConnection(), 30000, "ensureConnection");
  expect(runware._connectionSessionUUID, "no connectionSessionUUID after authentication");
  return true;
});
if (!connected) {
  await runware.disconnect();
  finish();
}

await check("ping -> pong", async () => {
  const ws = runware._ws;
  const got = new Promise((resolve) => {
    const onMessage = (raw) => {
      let m;
      try {
        m = JSON.parse(raw.toString());
      } catch {
        return;
      }
      if (Array.isArray(m?.data) && m.data.some((d) => d?.taskType === "ping" && d?.pong === true)) {
        ws.off("message", onMessage);
        resolve(true);
      }
    };
    ws.on("message", onMessage);
  });
  ws.send(JSON.stringify([{ taskType: "ping", ping: true }]));
  await withTimeout(got, 5000, "pong");
});

await check("text-to-image 128x128, 2 results, URLs, seeds, cost", async () => {
  const images = await infer({ ...base, numberResults: 2, seed: SEED, outputType: "URL", outputFormat: "PNG", includeCost: true });
  expect(Array.isArray(images) && images.length === 2, `expected 2 images, got ${describe(images)}`);
  const uuids = new Set(images.map((im) => im.imageUUID));
  expect(images.every((im) => im.imageUUID) && uuids.size === 2, "image UUIDs missing or not distinct");
  expect(images.every((im) => im.taskUUID === images[0].taskUUID), "taskUUID differs between images");
  expect(images.every((im) => im.taskType === "imageInference"), "taskType not imageInference");
  const seeds = images.map((im) => im.seed);
  expect(seeds.every((s) => typeof s === "number") && seeds[0] !== seeds[1], `seeds: ${seeds}`);
  expect(seeds.includes(SEED), `requested seed ${SEED} not among ${seeds}`);
  expect(images.every((im) => typeof im.cost === "number" && im.cost >= 0), "includeCost: no numeric cost");
  for (const im of images) {
    const buf = await fetchBytes(im.imageURL);
    expectImage(buf, "PNG");
    firstPng ??= buf;
  }
  firstUrl = images[0].imageURL;
});

await check("random seeds: distinct and exact as JS numbers", async () => {
  const images = await infer({ ...base, numberResults: 2, outputType: "base64Data", outputFormat: "PNG" });
  expect(images.length === 2, `got ${images.length} images`);
  const seeds = images.map((im) => im.seed);
  expect(seeds.every((s) => Number.isSafeInteger(s) && s >= 1), `seeds beyond 2^53-1 lose precision: ${seeds}`);
  expect(seeds[0] !== seeds[1], `seeds equal: ${seeds}`);
});

await check("defaults: 1 result, URL, JPG", async () => {
  const images = await infer({ ...base });
  expect(images.length === 1, `numberResults defaults to 1, got ${images.length}`);
  expect(images[0].imageURL, "default outputType should be URL");
  expectImage(await fetchBytes(images[0].imageURL), "JPEG");
});

await check("outputType base64Data", async () => {
  const images = await infer({ ...base, seed: SEED + 7, outputType: "base64Data", outputFormat: "PNG" });
  const data = images[0]?.imageBase64Data;
  expect(data && !data.startsWith("data:"), "imageBase64Data missing or has a data: prefix");
  expectImage(Buffer.from(data, "base64"), "PNG");
});

await check("outputType dataURI (WEBP)", async () => {
  const images = await infer({ ...base, seed: SEED + 8, outputType: "dataURI", outputFormat: "WEBP" });
  const uri = images[0]?.imageDataURI;
  expect(uri && uri.startsWith("data:image/webp;base64,"), `imageDataURI: ${String(uri).slice(0, 40)}`);
  expectImage(await bytesFrom(uri), "WEBP");
});

await check("imageUpload + img2img with the uploaded imageUUID", async () => {
  expect(firstPng, "no PNG from the text-to-image check");
  const uploaded = await withTimeout(
    runware.imageUpload({ image: `data:image/png;base64,${firstPng.toString("base64")}` }),
    60000,
    "imageUpload",
  );
  expect(uploaded?.imageUUID && uploaded?.imageURL, `upload reply: ${describe(uploaded)}`);
  expect(!String(uploaded.imageUUID).startsWith("data:"), "imageUUID is the upload itself");
  const images = await infer({ ...base, seedImage: uploaded.imageUUID, strength: 0.7, outputType: "URL", outputFormat: "PNG" });
  expect(images.length === 1 && images[0].imageURL, `img2img: ${describe(images)}`);
  expectImage(await fetchBytes(images[0].imageURL), "PNG");
});

await check("img2img with bare base64", async () => {
  expect(firstPng, "no PNG from the text-to-image check");
  const images = await infer({ ...base, seedImage: firstPng.toString("base64"), strength: 0.5, outputType: "base64Data", outputFormat: "PNG" });
  expect(images.length === 1, `got ${images.length} images`);
  expectImage(Buffer.from(images[0].imageBase64Data, "base64"), "PNG");
});

await check("img2img with an image URL", async () => {
  expect(firstUrl, "no URL from the text-to-image check");
  const images = await infer({ ...base, seedImage: firstUrl, strength: 0.6, outputType: "URL", outputFormat: "PNG" });
  expect(images.length === 1, `got ${images.length} images`);
  expectImage(await fetchBytes(images[0].imageURL), "PNG");
});

await check("width 100 -> the SDK's error naming width", async () => {
  let images;
  try {
    images = await withTimeout(runware.imageInference({ ...base, width: 100 }), 60000, "imageInference");
  } catch (e) {
    expect(!(e instanceof Error), `expected the SDK's {error: ...} rejection, got ${describe(e)}`);
    const err = e?.error;
    expect(err && err.code, `rejection without error.code: ${describe(e)}`);
    expect(err.taskUUID, "error without taskUUID");
    expect(`${err.parameter ?? ""} ${err.message ?? ""}`.includes("width"), `error does not name width: ${describe(e)}`);
    return;
  }
  throw new Error(`width 100 was accepted: ${describe(images)}`);
});

await check("two tasks at once on one connection", async () => {
  const [a, b] = await Promise.all([
    infer({ ...base, seed: SEED + 100 }),
    infer({ ...base, seed: SEED + 200, outputType: "dataURI", outputFormat: "PNG" }),
  ]);
  expect(a.length === 1 && b.length === 1, `got ${a.length} and ${b.length} images`);
  expect(a[0].taskUUID !== b[0].taskUUID, "both replies carry the same taskUUID");
  expect(a[0].seed === SEED + 100 && b[0].seed === SEED + 200, `seeds ${a[0].seed}, ${b[0].seed}`);
  expectImage(await bytesFrom(b[0].imageDataURI), "PNG");
});

if (KEY) {
  await check("wrong API key is refused with invalidApiKey", async () => {
    const bad = new Runware({ apiKey: `${KEY}-not-a-key`, url: WS, shouldReconnect: false });
    try {
      await withTimeout(bad.ensureConnection(), 20000, "ensureConnection");
    } catch (e) {
      expect(e?.error?.code === "invalidApiKey", `expected error.code invalidApiKey, got ${describe(e)}`);
      return;
    } finally {
      await bad.disconnect();
    }
    throw new Error("a wrong API key was accepted");
  });
}

await runware.disconnect();
finish();
