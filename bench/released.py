"""Importing a full-size released model: a MatConvNet SimpleNN struct file with the authors' VGG16 widths, K = 64 and
the 32,768 → 4096 WPCA (random weights, written in the layout of hloc's ``Pitts30K_struct.mat``, about 600 MB).

Reports the file size, the time and peak memory of ``netvlad import`` (a child process, so its RSS is its own),
the imported model's descriptor of a real image against the numpy walk of the file's layers (MATLAB semantics,
tests/released_files.py) and the ONNX export's largest |onnxruntime − PyTorch|.

Run: ``python -m bench released`` or ``python -m bench.released [--height 96 --width 128]``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from netvlad_core.datasets.images import load_image
from netvlad_core.export import export_onnx
from netvlad_core.models import load_model

VGG16_WIDTHS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]


def vgg16_struct_layers(rng: np.random.Generator, k: int = 64, pca_dim: int = 4096) -> list[dict]:
    """The authors' VGG16 layer list (conv5_3 crop, relu→pool pairs swapped) with the VLAD head and WPCA."""
    from tests import released_files as rf

    layers, fin = [], 3
    for block, (width, convs) in enumerate(VGG16_WIDTHS):
        for c in range(convs):
            layers.append(rf.conv_layer(f"conv{block + 1}_{c + 1}", 3, 3, fin, width, rng))
            fin = width
            last = block == len(VGG16_WIDTHS) - 1 and c == convs - 1
            if not last and c < convs - 1:
                layers.append(rf.relu(f"relu{block + 1}_{c + 1}"))
        if block < len(VGG16_WIDTHS) - 1:
            layers += [rf.pool(f"pool{block + 1}"), rf.relu(f"relu{block + 1}_{convs}")]
    assert len(layers) == 29
    return layers + rf.vlad_head(rng, 512, k, pca_dim)


def main(argv: list[str] | None = None) -> None:
    from tests import released_files as rf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=96, help="input height of the check (the import is size-free)")
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args(argv or [])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        layers = vgg16_struct_layers(rng)
        t0 = time.perf_counter()
        src = rf.write_matconvnet(tmp / "vd16_pitts30k_struct.mat", layers)
        written = time.perf_counter() - t0
        out = tmp / "model.pt"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "stages.cli", "import", str(src), "--out", str(out),
                               "--no-progress", "--input-height", str(args.height), "--input-width",
                               str(args.width)], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"import failed: {proc.stderr.strip()}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"struct file {src.stat().st_size / 2**20:.0f} MB (VGG16 conv1_1..conv5_3, K=64, WPCA 32768->4096; "
              f"written in {written:.1f} s)")
        print(f"netvlad import: {seconds:.1f} s wall (process start included), peak RSS {peak_mb:.0f} MB, "
              f"model file {out.stat().st_size / 2**20:.0f} MB")
        print(f"  {proc.stdout.strip()}")

        from PIL import Image

        image = tmp / "img.png"
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((args.width, args.height), Image.BILINEAR).save(image)
        model, cfg = load_model(out)
        x = load_image(image, cfg.input_height, cfg.input_width, cfg.mean, cfg.std)[None]
        with torch.no_grad():
            ours = model(x)[0].numpy()
        t0 = time.perf_counter()
        ref = rf.matconvnet_forward(layers, np.asarray(Image.open(image).convert("RGB")))
        print(f"4096-D descriptor of a {args.width}x{args.height} image vs the numpy walk of the file's layers "
              f"({time.perf_counter() - t0:.0f} s): max |diff| = {np.abs(ours - ref['final']).max():.2e}")
        t0 = time.perf_counter()
        report = export_onnx(model, cfg, tmp / "model.onnx", check_batch=2)
        print(f"ONNX export + onnxruntime check: {time.perf_counter() - t0:.1f} s, max |onnxruntime - pytorch| = "
              f"{report.max_abs_diff:.2e} ({(tmp / 'model.onnx').stat().st_size / 2**20:.0f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
