"""GPU benchmark: how close each stage runs to what the card allows. Run by benchmarks/gpu.sh.

Prints, on one GPU (or tiny on the CPU with --tiny, to check the script):
1. the measured bf16 matmul ceiling (TFLOP/s);
2. frozen VGG-19 conv5_4 feature extraction at 224: images/s and its fraction of that ceiling
   (VGG-19 is about 39 GFLOP per image), eager and with torch.compile;
3. LESA head training steps/s on feature batches (14x14x512, 7,186 seen labels, 300-d vectors,
   all four losses, TF-style RMSprop), eager and compiled, with the fraction of each step's wall
   time the GPU spends in kernels (from torch.profiler): well under 1 means the step waits on the
   CPU (kernel launches, Python), not on the card;
4. end-to-end training images/s from JPEG shards: the project's streaming reader in loader
   processes (read, decode, resize, centre crop), pinned memory and non-blocking copies, the
   frozen VGG-19 and the LESA head in bf16: eager, the backbone alone compiled, and both compiled
   in place (what trainer/models/registry.py does with model.compile); next to the loader alone, to show
   which bounds.
Compiled figures exclude the compile itself (the warm-up calls pay it). --stages picks a subset.
The components are the project's own (datasets/stream.py, trainer/models/backbones.py, trainer/models/lesa.py,
trainer/models/losses.py, trainer/optim.py); Ray and DeepSpeed are left out, which the CPU benchmarks
of the training path measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.contract import Shard  # noqa: E402
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels  # noqa: E402
from datasets.stream import StreamSpec, make_loader  # noqa: E402
from trainer.models.backbones import VGG19Conv54  # noqa: E402
from trainer.models.lesa import LESAHead  # noqa: E402
from trainer.models.losses import total_loss  # noqa: E402
from trainer.optim import RMSpropTF  # noqa: E402

VGG19_GFLOP = 39.0
WEIGHTS = {"rank": 1.0, "dist": 0.1, "rel": 0.001, "div": 0.01}


def timed(fn, iters: int, device) -> float:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, iters, device)
    return 2 * n**3 / seconds / 1e12


def vgg_extraction(device, batch: int, iters: int, compiled: bool, size: int = 224) -> float:
    vgg = VGG19Conv54(weights=None).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    images = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=device)
    fn = torch.compile(vgg) if compiled else vgg
    with torch.no_grad():
        seconds = timed(lambda: fn(images), iters, device)
    return batch / seconds


def make_head(device, labels: int):
    head = LESAHead(512, 300, num_attentions=10).to(device)
    vectors = torch.nn.functional.normalize(torch.randn(labels, 300, device=device), dim=1)
    return head, vectors, RMSpropTF(head.parameters(), lr=1e-3)


def random_labels(batch: int, labels: int, device) -> torch.Tensor:
    """Open Images-like: a few verified positives and negatives per image, the rest unknown."""
    y = torch.zeros(batch, labels, dtype=torch.int8, device=device)
    cols = torch.randint(0, labels, (batch, 8), device=device)
    y.scatter_(1, cols, torch.where(torch.rand(batch, 8, device=device) < 0.4, 1, -1).to(torch.int8))
    return y


def head_step(head, vectors, opt, feats, y) -> None:
    """One optimizer step of the LESA head on a feature batch: bf16 autocast, fp32 losses."""
    with torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=feats.device.type == "cuda"):
        out = head(feats, vectors)
    loss, _ = total_loss(out.float(), y, WEIGHTS)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def head_training(device, batch: int, labels: int, iters: int, compiled: bool) -> tuple[float, float | None]:
    """Steps/s, and on a GPU the fraction of a step's wall time its kernels keep the card busy."""
    head, vectors, opt = make_head(device, labels)
    if compiled:
        head.compile()
    feats = torch.randn(batch, 512, 14, 14, device=device).relu()
    y = random_labels(batch, labels, device)

    def step():
        head_step(head, vectors, opt, feats, y)

    seconds = timed(step, iters, device)
    busy = gpu_busy_seconds(step, device)
    return 1.0 / seconds, None if busy is None else busy / seconds


