"""``netvlad import``: the authors' released models and the PyTorch ports' checkpoints as model files of this project.

Formats (``--format auto`` tells them apart by content):

- ``matconvnet``: a MatConvNet SimpleNN network (MAT v5/v7 through scipy, v7.3 through h5py): variable ``net``
  with ``layers`` and ``meta``, or the layers saved as top-level variables (``save -struct``, as the ImageNet
  trunks are). The trunk is built from the file's own layer list (``models.matconvnet``); the head — preL2,
  ``vlad:core`` (2 weights: v1, 3: v2), intranorm, postL2, then optionally WPCA and finalL2 — becomes this
  project's NetVLAD layer and whitening. MATLAB flattens the K×D VLAD matrix D-major (element ``d·K + k``), this
  project cluster-major (``k·D + d``), so the WPCA columns are permuted and the 4096-D output equals MATLAB's. Input:
  RGB 0–255 minus ``meta.normalization.averageImage(1,1,:)``. A file with no head (``imagenet-vgg-verydeep-16.mat``)
  gives a trunk model (cropped at the last conv before the last pooling layer, global max pooling on top) that
  ``sample`` starts from with ``model.trunk.backbone: matconvnet`` and ``model.trunk.weights: <that file>``.
- ``pytorch-netvlad``: Nanne/pytorch-NetVlad ``checkpoint.pth.tar`` / ``model_best.pth.tar`` (+ ``flags.json``
  beside it or one folder up): ``encoder.*`` (VGG16 or AlexNet ``features``), ``pool.centroids``, ``pool.conv.*``;
  ImageNet mean/std.
- ``patchnetvlad``: QVPR/Patch-NetVLAD ``*_WPCA*.pth.tar``: ``{num_pcs, state_dict}`` with the above plus
  ``WPCA.0.weight`` / ``.bias`` (cluster-major); ImageNet mean/std.
- ``openibl``: yxgeee/OpenIBL's torch.hub ``vgg16_netvlad.pth``: ``base_model.base.*``, ``net_vlad.*``,
  ``pca_layer.*``; RGB 0–255 minus the VGG mean.

Checkpoints are read with ``torch.load(weights_only=True)`` only, allowing exactly the numpy globals the old files
pickle (``numpy.core.multiarray.scalar``, ``numpy.dtype``, ``numpy.dtypes.Float64DType``); a pickle that would
call anything else is refused. ``module.`` path components of (Distributed)DataParallel are dropped. Every input is
checked before anything is written; the output is written atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import numpy as np
import torch

from .config import option
from .errors import NetVLADError
from .models.build import ModelConfig, PlaceModel, build_model, save_model

FORMATS = ("matconvnet", "pytorch-netvlad", "patchnetvlad", "openibl")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: OpenIBL's transform: 0–255 RGB minus the VGG mean, written on the 0–1 scale (their hubconf/README values)
OPENIBL_MEAN, OPENIBL_STD = (0.48501960784313836, 0.4579568627450961, 0.4076039215686255), (1 / 255,) * 3
#: The conv layers' indices in torchvision's ``features`` (and the ports' ``encoder``) for each trunk they use
ENCODER_CONVS = {"vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), "alexnet": (0, 3, 6, 8, 10)}
_CHECKPOINT_NAMES = ("checkpoints/model_best.pth.tar", "model_best.pth.tar", "checkpoints/checkpoint.pth.tar",
                     "checkpoint.pth.tar")


@dataclass
class ImportConfig:
    """How ``import`` reads a released model."""

    model_format: str = option("auto", "Source layout: auto (detected from the content), matconvnet, "
                               "pytorch-netvlad, patchnetvlad or openibl.", name="format")
    sha256: str | None = option(None, "Expected sha256 of the source file (checked before anything is read); "
                                "unset: not checked, the digest is printed and recorded.")
    input_height: int | None = option(None, "Height the model's images are resized to; unset: the format's "
                                      "documented size (480, Pittsburgh's native height).")
    input_width: int | None = option(None, "Width the model's images are resized to; unset: the format's "
                                     "documented size (640).")
    download_dir: str | None = option(None, "Folder for downloaded sources (resumed; a cached copy is reused when "
                                      "it matches --sha256, or else when the server says it has not changed); "
                                      "unset: $XDG_CACHE_HOME/netvlad/downloads (~/.cache/...).")

    def validate(self) -> None:
        if self.model_format not in ("auto", *FORMATS):
            raise NetVLADError(f"unknown format {self.model_format!r}; valid: auto, {', '.join(FORMATS)}")
        for key in ("input_height", "input_width"):
            value = getattr(self, key)
            if value is not None and value < 16:
                raise NetVLADError(f"--{key.replace('_', '-')} must be at least 16 pixels, got {value}")
        if self.sha256 is not None:
            from .download import normalise_sha256

            normalise_sha256(self.sha256)


class UnreadableFile(NetVLADError):
    """The source file does not read as a model file of any supported kind (not a readable MAT file or PyTorch
    checkpoint): what a download that went wrong (an error page served with status 200, a transfer cut short)
    looks like."""


@dataclass
class ImportReport:
    """What ``import`` wrote: the model file, the format read, the source file and its sha256, the config."""

    path: Path
    model_format: str
    source: Path
    sha256: str
    config: ModelConfig


# ------------------------------------------------------------------------------------------------ the source


def _default_download_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "netvlad" / "downloads"


def resolve_source(src: str, cfg: ImportConfig, *, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> tuple[Path, str]:
    """``(local file, its sha256)`` for ``src``: an http(s) URL (downloaded, resumably, into the download folder and
    reused from there only while it is current: see :func:`netvlad_core.download.fetch`), a local file, or a folder
    holding one checkpoint (pytorch-NetVlad's run folder: ``checkpoints/model_best.pth.tar`` first). ``cfg.sha256``
    is checked."""
    from .download import fetch, normalise_sha256, public_url, sha256_file
    from .io import require_file

    expected = normalise_sha256(cfg.sha256)
    parsed = urlparse(src)
    if parsed.scheme.lower() in ("http", "https"):
        import hashlib

        name = Path(unquote(parsed.path)).name or "download"
        folder = Path(cfg.download_dir).expanduser() if cfg.download_dir else _default_download_dir()
        dest = folder / f"{hashlib.sha256(src.encode()).hexdigest()[:12]}-{name}"
        note = None if log is None else (lambda line: log(f"import: {line}"))
        return dest, fetch(src, dest, sha256=expected, progress=progress, log=note)
    if len(parsed.scheme) > 1 and parsed.scheme.lower() != "file":
        raise NetVLADError(f"{public_url(src)}: unsupported URL scheme {parsed.scheme!r} (use http, https or a local "
                           f"path)")
    path = Path(unquote(parsed.path) if parsed.scheme.lower() == "file" else src).expanduser()
    if path.is_dir():
        found = [path / n for n in _CHECKPOINT_NAMES if (path / n).is_file()]
        if not found:
            candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".mat", ".pth", ".tar"))
            if len(candidates) != 1:
                raise NetVLADError(f"{path}: a folder without {_CHECKPOINT_NAMES[0]} or a single .mat/.pth file "
                                   f"({len(candidates)} candidates): give the file")
            found = candidates
        path = found[0]
    require_file(path)
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise NetVLADError(f"{path}: sha256 mismatch, expected {expected}, got {digest}")
    return path, digest


def _is_mat_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(128)
    return head.startswith(b"MATLAB")


# ------------------------------------------------------------------------------------------- MAT-file reading


class MatStruct:
    """A MATLAB struct read from a v7.3 (HDF5) file, with the attribute interface of scipy's ``mat_struct``."""

    def __init__(self, fields: dict[str, Any]):
        self._fieldnames = list(fields)
        for key, value in fields.items():
            setattr(self, key, value)


def _h5_value(f, node) -> Any:
    """One MATLAB value of a v7.3 file: arrays in MATLAB's shape, char arrays as a 1-element str array, cells as
    object arrays, structs as :class:`MatStruct`; class objects raise."""
    import h5py

    cls = node.attrs.get("MATLAB_class", b"")
    cls = cls.decode() if isinstance(cls, bytes) else str(cls)
    if isinstance(node, h5py.Group):
        if cls not in ("struct", ""):
            raise NetVLADError(f"a MATLAB {cls} object")
        return MatStruct({key: _h5_value(f, node[key]) for key in node.keys() if not key.startswith("#")})
    if "MATLAB_object_decode" in node.attrs or cls not in ("", "cell", "char", "struct", "logical", "double",
                                                           "single", "int8", "uint8", "int16", "uint16",
                                                           "int32", "uint32", "int64", "uint64"):
        raise NetVLADError(f"a MATLAB {cls or 'opaque'} object")
    if node.attrs.get("MATLAB_empty", 0):
        return np.zeros((0, 0))
    data = node[()]
    if cls == "cell":
        out = np.empty(data.shape[::-1], dtype=object)
        for index in np.ndindex(data.shape):
            try:
                out[index[::-1]] = _h5_value(f, f[data[index]])
            except NetVLADError as e:  # a class object inside a cell: reported by the caller with its position
                out[index[::-1]] = _Opaque(str(e))
        return out
    data = np.asarray(data).T
    if cls == "char":
        return np.array(["".join(chr(c) for c in data.ravel(order="F"))])
    return data


def read_mat(path: Path) -> dict[str, Any]:
    """The variables of a MAT file: v5/v7 through scipy (structs as ``mat_struct``, nothing squeezed: arrays keep
    MATLAB's shapes), v7.3 through h5py in the same form."""
    import scipy.io

    try:
        return scipy.io.loadmat(path, struct_as_record=False, squeeze_me=False, chars_as_strings=True)
    except NotImplementedError:  # "Please use HDF reader for matlab v7.3 files"
        pass
    except Exception as e:  # truncated or corrupt: scipy raises ValueError, TypeError, OSError …
        raise UnreadableFile(f"{path}: not a readable MAT file ({_first_line(e)})") from None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            out = {}
            for key in f.keys():
                if key.startswith("#"):
                    continue
                try:
                    out[key] = _h5_value(f, f[key])
                except NetVLADError as e:
                    out[key] = _Opaque(str(e))
            return out
    except NetVLADError:
        raise
    except Exception as e:
        raise UnreadableFile(f"{path}: not a readable MAT v7.3 file ({_first_line(e)})") from None


class _Opaque:
    def __init__(self, what: str):
        self.what = what


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unwrap(x: Any) -> Any:
    while isinstance(x, np.ndarray) and x.dtype == object and x.size == 1:
        x = x.reshape(-1)[0]
    return x


def _opaque_name(x: Any) -> str | None:
    """The class name of a MATLAB class object that could not be decoded, or None for a plain value."""
    from scipy.io.matlab import MatlabOpaque

    x = _unwrap(x)
    if isinstance(x, _Opaque):
        return x.what
    if isinstance(x, MatlabOpaque) or (isinstance(x, np.ndarray) and x.dtype.names and "s2" in x.dtype.names):
        try:
            return f"MATLAB class {str(np.asarray(x['s2']).ravel()[0])!r} object"
        except Exception:
            return "MATLAB class object"
    return None


def _fields(x: Any) -> list[str]:
    return list(getattr(_unwrap(x), "_fieldnames", None) or [])


def _get(x: Any, name: str, default: Any = None) -> Any:
    x = _unwrap(x)
    return getattr(x, name) if name in _fields(x) else default


def _text(x: Any) -> str:
    x = _unwrap(x)
    if isinstance(x, str):
        return x
    if isinstance(x, np.ndarray) and x.dtype.kind == "U":
        return "".join(str(v) for v in x.ravel())
    return ""


def _numbers(x: Any, what: str) -> np.ndarray:
    x = _unwrap(x)
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise NetVLADError(f"{what}: not numeric") from None
    return arr.ravel(order="F")


def _ints(x: Any, what: str, count: tuple[int, ...]) -> list[int]:
    values = _numbers(x, what)
    # finite and in range before any conversion (int(inf) raises, NaN casts warn)
    if values.size not in count or not np.all(np.isfinite(values)) or not np.all(np.abs(values) <= _MAX_INT) \
            or not np.all(values == np.round(values)):
        raise NetVLADError(f"{what}: expected {' or '.join(map(str, count))} integers, got {values.tolist()}")
    return [int(v) for v in values]


_MAX_INT = 2 ** 31 - 1  # no layer geometry in a real network comes near it; torch's int arguments overflow beyond


def _float32(x: Any, what: str) -> np.ndarray:
    """``x`` as float32, refusing non-numeric values and values that are NaN, infinite or beyond float32's range
    (checked here, where the layer is known, instead of a cast warning and a NaN descriptor later)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.asarray(x).astype(np.float32, copy=False)
    except (TypeError, ValueError):
        raise NetVLADError(f"{what}: not numeric") from None
    if out.dtype.kind != "f" or not np.all(np.isfinite(out)):
        raise NetVLADError(f"{what}: holds NaN or infinite values (or values beyond float32's range)")
    return out


def _cell(x: Any) -> list:
    if isinstance(x, np.ndarray) and x.dtype == object:
        return list(x.ravel(order="F"))
    return [x]


def _array(x: Any, what: str, ndim: int = 4) -> np.ndarray:
    """A weight array in MATLAB's shape, padded with the trailing singleton dimensions MATLAB drops."""
    x = _unwrap(x)
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu" or x.size == 0:
        raise NetVLADError(f"{what}: missing or not a numeric array")
    if x.ndim > ndim:
        raise NetVLADError(f"{what}: {x.ndim}-D array {x.shape}, expected at most {ndim}-D")
    return _float32(x.reshape(x.shape + (1,) * (ndim - x.ndim)), what)


# --------------------------------------------------------------------------------------------- MatConvNet


@dataclass
class _MatLayer:
    index: int
    name: str
    kind: str
    raw: Any

    @property
    def where(self) -> str:
        return f"layer {self.index + 1} ({self.name or self.kind})"


def _mat_network(path: Path) -> tuple[list[_MatLayer], Any]:
    variables = read_mat(path)
    net = variables.get("net")
    if net is not None and _opaque_name(net) is None and "layers" in _fields(net):
        layers, meta = _get(net, "layers"), _get(net, "meta")
        normalization = _get(meta, "normalization") if meta is not None else _get(net, "normalization")
    elif "layers" in variables:  # saved with `save -struct net`: the fields are top-level variables
        layers = variables["layers"]
        meta = variables.get("meta")
        normalization = _get(meta, "normalization") if meta is not None else variables.get("normalization")
    else:
        names = ", ".join(sorted(k for k in variables if not k.startswith("__"))) or "none"
        raise NetVLADError(f"{path}: a MAT file without a MatConvNet network (no variable 'net' with 'layers', "
                           f"no top-level 'layers'; variables: {names})")
    cells = _cell(layers)
    opaque = [(i, _opaque_name(c)) for i, c in enumerate(cells) if _opaque_name(c) is not None]
    if opaque:
        names = ", ".join(f"{i + 1}" for i, _ in opaque)
        raise NetVLADError(f"{path}: layers {names} (1-based) are {opaque[0][1]}s that only MATLAB can read; "
                           f"convert them to structs in MATLAB (for i = 1:numel(net.layers), net.layers{{i}} = "
                           f"struct(net.layers{{i}}(1)); end; save('net_struct.mat', 'net', '-v7') — "
                           f"netvlad_tf_open's net_class2struct.m), as hloc's Pitts30K_struct.mat is")
    out = []
    for i, c in enumerate(cells):
        if not _fields(c):
            raise NetVLADError(f"{path}: layer {i + 1} is not a struct")
        out.append(_MatLayer(i, _text(_get(c, "name", "")), _text(_get(c, "type", "")), _unwrap(c)))
    return out, normalization


def _average_colour(normalization: Any, path: Path, log: Callable[[str], None] | None = None
                    ) -> tuple[float, float, float]:
    """The colour subtracted from the 0–255 input: ``averageImage(1,1,:)``, as the NetVLAD code subtracts it
    (``computeRepresentation.m``: ``im(:,:,c) - net.meta.normalization.averageImage(1,1,c)``), as MatConvNet's
    users commonly do. The caffe-style files store a full H×W×3 mean image whose top-left pixel is not its average
    colour: ``log`` gets one line naming both then."""
    average = _get(normalization, "averageImage") if normalization is not None else None
    if average is None:
        raise NetVLADError(f"{path}: no meta.normalization.averageImage (the input mean the network expects)")
    try:
        arr = np.asarray(_unwrap(average), dtype=np.float64)
    except (TypeError, ValueError):
        raise NetVLADError(f"{path}: averageImage is not numeric") from None
    if not (arr.ndim == 3 and arr.shape[2] == 3) and arr.size != 3:
        raise NetVLADError(f"{path}: averageImage has shape {arr.shape}, expected H×W×3 or 3 values")
    if not np.all(np.isfinite(arr)):
        raise NetVLADError(f"{path}: averageImage holds NaN or infinite values")
    if arr.ndim == 3 and arr.size > 3:
        colour = arr[0, 0, :]
        if log is not None and not np.all(arr == colour):
            mean = arr.mean(axis=(0, 1))
            log(f"import: {path}: averageImage is a {arr.shape[0]}×{arr.shape[1]} mean image, not one colour; the "
                f"input is RGB 0-255 minus its pixel (1,1) = ({', '.join(f'{v:.4f}' for v in colour)}), as the "
                f"NetVLAD code subtracts averageImage(1,1,:), not its average colour "
                f"({', '.join(f'{v:.4f}' for v in mean)})")
    else:
        colour = arr.ravel()
    return tuple(float(v) for v in colour)  # type: ignore[return-value]


def _conv_weights(layer: _MatLayer) -> tuple[np.ndarray, np.ndarray]:
    weights = _get(layer.raw, "weights")
    if weights is not None:
        parts = _cell(weights)
        if len(parts) != 2:
            raise NetVLADError(f"{layer.where}: conv weights must be {{filters, biases}}, got {len(parts)} arrays")
        filters, biases = parts
    else:
        filters, biases = _get(layer.raw, "filters"), _get(layer.raw, "biases")
    w = _array(filters, f"{layer.where}: filters")
    b = _float32(_unwrap(biases), f"{layer.where}: biases").ravel() if biases is not None else np.zeros(0, np.float32)
    if b.size == 0:
        b = np.zeros(w.shape[3], np.float32)
    if b.size != w.shape[3]:
        raise NetVLADError(f"{layer.where}: {b.size} biases for {w.shape[3]} filters")
    return w, b


def _normalize_param(layer: _MatLayer) -> list[float]:
    param = _numbers(_get(layer.raw, "param"), f"{layer.where}: param")
    if param.size != 4 or not np.all(np.isfinite(param)):
        raise NetVLADError(f"{layer.where}: normalize param must be 4 finite numbers [N kappa alpha beta], got "
                           f"{param.tolist()}")
    return [float(v) for v in param]


def _is_l2_normalize(layer: _MatLayer, channels: int) -> bool:
    """A ``normalize`` layer that is an L2 normalisation over all channels: window ≥ 2C − 1, alpha 1, beta 0.5."""
    if layer.kind != "normalize":
        return False
    n, kappa, alpha, beta = _normalize_param(layer)
    return n >= 2 * channels - 1 and alpha == 1 and beta == 0.5 and 0 <= kappa <= 1e-6


_STOP_TYPES = ("softmax", "softmaxloss", "loss", "custom", "pdist")


def _trunk_layers(layers: list[_MatLayer], head_start: int | None, path: Path
                  ) -> tuple[list[dict], dict[str, torch.Tensor], int]:
    """The layer specs and parameters (``features.<index>.*``) of the trunk, and its output channels."""
    end = head_start if head_start is not None else len(layers)
    candidates = layers[:end]
    if head_start is None:  # a trunk-only (classification) network: crop at the last conv before the last pool
        stop = next((i for i, layer in enumerate(candidates) if layer.kind in _STOP_TYPES), len(candidates))
        candidates = candidates[:stop]
        pools = [i for i, layer in enumerate(candidates) if layer.kind == "pool"]
        if pools:
            convs = [i for i, layer in enumerate(candidates[:pools[-1]]) if layer.kind == "conv"]
            if not convs:
                raise NetVLADError(f"{path}: no conv layer before the last pooling layer")
            candidates = candidates[:convs[-1] + 1]
    specs, state, channels = [], {}, 3
    for layer in candidates:
        if layer.kind == "conv":
            w, b = _conv_weights(layer)
            fh, fw, fin, fout = w.shape
            if channels % fin:
                raise NetVLADError(f"{layer.where}: filters take {fin} input channels, the layer before gives "
                                   f"{channels}")
            spec = {"type": "conv", "index": layer.index, "name": layer.name, "in": fin, "out": fout,
                    "kernel": [fh, fw], "groups": channels // fin,
                    "stride": _ints(_get(layer.raw, "stride", 1), f"{layer.where}: stride", (1, 2)),
                    "pad": _ints(_get(layer.raw, "pad", 0), f"{layer.where}: pad", (1, 4)),
                    "dilate": _ints(_get(layer.raw, "dilate", 1), f"{layer.where}: dilate", (1, 2))}
            state[f"features.{layer.index}.weight"] = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
            state[f"features.{layer.index}.bias"] = torch.from_numpy(b.copy())
            channels = fout
        elif layer.kind == "relu":
            leak = _numbers(_get(layer.raw, "leak", 0), f"{layer.where}: leak")
            if leak.size > 1 or not np.all(np.isfinite(leak)):
                raise NetVLADError(f"{layer.where}: leak must be one finite number, got {leak.tolist()}")
            spec = {"type": "relu", "index": layer.index, "name": layer.name,
                    "leak": float(leak[0]) if leak.size else 0.0}
        elif layer.kind == "pool":
            spec = {"type": "pool", "index": layer.index, "name": layer.name,
                    "method": _text(_get(layer.raw, "method", "max")) or "max",
                    "pool": _ints(_get(layer.raw, "pool"), f"{layer.where}: pool", (1, 2)),
                    "stride": _ints(_get(layer.raw, "stride", 1), f"{layer.where}: stride", (1, 2)),
                    "pad": _ints(_get(layer.raw, "pad", 0), f"{layer.where}: pad", (1, 4))}
        elif layer.kind in ("normalize", "lrn"):
            spec = {"type": "lrn", "index": layer.index, "name": layer.name, "param": _normalize_param(layer)}
        elif layer.kind == "dropout":
            continue  # the identity at test time
        else:
            raise NetVLADError(f"{path}: {layer.where}: layer type {layer.kind!r} is not supported in a trunk "
                               f"(conv, relu, pool, normalize, dropout)")
        specs.append(spec)
    if not any(s["type"] == "conv" for s in specs):
        raise NetVLADError(f"{path}: the network has no conv layer before its head")
    from .models.matconvnet import check_layers

    try:
        specs = check_layers(specs)
    except NetVLADError as e:
        raise NetVLADError(f"{path}: {e}") from None
    return specs, state, channels


def _expect(layers: list[_MatLayer], i: int, what: str, ok: bool, path: Path) -> None:
    if not ok:
        got = layers[i].where + f" of type {layers[i].kind!r}" if i < len(layers) else "the end of the layer list"
        raise NetVLADError(f"{path}: expected {what} at layer {i + 1}, got {got}")


def import_matconvnet(path: Path, cfg: ImportConfig, log: Callable[[str], None] | None = None
                      ) -> tuple[PlaceModel, ModelConfig]:
    """The model of a MatConvNet SimpleNN file (see the module docstring)."""
    layers, normalization = _mat_network(path)
    core = next((i for i, layer in enumerate(layers)
                 if layer.kind == "custom" or layer.name.lower().startswith("vlad")), None)
    head_start = None
    if core is not None:
        head_start = core - 1
        _expect(layers, head_start, "the preL2 normalize layer before vlad:core", head_start >= 0
                and layers[head_start].kind == "normalize", path)
    specs, trunk_state, channels = _trunk_layers(layers, head_start, path)
    colour = _average_colour(normalization, path, log)
    model_cfg = ModelConfig(backbone="matconvnet", weights="none", layers=specs, pooling="max",
                            mean=tuple(c / 255.0 for c in colour), std=(1 / 255.0,) * 3,  # 0–255 minus the colour
                            input_height=cfg.input_height or ModelConfig.input_height,
                            input_width=cfg.input_width or ModelConfig.input_width)
    head_state: dict[str, torch.Tensor] = {}
    whitening = None
    if core is not None:
        d = channels
        _expect(layers, head_start, f"an L2 normalisation over the {d} channels (preL2: param [{2 * d} 1e-12 1 0.5])",
                _is_l2_normalize(layers[head_start], d), path)
        vlad = layers[core]
        weights = [_unwrap(w) for w in _cell(_get(vlad.raw, "weights", np.empty((1, 0), dtype=object)))]
        if len(weights) not in (2, 3):
            raise NetVLADError(f"{path}: {vlad.where}: vlad:core needs 2 weights (v1: assignment, −centres) or 3 (v2: "
                               f"assignment, bias, −centres), got {len(weights)}")
        assign = _array(weights[0], f"{path}: {vlad.where}: assignment weights")
        if assign.shape[0] != 1 or assign.shape[1] != 1 or assign.shape[2] != d:
            raise NetVLADError(f"{path}: {vlad.where}: assignment weights have shape {assign.shape}, expected "
                               f"1×1×{d}×K for the trunk's {d} channels")
        k = assign.shape[3]
        centres = _array(weights[-1], f"{path}: {vlad.where}: centres")
        if centres.size != d * k:
            raise NetVLADError(f"{path}: {vlad.where}: {centres.size} centre values, expected D×K = {d}×{k}")
        for key, value in (("K", k), ("D", d)):
            stated = _get(vlad.raw, key)
            said = _numbers(stated, f"{vlad.where}: {key}") if stated is not None else np.zeros(0)
            if said.size and said[0] != value:  # NaN differs from every value: no cast, no warning
                raise NetVLADError(f"{path}: {vlad.where}: says {key} = {said[0]:g}, its weights have {key} = {value}")
        model_cfg = replace(model_cfg, pooling="netvlad", num_clusters=k, vladv2=len(weights) == 3)
        head_state["pool.conv.weight"] = torch.from_numpy(np.ascontiguousarray(
            assign.reshape(d, k, order="F").T))[:, :, None, None]
        head_state["pool.centroids"] = torch.from_numpy(np.ascontiguousarray(-centres.reshape(d, k, order="F").T))
        if len(weights) == 3:
            bias = _float32(weights[1], f"{vlad.where}: assignment biases").ravel()
            if bias.size != k:
                raise NetVLADError(f"{path}: {vlad.where}: {bias.size} assignment biases for K = {k}")
            head_state["pool.conv.bias"] = torch.from_numpy(bias.copy())
        _expect(layers, core + 1, "the intranorm normalize layer", core + 1 < len(layers)
                and _is_l2_normalize(layers[core + 1], d), path)
        _expect(layers, core + 2, "the postL2 layer", core + 2 < len(layers) and layers[core + 2].kind == "custom",
                path)
        rest = layers[core + 3:]
        if rest:
            wpca = rest[0]
            _expect(layers, core + 3, "the WPCA conv layer", wpca.kind == "conv", path)
            u, bias = _conv_weights(wpca)
            if u.shape[:3] != (1, 1, k * d):
                raise NetVLADError(f"{path}: {wpca.where}: WPCA weights have shape {u.shape}, expected 1×1×{k * d}×P "
                                   f"for K·D = {k}·{d}")
            p = u.shape[3]
            # rows of U are D-major (d·K + k); this project's VLAD vector is cluster-major (k·D + d)
            weight = u.reshape(d, k, p).transpose(1, 0, 2).reshape(k * d, p).T
            whitening = (torch.from_numpy(np.ascontiguousarray(weight)), torch.from_numpy(bias.copy()))
            _expect(layers, core + 4, "the finalL2 layer", len(rest) > 1 and rest[1].kind == "custom", path)
            if len(rest) > 2:
                raise NetVLADError(f"{path}: {rest[2].where}: unexpected layer after finalL2")
    return _assemble(model_cfg, {f"backbone.body.{k}": v for k, v in trunk_state.items()} | head_state, whitening,
                     str(path))


# ---------------------------------------------------------------------------------------- PyTorch checkpoints


def _allowed_numpy_globals() -> list:
    """Exactly the numpy globals the old checkpoints pickle (recalls and best_score as numpy.float64)."""
    scalar = np._core.multiarray.scalar
    return [(scalar, "numpy.core.multiarray.scalar"), scalar, np.dtype, np.dtypes.Float64DType]


def read_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with the numpy scalar globals allowed; one line for anything else (in our
    words: torch's advice to load with ``weights_only=False`` is not repeated)."""
    from .io import torch_load_problem

    try:
        with torch.serialization.safe_globals(_allowed_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
        if match:
            raise UnreadableFile(f"{path}: refused: its pickle calls {match.group(1)}, which could run code (only "
                                 f"tensors, containers and numpy scalars are read, torch.load weights_only=True)"
                                 ) from None
        raise UnreadableFile(f"{path}: not a readable PyTorch checkpoint ({torch_load_problem(e, path)})") from None


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise NetVLADError(f"{path}: no state dict in the checkpoint")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise NetVLADError(f"{path}: the state dict holds {type(value).__name__} under {key!r}, not a tensor")
        out[".".join(part for part in key.split(".") if part != "module")] = value.detach().to(
            torch.float32).contiguous()
    return out


def _state_of(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        return _tensor_dict(payload["state_dict"], path)
    return _tensor_dict(payload, path)


def _encoder(state: dict[str, torch.Tensor], prefix: str, arch_hint: str | None, path: Path
             ) -> tuple[str, dict[str, torch.Tensor]]:
    """(vgg16 | alexnet, the ``backbone.body.features.*`` tensors) of the ports' ``<prefix><i>.{weight,bias}``."""
    indices = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", k))})
    arch = next((a for a, convs in ENCODER_CONVS.items() if tuple(indices) == convs), None)
    if arch is None:
        raise NetVLADError(f"{path}: {prefix}* conv layers at {indices}: neither VGG16 {list(ENCODER_CONVS['vgg16'])} "
                           f"nor AlexNet {list(ENCODER_CONVS['alexnet'])} cropped at its last conv")
    if arch_hint is not None and arch_hint != arch:
        raise NetVLADError(f"{path}: flags.json says arch {arch_hint!r}, the encoder's layers are {arch}'s")
    return arch, {f"backbone.body.features.{i}.{p}": state[f"{prefix}{i}.{p}"] for i in indices
                  for p in ("weight", "bias") if f"{prefix}{i}.{p}" in state}


def _netvlad_state(state: dict[str, torch.Tensor], prefix: str, path: Path, dim: int
                   ) -> tuple[int, bool, dict[str, torch.Tensor]]:
    centroids, weight = state.get(f"{prefix}centroids"), state.get(f"{prefix}conv.weight")
    if centroids is None or weight is None:
        raise NetVLADError(f"{path}: no NetVLAD layer ({prefix}centroids and {prefix}conv.weight)")
    if centroids.ndim != 2 or centroids.shape[1] != dim:
        raise NetVLADError(f"{path}: {prefix}centroids has shape {tuple(centroids.shape)}, expected (K, {dim}) for "
                           f"the encoder's {dim} channels")
    k = centroids.shape[0]
    if tuple(weight.shape) != (k, dim, 1, 1):
        raise NetVLADError(f"{path}: {prefix}conv.weight has shape {tuple(weight.shape)}, expected ({k}, {dim}, 1, 1) "
                           f"for K = {k}")
    out = {"pool.centroids": centroids, "pool.conv.weight": weight}
    bias = state.get(f"{prefix}conv.bias")
    if bias is not None:
        if tuple(bias.shape) != (k,):
            raise NetVLADError(f"{path}: {prefix}conv.bias has shape {tuple(bias.shape)}, expected ({k},)")
        out["pool.conv.bias"] = bias
    return k, bias is not None, out


def _pca(state: dict[str, torch.Tensor], prefix: str, path: Path, vlad_dim: int, num_pcs: int | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = state.get(f"{prefix}weight"), state.get(f"{prefix}bias")
    if weight is None or bias is None:
        raise NetVLADError(f"{path}: no PCA layer ({prefix}weight and {prefix}bias)")
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        weight = weight[:, :, 0, 0]
    if weight.ndim != 2 or weight.shape[1] != vlad_dim:
        raise NetVLADError(f"{path}: {prefix}weight has shape {tuple(weight.shape)}, expected (P, {vlad_dim}, 1, 1) "
                           f"for the K·D = {vlad_dim} VLAD vector")
    if tuple(bias.shape) != (weight.shape[0],):
        raise NetVLADError(f"{path}: {prefix}bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if num_pcs is not None and num_pcs != weight.shape[0]:
        raise NetVLADError(f"{path}: num_pcs is {num_pcs} but {prefix}weight has {weight.shape[0]} rows")
    return weight.contiguous(), bias.contiguous()


#: The flags.json keys import reads, with what each must be (pytorch-NetVlad writes its argparse options).
_FLAG_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "num_clusters": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "pooling": ("a string", lambda v: isinstance(v, str)),
    "arch": ("a string", lambda v: isinstance(v, str)),
    "vladv2": ("true or false", lambda v: isinstance(v, bool)),
}


def _flags(path: Path) -> dict:
    """The flags.json beside the checkpoint (or one folder up), its keys that import reads checked for type."""
    for candidate in (path.parent / "flags.json", path.parent.parent / "flags.json"):
        if candidate.is_file():
            def refuse(constant: str):
                raise ValueError(f"{constant} is not a JSON number")

            try:
                flags = json.loads(candidate.read_text(), parse_constant=refuse)
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                raise NetVLADError(f"{path}: its {candidate} is not valid JSON ({_first_line(e)})") from None
            if not isinstance(flags, dict):
                raise NetVLADError(f"{path}: its {candidate} is not a JSON object")
            for key, (what, ok) in _FLAG_TYPES.items():
                if key in flags and not ok(flags[key]):
                    raise NetVLADError(f"{path}: its {candidate} says {key} {json.dumps(flags[key])}; expected "
                                       f"{what}")
            return flags
    return {}


def import_pytorch_netvlad(path: Path, cfg: ImportConfig, payload: Any, *, with_pca: bool
                           ) -> tuple[PlaceModel, ModelConfig]:
    """pytorch-NetVlad (``with_pca=False``, flags.json checked when present) or Patch-NetVLAD (``with_pca=True``)."""
    state = _state_of(payload, path)
    flags = {} if with_pca else _flags(path)
    if flags.get("pooling", "netvlad").lower() != "netvlad":
        raise NetVLADError(f"{path}: flags.json says pooling {flags['pooling']!r}; only NetVLAD models are imported")
    arch, tensors = _encoder(state, "encoder.", flags.get("arch"), path)
    dim = 512 if arch == "vgg16" else 256
    k, v2, pool = _netvlad_state(state, "pool.", path, dim)
    if "num_clusters" in flags and flags["num_clusters"] != k:
        raise NetVLADError(f"{path}: flags.json says num_clusters {flags['num_clusters']}, pool.centroids has K = {k}")
    if "vladv2" in flags and flags["vladv2"] != v2:
        raise NetVLADError(f"{path}: flags.json says vladv2 {flags['vladv2']}, but pool.conv "
                           f"{'has' if v2 else 'has no'} bias")
    whitening = None
    if with_pca:
        num_pcs = payload.get("num_pcs") if isinstance(payload, dict) else None
        if num_pcs is not None and (not isinstance(num_pcs, int) or isinstance(num_pcs, bool)):
            raise NetVLADError(f"{path}: num_pcs must be an integer, got {num_pcs!r}")
        whitening = _pca(state, "WPCA.0.", path, k * dim, num_pcs)
    model_cfg = ModelConfig(backbone=arch, weights="none", num_clusters=k, vladv2=v2, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, input_height=cfg.input_height or ModelConfig.input_height,
                            input_width=cfg.input_width or ModelConfig.input_width)
    return _assemble(model_cfg, tensors | pool, whitening, str(path))


def import_openibl(path: Path, cfg: ImportConfig, payload: Any) -> tuple[PlaceModel, ModelConfig]:
    state = _state_of(payload, path)
    arch, tensors = _encoder(state, "base_model.base.", None, path)
    dim = 512 if arch == "vgg16" else 256
    k, v2, pool = _netvlad_state(state, "net_vlad.", path, dim)
    whitening = _pca(state, "pca_layer.", path, k * dim, None) if "pca_layer.weight" in state else None
    model_cfg = ModelConfig(backbone=arch, weights="none", num_clusters=k, vladv2=v2, mean=OPENIBL_MEAN,
                            std=OPENIBL_STD, input_height=cfg.input_height or ModelConfig.input_height,
                            input_width=cfg.input_width or ModelConfig.input_width)
    return _assemble(model_cfg, tensors | pool, whitening, str(path))


def _assemble(model_cfg: ModelConfig, state: dict[str, torch.Tensor],
              whitening: tuple[torch.Tensor, torch.Tensor] | None, source: str) -> tuple[PlaceModel, ModelConfig]:
    """Build ``model_cfg``'s model and fill it with ``state`` (every key of the model checked) and ``whitening``."""
    from .models.backbones import first_mismatch

    model_cfg.validate()
    model = build_model(model_cfg, load_weights=False, allow_download=False)
    if whitening is not None:
        model.set_whitening(*whitening)
    state = dict(state)
    if whitening is not None:
        state["whitening.weight"], state["whitening.bias"] = whitening
    expected = model.state_dict()
    problem = first_mismatch(expected, state)
    if problem is not None:
        raise NetVLADError(f"{source}: {problem}")
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise NetVLADError(f"{source}: {key} holds NaN or infinite values")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return model.eval(), model_cfg


# ------------------------------------------------------------------------------------------------- detection


def detect_format(path: Path, payload: Any = None) -> str:
    """The format of the file at ``path`` (``payload``: its checkpoint content when already read)."""
    if _is_mat_file(path):
        return "matconvnet"
    from .models.weights import is_model_file

    if payload is None:
        payload = read_checkpoint(path)
    if is_model_file(payload):
        raise NetVLADError(f"{path}: already a model file of this project: use it directly")
    if isinstance(payload, dict) and "num_pcs" in payload and isinstance(payload.get("state_dict"), dict):
        return "patchnetvlad"
    keys = set()
    if isinstance(payload, dict):
        inner = payload.get("state_dict") if isinstance(payload.get("state_dict"), dict) else payload
        keys = {".".join(p for p in str(k).split(".") if p != "module") for k in inner}
    if any(k.startswith("base_model.base.") for k in keys) and any(k.startswith("net_vlad.") for k in keys):
        return "openibl"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("pool.") for k in keys):
        return "patchnetvlad" if any(k.startswith("WPCA.") for k in keys) else "pytorch-netvlad"
    raise UnreadableFile(f"{path}: unknown layout: not a MAT file, and a checkpoint whose keys match none of "
                       f"pytorch-NetVlad (encoder.*, pool.*), Patch-NetVLAD (+ WPCA.0.*, num_pcs) or OpenIBL "
                       f"(base_model.base.*, net_vlad.*, pca_layer.*)")


def import_file(path: Path, cfg: ImportConfig, log: Callable[[str], None] | None = None
                ) -> tuple[PlaceModel, ModelConfig, str]:
    """``(model, config, format)`` of the released model in the local file ``path``. Every error names ``path``
    (a message that does not start with it gets it in front); :class:`UnreadableFile` when the file does not read
    as any supported kind of file."""
    try:
        return _import_file(path, cfg, log)
    except NetVLADError as e:
        if str(e).startswith(str(path)):
            raise
        raise type(e)(f"{path}: {e}") from None


def _import_file(path: Path, cfg: ImportConfig, log: Callable[[str], None] | None) -> tuple[PlaceModel, ModelConfig,
                                                                                           str]:
    fmt = cfg.model_format
    payload = None
    is_mat = _is_mat_file(path)
    if fmt == "auto":
        if not is_mat:
            payload = read_checkpoint(path)
        fmt = detect_format(path, payload)
    if fmt == "matconvnet":
        if not is_mat:
            read_checkpoint(path)  # UnreadableFile when it is not a checkpoint either (e.g. a web page)
            raise NetVLADError(f"{path}: not a MAT file but a PyTorch checkpoint (format matconvnet; try auto)")
        model, model_cfg = import_matconvnet(path, cfg, log)
        return model, model_cfg, fmt
    if is_mat:
        raise NetVLADError(f"{path}: a MAT file, not a {fmt} checkpoint (use --format matconvnet or auto)")
    if payload is None:
        payload = read_checkpoint(path)
    if fmt == "openibl":
        model, model_cfg = import_openibl(path, cfg, payload)
    else:
        model, model_cfg = import_pytorch_netvlad(path, cfg, payload, with_pca=fmt == "patchnetvlad")
    return model, model_cfg, fmt


def import_model(src: str, out: str | os.PathLike, *, cfg: ImportConfig, progress: bool = True,
                 log: Callable[[str], None] = print) -> ImportReport:
    """The ``import`` command: the released model ``src`` (URL, file or folder) as this project's model file ``out``,
    its config recording where it came from (format, name, sha256). Nothing is written unless everything checked."""
    from .download import discard_download, public_url
    from .io import distinct_paths

    cfg.validate()
    if not isinstance(src, str) or not src:
        raise NetVLADError("no source given: a file, a folder or an http(s) URL")
    out = Path(out)
    downloaded = urlparse(src).scheme.lower() in ("http", "https")
    local, digest = resolve_source(src, cfg, progress=progress, log=log)
    distinct_paths({"SRC": local}, {"--out": out})
    try:
        model, model_cfg, fmt = import_file(local, cfg, log)
    except UnreadableFile as e:
        if not downloaded:
            raise
        # an error page served with status 200, a transfer cut short without Content-Length: never a cache entry
        discard_download(local)
        raise NetVLADError(f"{e} (downloaded from {public_url(src)}; the cached copy was discarded)") from None
    name = public_url(src) if downloaded else local.name  # no user:password, no query string (a signature)
    model_cfg = replace(model_cfg, source={"format": fmt, "name": name, "sha256": digest})
    save_model(out, model, model_cfg)
    head = (f"NetVLAD K={model_cfg.num_clusters}{' v2' if model_cfg.vladv2 else ''}, "
            f"{model.out_dim}-D{' whitened' if model.whitening is not None else ''}"
            if model_cfg.pooling == "netvlad" else "trunk only (global max pooling)")
    norm = ("RGB 0-255 minus (" + ", ".join(f"{255 * m:.2f}" for m in model_cfg.mean) + ")"
            if all(abs(s * 255 - 1) < 1e-9 for s in model_cfg.std) else "ImageNet mean/std")
    log(f"import: {fmt} {name} (sha256 {digest}) -> {out}: {model_cfg.backbone}, {head}, input "
        f"{model_cfg.input_width}x{model_cfg.input_height}, {norm}")
    return ImportReport(path=out, model_format=fmt, source=local, sha256=digest, config=model_cfg)
