import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fairbench import embeddings
from fairbench.cli import main
from fairbench.errors import FairbenchError

WORDS = ["lesion", "with", "without", "a", "ring", "glaucoma", "no"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with a 12-token vocabulary saved like a downloaded model (no network)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_embedding_is_the_mean_last_hidden_state_of_the_tokenized_name(tiny_bert):
    from transformers import BertModel, BertTokenizer

    out = embeddings.embed_texts(["lesion with a ring", "glaucoma"], str(tiny_bert))
    assert out.shape == (2, 16) and out.dtype == np.float32
    tokenizer = BertTokenizer.from_pretrained(tiny_bert)
    model = BertModel.from_pretrained(tiny_bert).eval()
    ids = tokenizer("lesion with a ring", return_tensors="pt")
    assert ids["input_ids"].shape[1] == 6  # [CLS] + 4 words + [SEP]
    with torch.no_grad():
        expected = model(**ids).last_hidden_state[0].mean(dim=0).numpy()
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[0], out[1])


def test_the_model_is_read_offline_and_the_environment_is_restored(tiny_bert, monkeypatch):
    seen = {}
    from transformers import AutoModel

    original = AutoModel.from_pretrained

    def spy(*args, **kwargs):
        seen["offline"] = os.environ.get("HF_HUB_OFFLINE")
        seen["local_files_only"] = kwargs.get("local_files_only")
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    embeddings.embed_texts(["glaucoma"], str(tiny_bert))
    assert seen == {"offline": "1", "local_files_only": True}
    assert "HF_HUB_OFFLINE" not in os.environ


def test_embed_labels_command_writes_next_to_the_dataset_and_stridenet_reads_it(tiny_bert, tmp_path):
    from fairbench.datasets.synthetic import Synthetic
    from fairbench.methods.stridenet import label_embeddings_for

    from fairbench.method import TrainInfo

    data = tmp_path / "data"
    out = CliRunner().invoke(main, ["embed-labels", "synthetic", "--model", str(tiny_bert), "--data-dir", str(data)])
    assert out.exit_code == 0, out.output
    array = np.load(data / "synthetic" / "label_embeddings.npy")
    assert array.shape == (2, 16)
    info = json.loads((data / "synthetic" / "label_embeddings.json").read_text())
    assert info == {"model": str(tiny_bert), "label_names": list(Synthetic.label_names), "shape": [2, 16]}
    np.testing.assert_allclose(array, embeddings.embed_texts(Synthetic.label_names, str(tiny_bert)), rtol=1e-6)
    train = TrainInfo(torch.zeros(2), None, (), None, 1, 1, label_names=Synthetic.label_names,
                      data_folder=data / "synthetic")  # fmt: skip
    np.testing.assert_array_equal(label_embeddings_for("auto", train), array)
    assert not list((data / "synthetic").glob(".*partial"))


def test_a_missing_model_is_one_clear_line_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    missing = tmp_path / "no-model"
    out = CliRunner().invoke(main, ["embed-labels", "synthetic", "--model", str(missing), "--data-dir", str(data)])
    assert out.exit_code != 0
    assert out.output.startswith(f"error: --model {missing}: not found locally")
    assert "Traceback" not in out.output
    assert not (data / "synthetic" / "label_embeddings.npy").exists()


def test_an_unprepared_dataset_is_refused_with_the_prepare_command(tiny_bert, tmp_path):
    out = CliRunner().invoke(main, ["embed-labels", "ham10000", "--model", str(tiny_bert), "--data-dir", str(tmp_path)])
    assert out.exit_code != 0
    assert "fairbench prepare ham10000" in out.output


def test_read_checks_the_label_names_and_the_array(tmp_path):
    embeddings.write(tmp_path, ["a", "b"], np.ones((2, 3), dtype=np.float32), "m")
    assert embeddings.read(tmp_path / "label_embeddings.npy", ["a", "b"]).shape == (2, 3)
    with pytest.raises(FairbenchError, match="field label_names"):
        embeddings.read(tmp_path / "label_embeddings.npy", ["b", "a"])
    np.save(tmp_path / "bad.npy", np.array([[1.0, np.nan]]))
    with pytest.raises(FairbenchError, match="finite float array"):
        embeddings.read(tmp_path / "bad.npy", ["a"])
    with pytest.raises(FairbenchError, match="no such file"):
        embeddings.read(tmp_path / "none.npy", ["a"])


def test_every_built_in_dataset_declares_its_label_names():
    from fairbench import registry

    for name in ("synthetic", "ham10000", "oct_rnfl"):
        names = registry.datasets.get(name).label_names
        assert len(names) >= 2 and all(isinstance(n, str) and n for n in names), name
    assert len(registry.datasets.get("ham10000").label_names) == 7