def gpu_busy_seconds(fn, device, iters: int = 10) -> float | None:
    """Kernel time per call on the GPU (None on the CPU), summed over every kernel the call launches."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6 / iters


def write_shards(root: str, images: int, side: int, labels: int) -> list[Shard]:
    rng = np.random.default_rng(0)
    with SplitWriter(root, "train", maxcount=max(1, images // 16)) as writer:
        for i in range(images):
            # smooth random content so JPEG sizes are realistic (not noise, not flat)
            small = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
            image = np.kron(small, np.ones((16, 16, 1), dtype=np.uint8))
            pos = rng.choice(labels, 3, replace=False)
            writer.write(f"img{i:07d}", {"jpg": encode_jpeg(image), "labels.json": encode_labels(pos[:1], pos[1:])})
    return [Shard(f"{root}/{path}", n) for path, n in writer.shards]


def loader_rate(shards, labels: int, batch: int, loaders: int, seconds: float, pin: bool, size: int = 224) -> float:
    spec = StreamSpec(
        shards=shards, num_labels=labels, image_size=size, batch_size=batch, train=True, shuffle_buffer=256
    )
    loader = iter(make_loader(spec, loaders, pin_memory=pin))
    next(loader)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(loader).keys)
    return count / (time.perf_counter() - start)


def end_to_end(
    device, shards, labels: int, batch: int, loaders: int, seconds: float, compiled: tuple[str, ...], size: int = 224
) -> float:
    vgg = VGG19Conv54(weights=None).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    head, vectors, opt = make_head(device, labels)
    for name, module in (("backbone", vgg), ("head", head)):
        if name in compiled:
            module.compile()
    spec = StreamSpec(
        shards=shards, num_labels=labels, image_size=size, batch_size=batch, train=True, shuffle_buffer=256
    )
    batches = iter(make_loader(spec, loaders, pin_memory=device.type == "cuda"))

    def step():
        b = next(batches)
        images = b.images.to(device, non_blocking=True)
        y = b.labels.to(device, non_blocking=True)
        with torch.no_grad():
            feats = vgg(images).float()
        head_step(head, vectors, opt, feats, y)
        return len(b.keys)

    for _ in range(3):
        step()
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += step()
    sync(device)
    return count / (time.perf_counter() - start)


STAGES = ("ceiling", "backbone", "head", "end_to_end")
END_TO_END_COMPILES = {"eager": (), "backbone_compiled": ("backbone",), "compiled": ("backbone", "head")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on the CPU, to check the script")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tiny = args.tiny
    labels = 7186
    size = 64 if tiny else 224  # VGG-19 at 224 in bf16 takes seconds a batch on a CPU
    loaders = 2 if tiny else max(1, min(14, (os.cpu_count() or 2) - 2))
    torch.backends.cudnn.benchmark = True
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "loader_processes": loaders,
    }
    compile_modes = [False] if tiny else [False, True]  # a CPU compile takes minutes to check nothing new

    def say(key, value, text):
        results[key] = value
        print(text, flush=True)

    ceiling = None
    if "ceiling" in args.stages:
        ceiling = matmul_ceiling(device, 256 if tiny else 8192, 2 if tiny else 20)
        say("bf16_matmul_tflops", ceiling, f"bf16 matmul ceiling: {ceiling:.1f} TFLOP/s")
    if "backbone" in args.stages:
        for compiled in compile_modes:
            rate = vgg_extraction(device, 2 if tiny else 256, 1 if tiny else 20, compiled, size)
            name = "compiled" if compiled else "eager"
            fraction = (
                ""
                if ceiling is None
                else f" = {100 * rate * VGG19_GFLOP / 1e3 / ceiling:.1f}% of the bf16 ceiling at {VGG19_GFLOP:.0f} GFLOP/image"
            )
            say(
                f"vgg19_images_per_s_{name}",
                rate,
                f"VGG-19 conv5_4 extraction at {size} ({name}, bf16, channels_last): {rate:.0f} images/s{fraction}",
            )
    if "head" in args.stages:
        for compiled in compile_modes:
            name = "compiled" if compiled else "eager"
            for batch in [4] if tiny else [32, 256]:
                rate, busy = head_training(device, batch, labels, 2 if tiny else 50, compiled)
                results[f"head_gpu_busy_fraction_b{batch}_{name}"] = busy
                say(
                    f"head_steps_per_s_b{batch}_{name}",
                    rate,
                    f"LESA head training on features ({name}), batch "
                    f"{batch}: {rate:.1f} steps/s = {rate * batch:.0f} images/s"
                    + ("" if busy is None else f", GPU busy {100 * busy:.0f}% of the step"),
                )
    if "end_to_end" in args.stages:
        with tempfile.TemporaryDirectory() as tmp:
            shards = write_shards(tmp, 64 if tiny else 4096, 256, labels)
            batch = 4 if tiny else 128
            seconds = 2 if tiny else 20
            rate = loader_rate(shards, labels, batch, loaders, seconds, device.type == "cuda", size)
            say(
                "loader_images_per_s",
                rate,
                f"loader alone ({loaders} processes: read + JPEG decode + resize/crop to {size}): {rate:.0f} images/s",
            )
            for name, compiled in END_TO_END_COMPILES.items():
                if compiled and tiny:
                    continue
                rate = end_to_end(device, shards, labels, batch, loaders, seconds, compiled, size)
                say(
                    f"end_to_end_images_per_s_{name}",
                    rate,
                    f"end-to-end training from JPEG shards (frozen VGG-19 + "
                    f"LESA head, {name.replace('_', ' ')}, batch {batch}): {rate:.0f} images/s",
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
