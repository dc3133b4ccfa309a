"""Performance of fairbench's fast path, each figure measured side by side in this one run.

1. data: images/s of the fairbench loader (memory-mapped cache, batches gathered by index,
   augmented on the device) vs a conventional loader (per-sample JPEG decode with PIL and
   torchvision transforms), same images, output size, batch size and worker count. Target >= 3x.
2. trainer: one ERM epoch of ``fairbench.trainer.fit`` vs a bare PyTorch loop (forward,
   loss, backward, step, then the validation pass) on the same tensors, model, optimiser and
   batch size, and the split of fairbench's epoch into training steps, validation and time
   the host was blocked on the loader (timed around the loader wait). Target <= 1.05x.
3. methods: training-step time of reweight, adversarial and nir as a ratio to erm, at 48 px
   and at 224 px. Targets <= 1.03, <= 1.10, <= 1.03.
4. metrics: the full evaluation (all metrics, 3 attributes, 1000 bootstrap resamples) of
   100,000 predictions. Target < 2 s.
5. CUDA only: resnet18 and resnet50 epochs at batch 64 and 256, 224 px from a HAM10000-sized
   memory-mapped cache (8,015 train / 1,000 val at 256 px), vs the compute-bound limit: the
   same model, optimiser, batch size and validation pass on batches already on the GPU (both
   after a warm-up epoch); with the split of fairbench's epoch. Target >= 0.9 of that limit.
   Prints "skipped: no CUDA" without CUDA.
6. memory: peak proportional set size (PSS: shared pages split between the processes that map
   them) of the training process and its 4 loader workers, training on a HAM10000-sized cache
   (10,015 images at 256 px). Target < 3 GB.

Usage: ``python benchmarks/perf.py [--only data,trainer,...] [--append benchmarks/RESULTS.md]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _common import emit, machine
from PIL import Image

from fairbench.data import DeviceTransform, Split, Splits, default_num_workers, iterate_device, make_loader
from fairbench.method import Method, TrainInfo
from fairbench.metrics import evaluate
from fairbench.model import create_backbone
from fairbench.trainer import TrainConfig, fit, make_optimizer, predict, resolve_device, seed_everything

HAM_MEAN, HAM_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _ham_like(images: np.ndarray, labels: np.ndarray, size: int) -> tuple[Split, Splits]:
    """One split over ``images`` with HAM10000's normalisation and augmentations."""
    split = Split(images=images, labels=labels, attrs=np.zeros((len(labels), 1), np.int64))
    splits = Splits(
        train=split,
        val=split,
        test=split,
        attributes={"a": ["x"]},
        mean=HAM_MEAN,
        std=HAM_STD,
        augment=("crop", "hflip", "vflip", "rotate"),
        size=size,
    )
    return split, splits


