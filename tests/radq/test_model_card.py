"""Reading model cards: parsed once while unchanged, read again as soon as the file changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from radq.errors import ModelError
from radq.model_card import discover_cards, read_card
from radq.settings import Settings

BUNDLED = Settings().model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models" / "radq-smoke"
    shutil.copytree(BUNDLED / "radq-smoke", target)
    return target


def _rewrite(model_dir: Path, **changes: object) -> None:
    card = model_dir / "model.json"
    data = json.loads(card.read_text())
    data.update(changes)
    card.write_text(json.dumps(data))


def test_an_unchanged_card_is_not_parsed_again(model_dir: Path) -> None:
    assert read_card(model_dir) is read_card(model_dir)
    assert discover_cards(model_dir.parent)["radq-smoke"][1] is read_card(model_dir)


def test_a_changed_card_is_read_again(model_dir: Path) -> None:
    before = read_card(model_dir)
    _rewrite(model_dir, version=before.version + "-next")  # a new size, so a new stamp
    assert read_card(model_dir).version == before.version + "-next"
    _rewrite(model_dir, labels=[])
    with pytest.raises(ModelError, match="labels"):
        read_card(model_dir)
    assert discover_cards(model_dir.parent) == {}  # an invalid card is skipped, not served stale


def test_a_model_folder_added_later_is_found(model_dir: Path) -> None:
    assert list(discover_cards(model_dir.parent)) == ["radq-smoke"]
    shutil.copytree(model_dir, model_dir.parent / "copy")
    _rewrite(model_dir.parent / "copy", name="radq-smoke-copy")
    assert list(discover_cards(model_dir.parent)) == ["radq-smoke-copy", "radq-smoke"]
    (model_dir.parent / "not-a-model.txt").write_text("x")
    assert discover_cards(model_dir.parent / "not-a-model.txt") == {}
    assert discover_cards(model_dir.parent / "missing") == {}
