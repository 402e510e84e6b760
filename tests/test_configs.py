"""Every shipped config parses and validates, and names a known dataset/architecture."""

from pathlib import Path

import pytest

from cafedist.config import load_config
from cafedist.data import DATASETS
from cafedist.models import ARCHS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_issue_configs_exist():
    names = {p.name for p in CONFIGS}
    for want in ("quickstart.yaml", "cifar10_conv3.yaml", "cifar100_resnet18.yaml", "tinyimagenet_resnet18.yaml",
                 "agnews_transformer.yaml"):
        assert want in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.data.dataset in DATASETS
    assert cfg.model.arch in ARCHS


def test_config_reference_documents_every_field():
    import dataclasses

    from cafedist.config import Config

    text = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.type) or isinstance(section.default_factory, type):
            cls = section.default_factory
            for f in dataclasses.fields(cls):
                if f.name != "params":
                    assert f"`{f.name}`" in text, f"{section.name}.{f.name} missing from docs/CONFIG.md"
    from cafedist.algorithms.cafedistill import CAFEDistillParams

    for f in dataclasses.fields(CAFEDistillParams):
        assert f"`{f.name}`" in text, f"algorithm.cafedistill.{f.name} missing from docs/CONFIG.md"


def test_algorithm_reference_is_current():
    from cafedist.algorithms import reference_markdown

    text = (Path(__file__).resolve().parents[1] / "docs" / "ALGORITHMS.md").read_text()
    assert text == reference_markdown(), (
        "docs/ALGORITHMS.md is stale: regenerate it with python -c \"from cafedist.algorithms import "
        "reference_markdown as r; print(r(), end='')\" > docs/ALGORITHMS.md")
