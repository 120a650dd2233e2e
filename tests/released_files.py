"""Files in the released models' layouts, written from the facts (not by this project's exporter), and independent
forward passes that follow the original code's semantics.

- :func:`write_matconvnet`: a MatConvNet SimpleNN network as MATLAB saves it after ``net_class2struct`` (hloc's
  ``Pitts30K_struct.mat``): ``net.layers`` a 1×N cell of structs (type, name, weights {filters FH×FW×IN×OUT,
  biases}, pad [t b l r], stride, …), ``net.meta.normalization.averageImage`` H×W×3; the VLAD head's layers as the
  authors' ``addLayers.m`` adds them (preL2, vlad:core with {assignment, −centres}, vlad:intranorm, postL2, WPCA,
  finalL2). :func:`matconvnet_forward` walks the same layer list in numpy (H×W×C arrays, ``vl_nnconv`` correlation,
  ``vl_nnpool``, ``vl_nnnormalize`` with its epsilons, D-major flattening).
- :func:`netvlad_port_forward`: the PyTorch ports' NetVLAD forward (residuals broadcast per cluster, as
  pytorch-NetVlad and OpenIBL compute it), on a torchvision VGG16 encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F

VGG_AVERAGE = (122.6778, 116.6522, 103.9997)  # the authors' files store an averageImage like this one


def cell(items) -> np.ndarray:
    out = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def conv_layer(name, fh, fw, fin, fout, rng, *, pad=(1, 1, 1, 1), stride=(1, 1), scale=None, extra=None) -> dict:
    scale = scale if scale is not None else np.sqrt(2.0 / (fh * fw * fin))
    layer = {"name": name, "type": "conv",
             "weights": cell([(rng.standard_normal((fh, fw, fin, fout)) * scale).astype(np.float32),
                              (rng.standard_normal(fout) * 0.1).astype(np.float32)]),
             "size": np.array([fh, fw, fin, fout], dtype=np.float64), "pad": np.array(pad, dtype=np.float64),
             "stride": np.array(stride, dtype=np.float64), "dilate": 1.0, "opts": cell([])}
    layer.update(extra or {})
    return layer


def relu(name) -> dict:
    return {"name": name, "type": "relu", "leak": 0.0}


def pool(name, size=2, stride=2, pad=(0, 0, 0, 0), method="max") -> dict:
    return {"name": name, "type": "pool", "method": method, "pool": np.array([size, size], dtype=np.float64),
            "stride": np.array([stride, stride], dtype=np.float64), "pad": np.array(pad, dtype=np.float64),
            "opts": cell([])}


def normalize(name, param) -> dict:
    return {"name": name, "type": "normalize", "param": np.array(param, dtype=np.float64)}


def custom(name, weights=(), **fields) -> dict:
    return {"name": name, "type": "custom", "weights": cell(list(weights)), "precious": 0.0, **fields}


def vgg_like_trunk(rng, widths=(4, 6, 8), *, swap_relu_pool=True) -> list[dict]:
    """conv-relu-pool blocks, cropped after the last conv (no ReLU), relu→pool pairs swapped as in the authors'
    files (relja_swapLayersForEfficiency)."""
    layers, fin = [], 3
    for b, width in enumerate(widths):
        layers.append(conv_layer(f"conv{b + 1}_1", 3, 3, fin, width, rng))
        fin = width
        if b < len(widths) - 1:
            block = [relu(f"relu{b + 1}_1"), pool(f"pool{b + 1}")]
            layers += block[::-1] if swap_relu_pool else block
    return layers


def vlad_head(rng, d: int, k: int, pca_dim: int | None, *, v2: bool = False) -> list[dict]:
    centres = rng.standard_normal((d, k)).astype(np.float32) * 0.3
    assign = (rng.standard_normal((1, 1, d, k)) * 3).astype(np.float32)
    weights = [assign, -centres.reshape(1, 1, d, k)]
    if v2:
        weights = [assign, (rng.standard_normal((1, k)) * 0.5).astype(np.float32), -centres.reshape(1, 1, d, k)]
    layers = [normalize("preL2", [2 * d, 1e-12, 1, 0.5]),
              custom("vlad:core", weights, K=float(k), D=float(d), vladDim=float(k * d),
                     learningRate=np.array([1.0, 1.0])),
              normalize("vlad:intranorm", [2 * d, 1e-12, 1, 0.5]),
              custom("postL2")]
    if pca_dim is not None:
        u = (rng.standard_normal((1, 1, k * d, pca_dim)) / np.sqrt(k * d)).astype(np.float32)
        layers += [{"name": "WPCA", "type": "conv",
                    "weights": cell([u, (rng.standard_normal(pca_dim) * 0.01).astype(np.float32)]),
                    "pad": 0.0, "stride": 1.0},
                   custom("finalL2")]
    return layers


def write_matconvnet(path: Path, layers: list[dict], *, average=VGG_AVERAGE, top_level: bool = False,
                     image_size=(224, 224, 3), average_image: np.ndarray | None = None) -> Path:
    """Save ``layers`` as a SimpleNN ``net`` (or, with ``top_level``, as ``save -struct`` does: ``layers`` and
    ``meta`` as variables). ``averageImage`` is ``average`` as a constant 2×2×3 image, or ``average_image`` (an
    H×W×3 mean image, as the caffe-style ImageNet files hold)."""
    if average_image is None:
        average_image = np.broadcast_to(np.asarray(average, dtype=np.float32), (2, 2, 3)).copy()
    meta = {"normalization": {"averageImage": average_image, "imageSize": np.array(image_size, dtype=np.float64),
                              "interpolation": "bilinear"}}
    net = {"layers": cell(layers), "meta": meta}
    scipy.io.savemat(path, net if top_level else {"net": net}, do_compression=False)
    return path


# -------------------------------------------------------------------------------------- MATLAB semantics


def _pad4(value):
    v = np.atleast_1d(np.asarray(value, dtype=np.float64)).astype(int)
    return list(v) * 4 if v.size == 1 else list(v)


def _pair(value):
    v = np.atleast_1d(np.asarray(value, dtype=np.float64)).astype(int)
    return [int(v[0])] * 2 if v.size == 1 else [int(v[0]), int(v[1])]


def vl_nnconv(x, w, b, pad, stride):
    """x (H, W, C) float64, w (FH, FW, IN, OUT) (groups = C / IN), correlation, zero padding [t b l r]."""
    t, bo, le, r = pad
    x = np.pad(x, ((t, bo), (le, r), (0, 0)))
    fh, fw, fin, fout = w.shape
    groups = x.shape[2] // fin
    win = np.lib.stride_tricks.sliding_window_view(x, (fh, fw), axis=(0, 1))[::stride[0], ::stride[1]]
    outs = []
    per = fout // groups
    for g in range(groups):
        outs.append(np.einsum("ijcuv,uvco->ijo", win[:, :, g * fin:(g + 1) * fin],
                              w[:, :, :, g * per:(g + 1) * per].astype(np.float64)))
    return np.concatenate(outs, axis=2) + b.astype(np.float64).ravel()


def vl_nnpool(x, size, stride, pad, method):
    t, bo, le, r = pad
    fill = -np.inf if method == "max" else 0.0
    x = np.pad(x, ((t, bo), (le, r), (0, 0)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(x, tuple(size), axis=(0, 1))[::stride[0], ::stride[1]]
    return win.max(axis=(3, 4)) if method == "max" else win.mean(axis=(3, 4))


def vl_nnnormalize(x, param):
    """y_c = x_c (kappa + alpha Σ_{t ∈ G(c)} x_t²)^−beta over the last axis, G(c) = [c − ⌊(N−1)/2⌋, c + ⌈(N−1)/2⌉]."""
    n, kappa, alpha, beta = param
    n = int(n)
    c = x.shape[-1]
    sq = x * x
    out = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - (n - 1) // 2), min(c, ch + (n - 1) - (n - 1) // 2 + 1)
        out[..., ch] = x[..., ch] * (kappa + alpha * sq[..., lo:hi].sum(-1)) ** (-beta)
    return out


def matconvnet_forward(layers: list[dict], image_rgb255: np.ndarray, average=VGG_AVERAGE, *, stop: int | None = None
                       ) -> dict[str, np.ndarray]:
    """Walk ``layers`` over one H×W×3 image (0–255) minus ``average``; returns the trunk output, the 32k-D VLAD
    vector (MATLAB's D-major order) and the final descriptor, as they are present."""
    x = image_rgb255.astype(np.float64) - np.asarray(average, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    k = d = None
    for i, layer in enumerate(layers[:stop]):
        kind, name = layer["type"], layer["name"]
        if kind == "conv" and name != "WPCA":
            w, b = layer["weights"][0, 0], layer["weights"][0, 1]
            x = vl_nnconv(x, w, b, _pad4(layer["pad"]), _pair(layer["stride"]))
            out["trunk"] = x
        elif kind == "dropout":
            continue  # the identity at test time
        elif kind == "relu":
            x = np.maximum(x, 0)
            out["trunk"] = x
        elif kind == "pool":
            x = vl_nnpool(x, _pair(layer["pool"]), _pair(layer["stride"]), _pad4(layer["pad"]), layer["method"])
            out["trunk"] = x
        elif kind == "normalize":
            x = vl_nnnormalize(x, layer["param"])
            if name != "vlad:intranorm" and name != "preL2":
                out["trunk"] = x
        elif name == "vlad:core":
            weights = [np.asarray(w, dtype=np.float64) for w in layer["weights"].ravel()]
            d, k = weights[0].shape[2], weights[0].shape[3]
            feats = x.reshape(-1, d)  # pixels × D (the order of pixels does not matter for the sums)
            scores = feats @ weights[0].reshape(d, k)
            if len(weights) == 3:
                scores = scores + weights[1].reshape(1, k)
            scores = np.exp(scores - scores.max(1, keepdims=True))
            a = scores / scores.sum(1, keepdims=True)  # softmax over K
            neg_centres = weights[-1].reshape(d, k)
            # y(k, :) = Σ_i a_k(x_i) (x_i + weights{2}(:, k)): output 1×K×D
            x = (a.T @ feats + a.sum(0)[:, None] * neg_centres.T)[None]  # (1, K, D)
        elif name == "postL2":
            v = x[0].reshape(-1, order="F")  # vec(1×K×D) column-major: element d·K + k
            x = v / (np.linalg.norm(v) + 1e-12)
            out["vlad"] = x
        elif name == "WPCA":
            u, b = layer["weights"][0, 0], layer["weights"][0, 1]
            x = u.reshape(-1, u.shape[3]).astype(np.float64).T @ x + b.astype(np.float64).ravel()
        elif name == "finalL2":
            x = x / (np.linalg.norm(x) + 1e-12)
            out["final"] = x
        else:
            raise AssertionError(f"layer {i}: {kind} {name}")
    if k is not None:
        out["K"], out["D"] = np.array(k), np.array(d)
    return out


# ---------------------------------------------------------------------------------- the PyTorch ports


def netvlad_port_forward(encoder_state: dict, centroids, conv_weight, image: torch.Tensor, *, conv_bias=None,
                         pca=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pytorch-NetVlad's / OpenIBL's global forward: torchvision VGG16 ``features[:29]`` with ``encoder_state``
    (keys ``<i>.weight``), NetVLAD with residuals broadcast per cluster, intra-norm, flatten cluster-major, L2;
    then ``pca = (weight (P, KD, 1, 1), bias)`` as a 1×1 conv + L2. Returns (vlad, pca output)."""
    from torchvision.models import vgg16

    encoder = torch.nn.Sequential(*list(vgg16(weights=None).features.children())[:-2]).double()
    encoder.load_state_dict({k: v.double() for k, v in encoder_state.items()})
    with torch.no_grad():
        x = encoder(image.double())
        n, c = x.shape[:2]
        x = F.normalize(x, p=2, dim=1)
        soft = F.conv2d(x, conv_weight.double(), None if conv_bias is None else conv_bias.double())
        soft = F.softmax(soft.view(n, centroids.shape[0], -1), dim=1)
        flat = x.view(n, c, -1)
        residual = flat.expand(centroids.shape[0], -1, -1, -1).permute(1, 0, 2, 3) - \
            centroids.double().expand(flat.size(-1), -1, -1).permute(1, 2, 0).unsqueeze(0)
        residual *= soft.unsqueeze(2)
        vlad = residual.sum(dim=-1)
        vlad = F.normalize(vlad, p=2, dim=2).view(n, -1)
        vlad = F.normalize(vlad, p=2, dim=1)
        if pca is None:
            return vlad, None
        y = F.conv2d(vlad.view(n, -1, 1, 1), pca[0].double(), pca[1].double()).view(n, -1)
        return vlad, F.normalize(y, p=2, dim=1)


def write_matconvnet_v73(path: Path, layers: list[dict], *, average=VGG_AVERAGE, class_objects: dict | None = None
                         ) -> Path:
    """The same network as a MAT v7.3 file (HDF5 with MATLAB's 512-byte header, arrays stored transposed, structs as
    groups, cells as datasets of object references, chars as uint16), as MATLAB's ``save -v7.3`` writes it.
    ``class_objects`` ({layer index: class name}) stores those layers as MATLAB class objects (MCOS references,
    ``MATLAB_object_decode``), as the authors' original files hold their custom layers."""
    import h5py

    class_objects = class_objects or {}
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        counter = [0]

        def new_name() -> str:
            counter[0] += 1
            return f"r{counter[0]}"

        def put(parent, name, value):
            if isinstance(value, dict):
                group = parent.create_group(name)
                group.attrs["MATLAB_class"] = np.bytes_("struct")
                for key, item in value.items():
                    put(group, key, item)
                return group
            if isinstance(value, str):
                ds = parent.create_dataset(name, data=np.array([[ord(c)] for c in value], dtype=np.uint16).T.T)
                ds.attrs["MATLAB_class"] = np.bytes_("char")
                return ds
            if isinstance(value, np.ndarray) and value.dtype == object:
                targets = np.empty(value.shape[::-1], dtype=h5py.ref_dtype)
                for index in np.ndindex(value.shape):
                    target = put(refs, new_name(), value[index])
                    targets[index[::-1]] = target.ref
                if value.size == 0:
                    ds = parent.create_dataset(name, data=np.zeros(2, dtype=np.uint64))
                    ds.attrs["MATLAB_class"] = np.bytes_("cell")
                    ds.attrs["MATLAB_empty"] = np.uint8(1)
                    return ds
                ds = parent.create_dataset(name, data=targets)
                ds.attrs["MATLAB_class"] = np.bytes_("cell")
                return ds
            arr = np.asarray(value)
            arr = arr.reshape(1, 1) if arr.ndim == 0 else (arr.reshape(1, -1) if arr.ndim == 1 else arr)
            ds = parent.create_dataset(name, data=arr.T)
            ds.attrs["MATLAB_class"] = np.bytes_("single" if arr.dtype == np.float32 else "double")
            return ds

        cells = np.empty((1, len(layers)), dtype=object)
        for i, layer in enumerate(layers):
            cells[0, i] = layer
        net = f.create_group("net")
        net.attrs["MATLAB_class"] = np.bytes_("struct")
        targets = np.empty((len(layers), 1), dtype=h5py.ref_dtype)
        for i, layer in enumerate(layers):
            if i in class_objects:
                ds = refs.create_dataset(new_name(), data=np.array([[3707764736], [2], [1], [1], [i + 1], [1]],
                                                                   dtype=np.uint32))
                ds.attrs["MATLAB_class"] = np.bytes_(class_objects[i])
                ds.attrs["MATLAB_object_decode"] = np.int32(3)
                targets[i, 0] = ds.ref
            else:
                targets[i, 0] = put(refs, new_name(), layer).ref
        ds = net.create_dataset("layers", data=targets)
        ds.attrs["MATLAB_class"] = np.bytes_("cell")
        average_image = np.broadcast_to(np.asarray(average, dtype=np.float32), (2, 2, 3)).copy()
        put(net, "meta", {"normalization": {"averageImage": average_image}})
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    return path