def _jpegs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = rng.uniform(60, 220, (9, 12, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((600, 450), Image.BICUBIC)
        path = folder / f"ISIC_{i:07d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def data_throughput(n: int, workers: int, size: int = 224, batch: int = 64) -> tuple[float, float]:
    """Images/s of (fairbench, conventional) loaders producing augmented float batches."""
    from torchvision import transforms

    from fairbench.prepare import decode_images

    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        paths = _jpegs(Path(tmp), n)
        decode_images(paths, Path(tmp), size=256, channels=3, workers=workers or 1, progress=False)
        images = np.load(Path(tmp) / "images.npy", mmap_mode="r")
        split, splits = _ham_like(images, np.zeros(n, np.int64), size)
        transform = DeviceTransform(splits, device)
        loader = make_loader(split, batch, train=True, seed=0, num_workers=workers, pin_memory=device.type == "cuda")

        def ours() -> int:
            count = 0
            for b in iterate_device(loader, device):
                count += transform(b["image"], train=True).shape[0]
            return count

        pipeline = transforms.Compose(
            [
                transforms.RandomResizedCrop(size, scale=(0.6, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.RandomVerticalFlip(),
                transforms.RandomRotation(15),
                transforms.ToTensor(),
                transforms.Normalize(HAM_MEAN, HAM_STD),
            ]
        )

        class Conventional(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return n

            def __getitem__(self, i: int):
                with Image.open(paths[i]) as img:
                    return pipeline(img.convert("RGB")), 0

        theirs_loader = torch.utils.data.DataLoader(
            Conventional(),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )

        def theirs() -> int:
            count = 0
            for x, _ in theirs_loader:
                count += x.to(device, non_blocking=True).shape[0]
            return count

        ours(), theirs()  # warm-up: start workers, fill the page cache
        rates = {"ours": [], "theirs": []}
        for _ in range(2):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                count = fn()
                rates[name].append(count / (time.perf_counter() - t0))
        return max(rates["ours"]), max(rates["theirs"])


def trainer_overhead(backbone: str = "resnet18") -> tuple[dict[str, float], float]:
    """One fairbench ERM epoch (train + validation pass: its fastest epoch's timings) and the
    seconds of a bare loop."""
    from fairbench.datasets.synthetic import Synthetic

    splits = Synthetic().load(None, 48)
    device = resolve_device("auto")
    config = TrainConfig(epochs=1, patience=0, num_workers=0, device=str(device))
    transform = DeviceTransform(splits, device)

    def ours() -> dict[str, float]:
        seed_everything(0)
        result = fit(Method, {}, create_backbone(backbone, 3), splits, "sex", config, progress=False)
        return result.history[0]

    x_train = transform(torch.from_numpy(splits.train.images).to(device), train=False)
    y_train = torch.from_numpy(splits.train.labels).float().to(device)

    def bare() -> float:
        seed_everything(0)
        model = create_backbone(backbone, 3).to(device)
        opt = make_optimizer(Method(model, None), config, device)
        loader = make_loader(splits.val, 128, train=False, seed=0)
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(y_train))
        for i in range(0, len(perm) - 1, 64):
            idx = perm[i : i + 64]
            out = model(x_train[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        predict(Method(model, None), loader, transform, device)
        return time.perf_counter() - t0

    ours(), bare()
    a, b = [], []
    for _ in range(2):
        a.append(ours())
        b.append(bare())
    return min(a, key=lambda h: h["epoch_seconds"]), min(b)


def metrics_time(n: int = 100_000) -> float:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    attrs = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n), rng.integers(-1, 2, n)], axis=1)
    attributes = {"race": ["a", "b", "c"], "sex": ["f", "m"], "age": ["<60", "≥60"]}
    t0 = time.perf_counter()
    evaluate(s, y, attrs, attributes, threshold=0.5, n_bootstrap=1000, seed=0)
    return time.perf_counter() - t0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def peak_memory(steps: int, workers: int = 4, n: int = 10015, size: int = 256) -> tuple[float, float, float]:
    """Peak PSS (bytes) of this process and its loader workers during a full data pass, then
    during training steps, and the cache size on disk."""
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        for i in range(0, n, 500):
            images[i : i + 500] = np.random.default_rng(i).integers(0, 255, images[i : i + 500].shape, dtype=np.uint8)
        images.flush()
        del images
        images = np.load(path, mmap_mode="r")
        labels = np.random.default_rng(0).integers(0, 2, n)
        split, splits = _ham_like(images, labels, 224)
        model = create_backbone("resnet18", 3).to(device)
        method = Method(model, TrainInfo(torch.from_numpy(labels), None, (), None, 1, steps))
        opt = torch.optim.AdamW(method.parameters(), lr=1e-3)
        transform = DeviceTransform(splits, device)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            me = os.getpid()
            while not stop.is_set():
                peak[0] = max(peak[0], _pss(me) + sum(_pss(c) for c in _children(me)))
                time.sleep(0.1)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        loader = make_loader(split, 64, train=True, seed=0, num_workers=workers)
        # a whole pass over the data through the workers (every page of the cache is touched) ...
        for _ in loader:
            pass
        data_peak = peak[0]
        # ... and training steps on top of it
        for step, raw in enumerate(iterate_device(loader, device)):
            if step >= steps:
                break
            x = transform(raw["image"], train=True)
            out = method(x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, raw["label"].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stop.set()
        watcher.join()
        return data_peak, peak[0], path.stat().st_size


def _write_cache(path: Path, n: int, size: int) -> np.ndarray:
    """A memory-mapped (n, 3, size, size) uint8 cache of noise, written in chunks."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    for i in range(0, n, 500):
        images[i : i + 500] = np.random.default_rng(i).integers(0, 255, images[i : i + 500].shape, dtype=np.uint8)
    images.flush()
    del images
    return np.load(path, mmap_mode="r")


def gpu_epoch(
    cache: np.ndarray, n_train: int, backbone: str, batch: int, device: torch.device, deterministic: bool = True
) -> tuple[dict[str, float], float]:
    """fairbench's fastest epoch after the first (its history entry) and the bare loop's fastest
    epoch on resident batches, for one backbone and batch size.

    The bare loop is the compute-bound limit: the training images already resized and
    normalised on the device (channels_last float32, as fairbench's transform delivers them),
    the same optimiser (fused on CUDA), bf16 autocast, a randomly permuted pass without
    augmentation, then the same validation pass on resident batches of twice the batch size.
    """
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, len(cache))
    attrs = np.zeros((len(cache), 1), np.int64)
    rows = np.arange(len(cache))
    train = Split(cache, labels[:n_train], attrs[:n_train], rows=rows[:n_train])
    val = Split(cache, labels[n_train:], attrs[n_train:], rows=rows[n_train:])
    splits = Splits(
        train=train,
        val=val,
        test=val,
        attributes={"a": ["x"]},
        mean=HAM_MEAN,
        std=HAM_STD,
        augment=("crop", "hflip", "vflip", "rotate"),
        size=224,
    )
    config = TrainConfig(
        epochs=3,
        patience=0,
        batch_size=batch,
        device=str(device),
        num_workers=default_num_workers(),
        seed=0,
        deterministic=deterministic,
    )
    seed_everything(0, deterministic)
    result = fit(Method, {}, create_backbone(backbone, 3), splits, None, config, progress=False, score_test=False)
    ours = min(result.history[1:], key=lambda h: h["epoch_seconds"])

    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    transform = DeviceTransform(splits, device, channels_last=cuda)

    def resident(split: Split) -> torch.Tensor:
        parts = [
            transform(torch.from_numpy(split.take(np.arange(i, min(i + 500, len(split))))).to(device), train=False)
            for i in range(0, len(split), 500)
        ]
        return torch.cat(parts).contiguous(memory_format=fmt)

    x_train, x_val = resident(train), resident(val)
    y_train = torch.from_numpy(train.labels).float().to(device)
    seed_everything(0, deterministic)
    model = create_backbone(backbone, 3).to(device).to(memory_format=fmt)
    method = Method(model, None)
    opt = make_optimizer(method, config, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def bare_epoch() -> float:
        sync()
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n_train, device=device)
        for i in range(0, n_train - 1, batch):
            idx = perm[i : i + batch]
            with autocast:
                out = model(x_train[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits.float(), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad(), autocast:
            scores = [
                torch.sigmoid(model(x_val[i : i + 2 * batch]).logits.double()) for i in range(0, len(x_val), 2 * batch)
            ]
        torch.cat(scores).cpu()
        return time.perf_counter() - t0

    bare_epoch()
    return ours, min(bare_epoch() for _ in range(2))


def eval_host_seconds(n: int = 1000, size: int = 256, batch: int = 128) -> tuple[float, float, float]:
    """Seconds per in-order pass over a HAM-sized validation split without a model: resident
    batches (after their one-off upload, also returned) vs the single-process loader."""
    from fairbench.data import ResidentBatches

    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        split = Split(_write_cache(Path(tmp) / "val.npy", n, size), np.zeros(n, np.int64), np.zeros((n, 1), np.int64))
        t0 = time.perf_counter()
        resident = ResidentBatches(split, batch, device)
        upload = time.perf_counter() - t0
        loader = make_loader(split, batch, train=False, seed=0, pin_memory=device.type == "cuda")

        def one_pass(batches) -> float:
            t0 = time.perf_counter()
            for b in iterate_device(batches, device):
                b["image"].sum()
            return time.perf_counter() - t0

        one_pass(loader)
        return min(one_pass(resident) for _ in range(3)), min(one_pass(loader) for _ in range(3)), upload


GPU_RUNS = (("resnet18", 64, True), ("resnet18", 256, True), ("resnet50", 64, True), ("resnet50", 256, True),
            ("resnet18", 64, False))  # fmt: skip


def _split_text(h: dict[str, float]) -> str:
    return f"steps {h['steps_seconds']:.2f} s, validation {h['val_seconds']:.2f} s, waiting {h['wait_seconds']:.2f} s"


ITEMS = ("data", "trainer", "eval", "methods", "metrics", "gpu", "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="JPEGs for the data benchmark")
    parser.add_argument("--workers", type=int, default=None, help="loader workers [default: the core count]")
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--steps-48", type=int, default=10, help="batches per timed pass of item 3 at 48 px")
    parser.add_argument("--steps-224", type=int, default=10, help="batches per timed pass of item 3 at 224 px")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed passes per method in item 3")
    parser.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated subset of {', '.join(ITEMS)}")
    parser.add_argument("--append", default=None)
    args = parser.parse_args()
    only = set(args.only.split(","))
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    lines = [
        f"## Fast path ({date.today().isoformat()}, {machine()}, torch {torch.__version__})",
        "",
        "| # | measurement | fairbench | reference | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def row(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    if "data" in only:
        ours, theirs = data_throughput(args.images, workers)
        row(
            f"| 1 | data: images/s at 224 px, augmented, {workers} workers | {ours:.0f} | {theirs:.0f} "
            f"(PIL + torchvision per sample) | {ours / theirs:.2f}× | ≥ 3× | {'yes' if ours / theirs >= 3 else 'no'} |"
        )
    if "trainer" in only:
        epoch, bare_t = trainer_overhead()
        ours_t = epoch["epoch_seconds"]
        ratio = ours_t / bare_t
        row(
            f"| 2 | trainer: one ERM epoch on synthetic (resnet18, 48 px, 1500 images) | {ours_t:.1f} s | "
            f"{bare_t:.1f} s (bare loop) | {ratio:.3f}× | ≤ 1.05× | {'yes' if ratio <= 1.05 else 'no'} |"
        )
        row(f"| 2 | trainer: that epoch split | {_split_text(epoch)} | | | | |")
    if "eval" in only:
        resident_t, loader_t, upload = eval_host_seconds()
        row(
            f"| 2 | evaluation batches: one in-order pass over 1,000 HAM-sized images (256 px, batch 128), no model | "
            f"{resident_t:.3f} s (held on the device; {upload:.2f} s once to put them there) | "
            f"{loader_t:.3f} s (loader, no workers) | | | |"
        )
    if "methods" in only:
        from methods import step_times

        for size, steps in ((48, args.steps_48), (224, args.steps_224)):
            times = step_times(["erm", "reweight", "adversarial", "nir"], steps, args.rounds, None, image_size=size)
            for method, target in (("reweight", 1.03), ("adversarial", 1.10), ("nir", 1.03)):
                r = times[method] / times["erm"]
                row(
                    f"| 3 | methods: {method} training step, {size} px | {times[method] * 1000:.0f} ms | "
                    f"{times['erm'] * 1000:.0f} ms (erm) | {r:.3f}× | ≤ {target}× | {'yes' if r <= target else 'no'} |"
                )
    if "metrics" in only:
        seconds = metrics_time()
        row(
            f"| 4 | metrics: 100,000 predictions, 3 attributes, 1000 bootstrap resamples | {seconds:.2f} s | "
            f"| | < 2 s | {'yes' if seconds < 2 else 'no'} |"
        )
    if "gpu" in only and not torch.cuda.is_available():
        row("| 5 | GPU epoch vs compute-bound limit | skipped: no CUDA | | | ≥ 0.9 | |")
    elif "gpu" in only:
        with tempfile.TemporaryDirectory() as tmp:
            cache = _write_cache(Path(tmp) / "images.npy", 9015, 256)
            for backbone, batch, deterministic in GPU_RUNS:
                h, bare_t = gpu_epoch(cache, 8015, backbone, batch, torch.device("cuda"), deterministic)
                share = bare_t / h["epoch_seconds"]
                kernels = "" if deterministic else ", --no-deterministic"
                row(
                    f"| 5 | GPU epoch: {backbone}, batch {batch}{kernels}, 224 px from a 256 px cache "
                    f"(8,015 train / 1,000 val); {_split_text(h)} | {h['epoch_seconds']:.2f} s | "
                    f"{bare_t:.2f} s (bare loop, resident batches) | {share:.2f} of the limit | ≥ 0.9 | "
                    f"{'yes' if share >= 0.9 else 'no'} |"
                )
    if "memory" in only:
        data_peak, train_peak, cache = peak_memory(args.memory_steps)
        row(
            f"| 6 | memory: peak PSS of the process and its 4 workers during a full pass over a HAM-sized cache "
            f"({cache / 2**30:.2f} GiB on disk) | {data_peak / 2**30:.2f} GiB | {4 * cache / 2**30:.2f} GiB "
            f"(computed: 4 × the cache, if each worker copied it) | | < 3 GB | {'yes' if data_peak < 3e9 else 'no'} |"
        )
        row(
            f"| 6 | memory: the same, then {args.memory_steps} resnet18 training steps at 224 px, batch 64, on the CPU "
            f"(activations in host memory) | {train_peak / 2**30:.2f} GiB | | | | |"
        )
    lines.append("")
    emit(lines, args.append)


if __name__ == "__main__":
    main()
