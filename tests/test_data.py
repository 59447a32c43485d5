"""Generated corpus, local BPE, cached preparation and batching."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model.corpus import CorpusConfig, build_world, generate_corpus
from model.data import DataConfig, batches, eval_batches, prepare_data

SMALL = CorpusConfig(num_people=30, num_cities=8, num_rivers=4, num_orgs=6, num_documents=300)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory):
    return prepare_data(DataConfig(data_dir=tmp_path_factory.mktemp("data"), vocab_size=600, corpus=SMALL))


def test_corpus_is_deterministic_per_seed() -> None:
    assert generate_corpus(SMALL) == generate_corpus(SMALL)
    assert generate_corpus(SMALL) != generate_corpus(CorpusConfig(**{**SMALL.__dict__, "seed": 1}))


def test_facts_about_a_person_never_change() -> None:
    world = build_world(SMALL)
    born = {person.name: (person.city, str(person.year)) for person in world.people}
    text = " ".join(generate_corpus(SMALL))
    births = re.findall(r"(\w+ \w+) was born in (\w+) in (\d+)\.", text)
    assert len(births) > len(born)  # the sentence is told, and told again: an empty match proves nothing
    for name, city, year in births:
        assert born[name] == (city, year), f"{name} was born in {born[name]}, not {(city, year)}"
    assert {name for name, _, _ in births} == set(born)  # every person's birth is told somewhere


def test_tokenizer_round_trip_and_special_ids(small_data) -> None:
    doc = generate_corpus(SMALL)[5]
    assert small_data.tokenizer.decode(small_data.tokenizer.encode(doc).ids) == doc
    assert (small_data.pad_id, small_data.bos_id, small_data.eos_id) == (0, 1, 2)
    assert small_data.train[0] == small_data.bos_id and small_data.val[-1] == small_data.eos_id


def test_prepared_data_is_cached_and_rebuilt_when_the_config_changes(tmp_path: Path) -> None:
    config = DataConfig(data_dir=tmp_path, vocab_size=600, corpus=SMALL)
    first = prepare_data(config)
    stamp = (tmp_path / "train.npy").stat().st_mtime_ns
    np.testing.assert_array_equal(prepare_data(config).train, first.train)
    assert (tmp_path / "train.npy").stat().st_mtime_ns == stamp
    changed = prepare_data(DataConfig(data_dir=tmp_path, vocab_size=500, corpus=SMALL))
    assert changed.vocab_size == 500


def test_batches_are_shifted_windows_and_deterministic(small_data) -> None:
    x, y = next(batches(small_data.train, 4, 16, seed=0))
    assert x.shape == y.shape == (4, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    x2, _ = next(batches(small_data.train, 4, 16, seed=0))
    np.testing.assert_array_equal(x, x2)


def test_eval_batches_tile_the_validation_split(small_data) -> None:
    assert len(small_data.val) > 4 * 3 * 16  # long enough for all three batches
    evals = eval_batches(small_data.val, 4, 16, max_batches=3)
    assert len(evals) == 3 and all(x.shape == y.shape == (4, 16) for x, y in evals)
    inputs = np.concatenate([x for x, _ in evals]).reshape(-1)
    targets = np.concatenate([y for _, y in evals]).reshape(-1)
    np.testing.assert_array_equal(inputs, small_data.val[: len(inputs)])
    np.testing.assert_array_equal(targets, small_data.val[1 : len(inputs) + 1])  # the next token of each


def test_prepared_files_are_durable_before_meta_marks_them_fresh(tmp_path, monkeypatch) -> None:
    """A crash after meta.json is renamed into place must not leave a cache of empty or torn files
    that later runs trust: each file is closed and fsynced before its rename, meta.json last."""
    import os

    import model.data as data_module

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(data_module.os, "fsync", fsync)
    monkeypatch.setattr(data_module.os, "replace", replace)
    prepare_data(DataConfig(data_dir=tmp_path / "d", vocab_size=600, corpus=SMALL))
    renames = [name for kind, name in events if kind == "replace"]
    assert sorted(renames) == ["meta.json", "tokenizer.json", "train.npy", "val.npy"] and renames[-1] == "meta.json"
    for name in renames:
        at = events.index(("replace", name))
        assert ("fsync", name + ".tmp") in events[:at]  # the data, before the rename
        assert ("fsync", "d") in events[at + 1 :]  # the rename, before anything trusts it
