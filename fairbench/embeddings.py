"""Text embeddings of a dataset's finding names, computed once from a local language model.

``fairbench embed-labels <dataset>`` embeds each name in the dataset's ``label_names`` with a
BERT-style model (BioBERT by default): the mean of the last hidden state over every token the
tokenizer produces for the name ([CLS] and [SEP] included, as ``last_hidden_state.mean(1)``
gives). The model is read from a local path or the Hugging Face cache only, never from the
network, so runs stay offline and reproducible. The result is kept next to the prepared
dataset: ``label_embeddings.npy`` (C x E, float32, rows in ``label_names`` order) and
``label_embeddings.json`` (model, label names, shape), written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fairbench.errors import FairbenchError

DEFAULT_MODEL = "dmis-lab/biobert-base-cased-v1.2"
ARRAY = "label_embeddings.npy"
INFO = "label_embeddings.json"
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextmanager
def _offline() -> Iterator[None]:
    """Forbid Hugging Face libraries any network access while the block runs."""
    saved = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(dict.fromkeys(_OFFLINE, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def embed_texts(texts: Sequence[str], model: str = DEFAULT_MODEL) -> np.ndarray:
    """(len(texts), hidden size) float32: mean last hidden state of each text, from a local model."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    with _offline():
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            net = AutoModel.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FairbenchError(
                f"--model {model}: not found locally ({str(exc).splitlines()[0]}); download it once where "
                f"there is a network (e.g. 'hf download {model}') or pass --model the folder of a saved model"
            ) from None
    net.eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            tokens = tokenizer(text, return_tensors="pt")
            rows.append(net(**tokens).last_hidden_state[0].mean(dim=0).float().numpy())
    return np.stack(rows).astype(np.float32)


def write(folder: Path, label_names: Sequence[str], embeddings: np.ndarray, model: str) -> Path:
    """Store ``embeddings`` and their description in ``folder``; each file appears whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {"model": model, "label_names": list(label_names), "shape": list(embeddings.shape)}
    for name, save in (
        (ARRAY, lambda fh: np.save(fh, embeddings)),
        (INFO, lambda fh: fh.write(json.dumps(info, indent=2).encode())),
    ):
        partial = folder / f".{name}.partial"
        try:
            with open(partial, "wb") as fh:
                save(fh)
            partial.replace(folder / name)
        finally:
            partial.unlink(missing_ok=True)
    return folder / ARRAY


def read(path: Path, label_names: Sequence[str]) -> np.ndarray:
    """The (C, E) embeddings in ``path``, checked against the dataset's ``label_names``.

    When the sidecar JSON is there its label names must match; otherwise only the row count is
    checked (a hand-made ``.npy`` passed with ``-o label_embeddings=PATH``).
    """
    if not path.is_file():
        raise FairbenchError(f"{path}: no such file; give a (C, E) .npy array of label embeddings")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise FairbenchError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise FairbenchError(
            f"{path}: label embeddings must be a finite float array of shape (labels, dim), got "
            f"{array.dtype} {array.shape}; recompute them with 'fairbench embed-labels <dataset>'"
        )
    info_path = path.with_suffix(".json")
    if info_path.is_file():
        stored = json.loads(info_path.read_text()).get("label_names")
        if label_names and stored != list(label_names):
            raise FairbenchError(
                f"{info_path}: field label_names {stored} differs from the dataset's {list(label_names)}; "
                "recompute them with 'fairbench embed-labels <dataset>'"
            )
    if label_names and array.shape[0] != len(label_names):
        raise FairbenchError(
            f"{path}: {array.shape[0]} rows but the dataset has {len(label_names)} label names; "
            "give one row per label name, in the dataset's order"
        )
    return array.astype(np.float32)


def embed_dataset(dataset: str, model: str, data_dir: Path) -> Path:
    """Embed dataset ``dataset``'s label names with ``model`` and store them in its data folder."""
    from fairbench import cache, registry

    cls = registry.datasets.get(dataset)
    if not cls.label_names:
        raise FairbenchError(f"dataset '{dataset}' declares no label_names: nothing to embed")
    if not cls().is_prepared(data_dir):
        raise FairbenchError(
            f"dataset '{dataset}' is not prepared in {data_dir}: run "
            f"'fairbench prepare {dataset} --source <download folder>' first"
        )
    embeddings = embed_texts(cls.label_names, model)
    return write(cache.location(data_dir, dataset), cls.label_names, embeddings, model)
