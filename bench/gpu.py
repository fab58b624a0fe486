"""``python -m bench.gpu``: the GPU table of issue 17, one run, one table (``bench/gpu.sh``).

Rows (random weights saved locally as each model's "pretrained" base; real CIFAR-10 JPEGs
upsampled to the input size; batch 64, AdamW, cosine, seed 0, same data order):

- full fine-tuning of ResNet-50, the in-tree ViT-B/16 and ``timm/vit_base_patch16_224``,
  zoo against the hand-written loop (``bench.loops.naive_train``: bf16 autocast,
  ``channels_last`` for the convnet, pinned non-blocking copies, no host syncs in an
  epoch), eager and with ``compile=True`` (``torch.compile`` of the model in the hand loop):
  images/s of the steady epochs (the first one, with cuDNN's and the compiler's warm-up,
  left out) and zoo / hand;
- ResNet-50 linear probe at E=10 and partial (``freeze_to="layer3"``) at E=5 against the
  hand loop running the whole network every epoch ("naive"): time from the call's start;
- zoo reading an ImageFolder of JPEGs (decoded as it goes by DataLoader workers) against
  zoo on the same images as in-memory tensors (steady-epoch images/s);
- peak GPU memory (``torch.cuda.max_memory_allocated``) and peak RSS of both sides.

``--tiny`` (for ``--device cpu``): 32 px, a few dozen images, one or two epochs, and
``torch.compile`` disabled (``TORCH_COMPILE_DISABLE=1``: the code path runs, uncompiled),
so the whole table is made in well under a minute; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA_CANDIDATES = (ROOT.parent / "shared" / "data" / "cifar10-small",
                   ROOT / "shared" / "data" / "cifar10-small")
ROW_NAMES = (
    "full resnet50 eager", "full vit_b_16 eager", "full timm-vit-b16 eager",
    "linear_probe resnet50", "partial resnet50", "imagefolder resnet50",
    "full resnet50 compile", "full vit_b_16 compile", "full timm-vit-b16 compile",
)


@dataclass(frozen=True)
class Sizes:
    """Image side, dataset sizes and epochs of one mode (full GPU run or ``--tiny``)."""

    image: int
    full_n: int
    full_epochs: int
    probe_n: int
    probe_epochs: int
    partial_n: int
    partial_epochs: int
    folder_per_class: int
    folder_epochs: int


GPU_SIZES = Sizes(224, 2048, 3, 4096, 10, 1024, 5, 500, 2)
TINY_SIZES = Sizes(32, 16, 2, 16, 2, 16, 2, 2, 2)


def cases(size: int, slim: bool = False) -> dict[str, Any]:
    """The three models as ``bench.common.ModelCase``s at ``size`` px; ``slim`` (``--tiny``)
    keeps each one's layout, layer groups and stages but makes it narrow (ResNet-50 with
    8-wide bottlenecks, both ViTs 32 wide with 2 heads), so a CPU runs the table quickly."""
    import functools

    import zoo
    from bench.common import ModelCase

    vit_kwargs = {} if size == 224 else {"image_size": size}
    timm_kwargs = {} if size == 224 else {"img_size": size}
    resnet: Any = "resnet50"
    vit: Any = "vit_b_16"
    if slim:
        from zoo_resnet.model import Bottleneck, ResNet
        from zoo_vit.model import VisionTransformer

        resnet = dataclasses.replace(zoo.get_backbone("resnet50"), builder=functools.partial(
            ResNet, Bottleneck, [3, 4, 6, 3], width_per_group=8))
        vit = dataclasses.replace(zoo.get_backbone("vit_b_16"), builder=functools.partial(
            VisionTransformer, patch_size=16, num_layers=12, num_heads=2, hidden_dim=32,
            mlp_dim=64))
        timm_kwargs = {**timm_kwargs, "embed_dim": 32, "num_heads": 2}
    return {
        "resnet50": ModelCase("resnet50", resnet, size, partial={"freeze_to": "layer3"},
                              note="in-tree ResNet-50"),
        "vit_b_16": ModelCase("vit_b_16", vit, size, vit_kwargs, convnet=False,
                              note="in-tree ViT-B/16"),
        "timm-vit-b16": ModelCase("timm-vit-b16", "timm/vit_base_patch16_224", size,
                                  timm_kwargs, convnet=False,
                                  note="timm vit_base_patch16_224"),
    }


# --------------------------------------------------------------------------- data


def find_data(given: str | None) -> Path | None:
    """The CIFAR-10 JPEG folder: ``--data``, ``$ZOO_BENCH_DATA``, then ../shared/data or
    shared/data beside the code; None when none exists (synthetic JPEGs are made then)."""
    for candidate in (given, os.environ.get("ZOO_BENCH_DATA"), *DATA_CANDIDATES):
        if candidate and (Path(candidate) / "train").is_dir():
            return Path(candidate)
    return None


def make_folder(source: Path | None, target: Path, size: int, per_class: int) -> str:
    """Write ``target/train/<class>/*.jpg`` (``per_class`` each) and ``target/val/<class>``
    (one each), upsampled to ``size`` px (bicubic, JPEG quality 90). Returns a description."""
    import numpy as np
    from PIL import Image

    jobs: list[tuple[Any, Path]] = []
    if source is not None:
        for split, count in (("train", per_class), ("val", 1)):
            src = source / split if (source / split).is_dir() else source / "test"
            if split == "val" and not src.is_dir():
                src = source / "train"
            for cls in sorted(p.name for p in (source / "train").iterdir() if p.is_dir()):
                files = sorted((src / cls).glob("*.jpg"))[-count:] if split == "val" else \
                    sorted((src / cls).glob("*.jpg"))[:count]
                jobs += [(f, target / split / cls / f.name) for f in files]
        what = f"{source} upsampled to {size} px"
    else:  # no real images here: smooth random pictures, 10 classes of tints
        rng = np.random.default_rng(0)
        for split, count in (("train", per_class), ("val", 1)):
            for cls in range(10):
                for i in range(count):
                    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                    pixels[..., cls % 3] //= 2
                    jobs.append((pixels, target / split / f"c{cls}" / f"{i:04d}.jpg"))
        what = f"synthetic JPEGs ({size} px; cifar10-small not found)"

    def one(job: tuple[Any, Path]) -> None:
        src, dst = job
        image = Image.open(src).convert("RGB") if isinstance(src, Path) else \
            Image.fromarray(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        image.resize((size, size), Image.BICUBIC).save(dst, quality=90)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(one, jobs))
    return what


def decode_folder(split_root: Path) -> tuple[Any, Any]:
    """Every JPEG under ``split_root/<class>/`` as an N x 3 x H x W uint8 tensor and labels
    (classes in sorted order, files in sorted order): the in-memory twin of the folder."""
    import numpy as np
    import torch
    from PIL import Image

    classes = sorted(p.name for p in split_root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((split_root / c).iterdir())]

    def read(path: Path) -> Any:
        return np.asarray(Image.open(path).convert("RGB"))

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(read, [f for f, _ in files]))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    return x, y


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table."""

    name: str
    zoo_ips: float | None = None   # images/s (steady epochs, or N*E / total time)
    ref_ips: float | None = None
    ratio: float | None = None     # zoo / reference (throughput) or naive time / zoo time
    target: float | None = None
    zoo_gpu_mib: float | None = None
    ref_gpu_mib: float | None = None
    zoo_rss_mib: float | None = None
    ref_rss_mib: float | None = None
    note: str = ""

    @property
    def met(self) -> str:
        if self.ratio is None or self.target is None:
            return "-"
        return "met" if self.ratio >= self.target else "MISSED"

    @property
    def memory(self) -> str:
        if not self.zoo_gpu_mib or not self.ref_gpu_mib:
            return "-"
        share = self.zoo_gpu_mib / self.ref_gpu_mib
        return f"{share:.2f}x {'met' if share <= 1.1 else 'MISSED'}"


class Bench:
    """Runs the rows on one device, sharing bases, data and warm-ups between them."""

    def __init__(self, device: str, sizes: Sizes, workdir: Path, folder: Path,
                 x: Any, y: Any, log: Callable[[str], None]) -> None:
        self.device, self.sizes, self.workdir, self.folder = device, sizes, workdir, folder
        self.x, self.y, self.log = x, y, log
        self.cases = cases(sizes.image, slim=sizes is TINY_SIZES)
        self.bases: dict[str, Any] = {}

    def base(self, key: str) -> Any:
        """The model's local random base, made (and warmed up on the device) once."""
        from bench import loops
        from bench.common import local_base

        if key not in self.bases:
            base = local_base(self.cases[key], self.workdir)
            model = base.build(self.device)
            loops.warm_up(model, self.x[:64], base.mean, base.std,
                          channels_last=base.case.convnet)
            del model
            self.bases[key] = base
        return self.bases[key]

    def data(self, n: int) -> Any:
        from bench.common import Data

        n = min(n, len(self.x))
        return Data(self.x[:n], self.y[:n], self.x[:1], self.y[:1])

    def pair(self, key: str, strategy: str, n: int, epochs: int,
             compile: bool = False) -> tuple[Any, Any]:
        """(hand loop result, zoo result) for one model and strategy, hand loop first."""
        from bench.training import Cell, run_naive, run_zoo

        base = self.base(key)
        cell = Cell(key, strategy, n, epochs, ())
        data = self.data(n)
        fresh()
        naive, model = run_naive(base, cell, data, device=self.device, compile=compile)
        del model
        fresh()
        mine, model = run_zoo(base, cell, data, device=self.device, compile=compile)
        del model
        fresh()
        return naive, mine

    def full(self, key: str, compile: bool) -> Row:
        s = self.sizes
        naive, mine = self.pair(key, "full", s.full_n, s.full_epochs, compile)
        n = min(s.full_n, len(self.x))
        row = throughput_row(f"full {key} {'compile' if compile else 'eager'}", n, naive,
                             mine, 0.95)
        if compile:
            row.note = (f"first epoch (compiles) hand {naive.epoch_end_s[0]:.0f} s, "
                        f"zoo {mine.epoch_end_s[0]:.0f} s")
        return row

    def frozen(self, strategy: str, epochs: int, n: int, target: float) -> Row:
        naive, mine = self.pair("resnet50", strategy, n, epochs)
        n = min(n, len(self.x))
        naive_s, mine_s = naive.epoch_end_s[-1], mine.epoch_end_s[-1]
        options = self.cases["resnet50"].partial if strategy == "partial" else {}
        return Row(f"{strategy} resnet50", n * epochs / mine_s, n * epochs / naive_s,
                   naive_s / mine_s, target, *memory(mine, naive),
                   note=f"E={epochs}, N={n}: naive {naive_s:.1f} s, zoo {mine_s:.1f} s from the "
                   f"call's start" + (f"; {options}" if options else ""))

    def imagefolder(self) -> Row:
        """zoo on the JPEG folder (read lazily, as 5,000 images at 224 px are) against zoo
        on the same images decoded into tensors."""
        import zoo.data.imagedata
        from bench.training import Cell, run_zoo

        base = self.base("resnet50")
        epochs = self.sizes.folder_epochs
        cell = Cell("resnet50", "full", len(self.x), epochs, ())
        xv, yv = decode_folder(self.folder / "val")
        fresh()
        memory_row, _ = run_zoo(base, cell, self.data(len(self.x)), device=self.device,
                                val=(xv, yv))
        fresh()
        budget = zoo.data.imagedata.MEMORY_BUDGET
        zoo.data.imagedata.MEMORY_BUDGET = 0  # decode as it goes, whatever the folder's size
        try:
            folder_row, _ = run_zoo(base, cell, None, device=self.device,
                                    train=str(self.folder))
        finally:
            zoo.data.imagedata.MEMORY_BUDGET = budget
        fresh()
        row = throughput_row("imagefolder resnet50", len(self.x), memory_row, folder_row, 0.8)
        pipeline = folder_row.extra.get("input_pipeline") or {}
        row.note = (f"vs in-memory tensors; {pipeline.get('num_workers', '?')} workers, "
                    f"pinned {pipeline.get('pin_memory', '?')}; " + row.note)
        return row


def fresh() -> None:
    """Free what earlier runs left (so peaks start from the same place)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


def memory(mine: Any, ref: Any) -> tuple[float, float, float, float]:
    mib = 1024 * 1024
    return (mine.extra.get("peak_gpu", 0) / mib, ref.extra.get("peak_gpu", 0) / mib,
            mine.peak_rss / mib, ref.peak_rss / mib)


def throughput_row(name: str, n: int, ref: Any, mine: Any, target: float) -> Row:
    """Images/s of the steady epochs (all but the first) of both runs, and their ratio."""
    zoo_ips, ref_ips = n / mine.steady_epoch_s(), n / ref.steady_epoch_s()
    return Row(name, zoo_ips, ref_ips, zoo_ips / ref_ips, target, *memory(mine, ref),
               note=f"{len(mine.epoch_end_s)} epochs of {n}")


def table(rows: list[Row], header: str) -> str:
    from bench.common import table as render

    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [[r.name, num(r.zoo_ips), num(r.ref_ips), num(r.ratio, 2) + ("x" if r.ratio else ""),
              "-" if r.target is None else f">= {r.target:g}", r.met, num(r.zoo_gpu_mib),
              num(r.ref_gpu_mib), r.memory, num(r.zoo_rss_mib), num(r.ref_rss_mib), r.note]
             for r in rows]
    return render(["row", "zoo img/s", "ref img/s", "ratio", "target", "met", "zoo GPU MiB",
                   "ref GPU MiB", "GPU zoo/ref <= 1.1", "zoo RSS MiB", "ref RSS MiB", "note"],
                  lines, header) + (
        "\n  ref: the hand loop (full), the naive hand loop (linear_probe, partial: ratio ="
        "\n  naive time / zoo time from the call's start), zoo on in-memory tensors"
        "\n  (imagefolder). img/s of full and imagefolder rows: steady epochs (all but the"
        "\n  first). GPU MiB: peak torch.cuda.max_memory_allocated above the start of the run.")


# --------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes and no compilation: a smoke run (use with cpu)")
    parser.add_argument("--data", help="the cifar10-small folder (default: $ZOO_BENCH_DATA, "
                        "../shared/data/cifar10-small, shared/data/cifar10-small)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="skip the rows that would not finish within this many seconds "
                        "from the start (default 450: the script must end within 8 minutes)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--workdir", help="for the JPEGs and bases (default: a temp folder)")
    return parser.parse_args(argv)


# (row, seconds it needs left to be worth starting): compiled rows compile twice.
def plan(bench: Bench, sizes: Sizes) -> list[tuple[str, float, Callable[[], Row]]]:
    return [
        (ROW_NAMES[0], 30, lambda: bench.full("resnet50", False)),
        (ROW_NAMES[1], 30, lambda: bench.full("vit_b_16", False)),
        (ROW_NAMES[2], 30, lambda: bench.full("timm-vit-b16", False)),
        (ROW_NAMES[3], 30, lambda: bench.frozen("linear_probe", sizes.probe_epochs,
                                                sizes.probe_n, 0.8 * sizes.probe_epochs)),
        (ROW_NAMES[4], 30, lambda: bench.frozen("partial", sizes.partial_epochs,
                                                sizes.partial_n, 1.3)),
        (ROW_NAMES[5], 30, bench.imagefolder),
        (ROW_NAMES[6], 100, lambda: bench.full("resnet50", True)),
        (ROW_NAMES[7], 100, lambda: bench.full("vit_b_16", True)),
        (ROW_NAMES[8], 100, lambda: bench.full("timm-vit-b16", True)),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    if args.tiny:  # the compile=True path runs, torch.compile returns the model unchanged
        os.environ["TORCH_COMPILE_DISABLE"] = "1"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="zoo-gpu-bench-"))
    os.environ.setdefault("ZOO_HOME", str(workdir / "zoo-home"))
    import torch

    from bench.common import gpu_info, machine

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.sh: --device cuda but torch sees no CUDA device; on a machine "
              "without one use --device cpu --tiny", file=sys.stderr)
        return 2
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    if args.tiny:  # tiny tensors: one thread is faster than OpenMP spinning on a busy CPU
        torch.set_num_threads(1)
    info = {**machine(args.device), **gpu_info(args.device)}
    where = info.get("gpu") or info["cpu"]
    print(f"zoo GPU bench on {args.device}: {where}; torch {info['torch']}"
          f"{', CUDA ' + str(info.get('cuda')) if 'gpu' in info else ''}", flush=True)
    source = find_data(args.data)
    folder = workdir / "imagefolder"
    what = make_folder(source, folder, sizes.image, sizes.folder_per_class)
    x, y = decode_folder(folder / "train")
    print(f"data: {len(x)} training images, {what} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    bench = Bench(args.device, sizes, workdir, folder, x, y, print)
    import gc
    import importlib

    for module in ("torch._dynamo", "timm", "zoo.training.runner"):  # imported before the clock
        importlib.import_module(module)
    gc.freeze()  # later collections (between runs) skip the imported modules' objects
    rows: list[Row] = []
    for name, needs, make in plan(bench, sizes):
        elapsed = time.perf_counter() - started
        if not args.tiny and elapsed + needs > args.budget_s:
            rows.append(Row(name, note=f"skipped: {elapsed:.0f} s gone of the "
                            f"{args.budget_s:.0f} s budget"))
        else:
            try:
                rows.append(make())
            except Exception as exc:  # one failing row must not cost the others
                traceback.print_exc()
                text = str(exc).splitlines()[0][:120] if str(exc) else ""
                rows.append(Row(name, note=f"error: {type(exc).__name__}: {text}"))
        print(f"  {rows[-1].name}: {rows[-1].note} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    header = (f"zoo vs hand-written loops on {where} ({args.device}"
              f"{', --tiny: slim models, numbers mean nothing' if args.tiny else ''}), "
              f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s")
    print("\n" + table(rows, header), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "data": what, "rows": [
            {**dataclasses.asdict(r), "met": r.met, "memory": r.memory} for r in rows]},
            indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
