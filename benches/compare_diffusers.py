"""sd-serve against diffusers on the same device, back to back: the same full-size architectures
(the built-in configs in src/weights/configs), the same random N(0, 0.02) weights, resolution,
steps, DPM++ 2M scheduler with guidance 7.5 (a UNet batch of two) and dtype.

    # on a GPU host (build sd-serve with `--features cuda` first)
    python benches/compare_diffusers.py --sd-serve target/release/sd-serve
    # on the CPU (f32, both sides on the same threads): SD1.5 at 512x512, 20 steps
    python benches/compare_diffusers.py --device cpu --arch sd15 --steps 20 --unet-iters 3
    # CPU smoke test: tiny sizes, two steps
    python benches/compare_diffusers.py --device cpu --arch sd15 --size 64 --steps 2 --unet-iters 1

Prints, per architecture, UNet iterations per second (CFG batch 2), VAE decode and encode
seconds, end-to-end (text encoders, denoising, decode) seconds per image and peak GPU memory, each for diffusers and sd-serve, with their
ratio (above 1: sd-serve is faster, or uses less memory). Peak memory: diffusers'
`torch.cuda.max_memory_allocated` (tensors only), and for both processes the device memory NVML
saw them hold (allocator pools and the CUDA context included), sampled every 20 ms; sd-serve
reports no allocator figure of its own. `--json FILE` writes every figure.

Needs torch, diffusers and transformers (tests/fixtures/requirements.txt pins them); the NVML
figure needs `nvidia-ml-py` or `nvidia-smi`.
"""

import argparse
import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import diffusers_reference  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIDES = {"sd15": 512, "sdxl": 1024}


class ProcessMemory:
    """Largest device memory NVML reports for one process while the `with` block runs."""

    def __init__(self, pid, gpu_index):
        self.pid, self.gpu_index, self.peak = pid, gpu_index, None
        self._stop = threading.Event()
        self._read = self._reader()

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)

            def read():
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid == self.pid and p.usedGpuMemory is not None:
                        return p.usedGpuMemory
                return None

            return read
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            def read():
                out = subprocess.run(
                    ["nvidia-smi", f"--id={self.gpu_index}", "--query-compute-apps=pid,used_memory",
                     "--format=csv,noheader,nounits"],
                    capture_output=True, text=True).stdout
                for line in out.splitlines():
                    pid, mib = (v.strip() for v in line.split(","))
                    if pid == str(self.pid) and mib.isdigit():
                        return int(mib) * 2**20
                return None

            return read
        return None

    def _sample(self):
        while not self._stop.wait(0.02):
            used = self._read()
            if used is not None:
                self.peak = max(self.peak or 0, used)

    def __enter__(self):
        if self._read is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._read is not None:
            self._stop.set()
            self._thread.join()


def run_diffusers(arch, side, a, device, dtype):
    with ProcessMemory(os.getpid(), device.index or 0) if device.type == "cuda" else _nothing() as mem:
        result = diffusers_reference.bench(arch, side, a.steps, a.unet_iters, device, dtype)
    result["peak_process_memory_bytes"] = mem.peak if mem else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_sd_serve(arch, side, a, device):
    cmd = [a.sd_serve, "bench", "--arch", arch, "--size", str(side), "--steps", str(a.steps),
           "--unet-iters", str(a.unet_iters), "--device", a.device, "--dtype", a.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    gpu = device.index or 0
    with ProcessMemory(proc.pid, gpu) if device.type == "cuda" else _nothing() as mem:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"sd-serve bench failed ({proc.returncode}): {' '.join(cmd)}")
    (result,) = json.loads(out)["results"]
    result["peak_process_memory_bytes"] = mem.peak if mem else None
    return result


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        pass


# (label, key, unit, True when larger is better)
ROWS = [
    ("UNet it/s (CFG batch 2)", "unet_steps_per_second", "it/s", True),
    ("text encoders", "text_encode_seconds", "s", False),
    ("VAE decode", "vae_decode_seconds", "s", False),
    ("VAE encode", "vae_encode_seconds", "s", False),
    ("end to end, {steps} steps", "end_to_end_seconds_per_image", "s", False),
    ("peak allocated (torch)", "peak_memory_allocated_bytes", "GiB", False),
    ("peak process memory (NVML)", "peak_process_memory_bytes", "GiB", False),
]


def fmt(value, unit):
    if value is None:
        return "-"
    if unit == "GiB":
        return f"{value / 2**30:.2f} GiB"
    return f"{value:.3f} {unit}" if unit == "s" else f"{value:.2f} {unit}"


def ratio(ours, theirs, larger_is_better):
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return "-"
    return f"{(ours / theirs if larger_is_better else theirs / ours):.2f}x"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sd15,sdxl", help="sd15, sdxl or both, comma separated")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--unet-iters", type=int, default=10, help="timed UNet steps after 2 warm-up steps")
    ap.add_argument("--size", type=int, help="image side; default 512 for sd15, 1024 for sdxl")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:N (the same device for both)")
    ap.add_argument("--dtype", help="f32, f16 or bf16; default f16 on a GPU, f32 on the CPU")
    ap.add_argument("--sd-serve", default=str(ROOT / "target" / "release" / "sd-serve"),
                    help="the sd-serve binary (built with --features cuda for a GPU)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="CPU threads for both (torch.set_num_threads, RAYON_NUM_THREADS); default "
                         "torch's, the number of cores")
    ap.add_argument("--json", help="also write every figure to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["RAYON_NUM_THREADS"] = str(a.threads)
    device = torch.device(a.device)
    a.dtype = a.dtype or ("f32" if device.type == "cpu" else "f16")
    dtype = diffusers_reference.DTYPES[a.dtype]
    if not os.access(a.sd_serve, os.X_OK):
        sys.exit(f"no sd-serve binary at {a.sd_serve}: build it (cargo build --release "
                 "--features cuda) or pass --sd-serve")

    report = {"device": str(device), "dtype": a.dtype, "steps": a.steps, "torch": torch.__version__,
              "threads": a.threads,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "results": []}
    for arch in [x.strip() for x in a.arch.split(",") if x.strip()]:
        if arch not in SIDES:
            sys.exit(f"--arch entries must be sd15 or sdxl. Given: {arch}")
        side = a.size or SIDES[arch]
        theirs = run_diffusers(arch, side, a, device, dtype)
        ours = run_sd_serve(arch, side, a, device)
        report["results"].append({"arch": arch, "side": side, "diffusers": theirs, "sd_serve": ours})

        where = report["gpu"] or f"{device}, {a.threads} threads"
        print(f"\n{arch} {side}x{side}, {a.steps} steps, {a.dtype} on {where}")
        print(f"{'':32}{'diffusers':>16}{'sd-serve':>16}{'ratio':>10}")
        for label, key, unit, larger in ROWS:
            t, o = theirs.get(key), ours.get(key)
            if t is None and o is None:
                continue
            print(f"{label.format(steps=a.steps):32}{fmt(t, unit):>16}{fmt(o, unit):>16}"
                  f"{ratio(o, t, larger):>10}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
