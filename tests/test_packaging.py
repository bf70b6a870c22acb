"""What a user or the ComfyUI registry gets besides the code: registry metadata, LICENSE, icon, the
publish workflow (never run by CI), requirements kept in one place, and install steps without invented
URLs."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser under its PyPI name (a pytest dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "publish_registry.yml"


def registry_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("registry_metadata", ROOT / "tools" / "registry_metadata.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def release_copy(tmp_path: Path) -> Path:
    """The files the registry step reads, as a checkout on the publishing runner has them."""
    for name in ("pyproject.toml", "LICENSE", "icon.png"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_registry_metadata_follows_the_registry_rules() -> None:
    assert registry_tool().problems(ROOT) == []
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "urls" not in data["project"], "no [project.urls] until the repository has a public address"
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    assert "Environment :: GPU :: NVIDIA CUDA" in data["project"]["classifiers"]


def test_license_is_the_full_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}


def test_icon_fits_the_registry_limits() -> None:
    width, height = registry_tool().png_size(ROOT / "icon.png")
    assert 64 <= width <= 800 and 64 <= height <= 400


def test_publish_step_writes_the_urls_of_the_repository_it_runs_in(release_copy: Path) -> None:
    tool = registry_tool()
    assert tool.problems(release_copy, publishing=True) == [
        "[project.urls] Repository is not set (run with --repository)",
        "[tool.comfy] Icon is not the URL of icon.png (run with --raw-base)",
    ]
    rc = tool.main(["--root", str(release_copy), "--repository", "https://example.org/team/fastlora",
                    "--raw-base", "https://files.example.org/team/fastlora/abc123/", "--tag", "v0.1.0"])
    assert rc == 0
    data = tomllib.loads((release_copy / "pyproject.toml").read_text())
    assert data["project"]["urls"] == {"Repository": "https://example.org/team/fastlora"}
    assert data["tool"]["comfy"]["Icon"] == "https://files.example.org/team/fastlora/abc123/icon.png"
    assert data["project"]["dependencies"] == tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["dependencies"], "filling in the URLs changed something else"


def test_publish_step_refuses_a_tag_that_is_not_the_version(release_copy: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    rc = registry_tool().main(["--root", str(release_copy), "--repository", "https://example.org/a/b",
                               "--raw-base", "https://files.example.org/a/b/c", "--tag", "v9.9.9"])
    assert rc == 1 and "tag 'v9.9.9' does not match [project] version" in capsys.readouterr().err


def test_publish_workflow_runs_only_when_maintainers_publish() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"workflow_dispatch", "push"}
    assert triggers["push"] == {"tags": ["v*"]}, "a push to a branch must not publish"
    steps = workflow["jobs"]["publish-node"]["steps"]
    assert any("tools/registry_metadata.py" in step.get("run", "") for step in steps)
    publish = [step for step in steps if step.get("uses", "").startswith("Comfy-Org/publish-node-action@")]
    assert publish and publish[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert ".github" not in (ROOT / ".ci" / "run").read_text()


def test_pyproject_dependencies_are_requirements_txt() -> None:
    """ComfyUI-Manager installs requirements.txt; the registry reads pyproject's list: the same list."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] == requirements


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_install_section_names_no_invented_url() -> None:
    install = readme_section("Install into ComfyUI")
    assert not re.search(r"https?://", install), "the install steps must work from wherever the code came from"
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert f"comfy node install {name}" in install
    assert "requirements.txt" in install and "git clone" in install
    assert "github.com/fastlora" not in (ROOT / "README.md").read_text()


def test_every_library_package_is_installed() -> None:
    """``pip install .`` ships the packages pyproject lists: a subpackage missing there would import in
    a checkout and fail in an installed copy."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastlora_core").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
