"""Checks pyproject.toml against the ComfyUI registry's rules and, at publish time, writes in the two
fields that need this repository's public address.

The registry (``comfy node publish``, run by Comfy-Org/publish-node-action) reads ``[project]`` and
``[tool.comfy]``. Two of its fields are URLs: ``[project.urls] Repository`` and ``[tool.comfy] Icon``.
The repository has no public address of its own (we never write one we have not seen), so
.github/workflows/publish_registry.yml calls this with the address of the repository it runs in:

    python tools/registry_metadata.py --check                      # rules only (tests run this)
    python tools/registry_metadata.py --repository URL --raw-base URL [--tag v1.2.3]   # publish step

``--raw-base`` is where the published commit's files are served (for GitHub:
https://raw.githubusercontent.com/OWNER/NAME/COMMIT); Icon becomes ``RAW_BASE/icon.png``. Values already
present in pyproject.toml are kept. Standard library only on Python 3.11+ (tomli on 3.10), so a bare CI
runner can run it.
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser under its PyPI name (a pytest dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
ICON = "icon.png"
ICON_MAX = (800, 400)  # the registry's limit, width x height
# comfy-cli, which publishes, accepts only these; anything else drops the whole field.
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
NODE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")  # no leading/doubled specials
VERSION = re.compile(r"^\d+\.\d+\.\d+$")
COMFY_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG header (raises ValueError for anything but a PNG)."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path.name} is not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def problems(root: Path = ROOT, publishing: bool = False, tag: str | None = None) -> list[str]:
    """Everything in ``root``'s pyproject.toml the registry would refuse or silently drop.

    ``publishing`` also requires the two URL fields (empty in the repository, written by the
    publish workflow); ``tag`` (e.g. ``v1.2.3``) must match the version.
    """
    data = tomllib.loads((root / "pyproject.toml").read_text())
    project, comfy = data.get("project", {}), data.get("tool", {}).get("comfy", {})
    found: list[str] = []
    name, version = project.get("name", ""), project.get("version", "")
    if not (NODE_ID.match(name) and len(name) < 100):
        found.append(f"[project] name {name!r} is not a valid registry node id")
    if not VERSION.match(version):
        found.append(f"[project] version {version!r} is not X.Y.Z")
    if tag is not None and tag.removeprefix("v") != version:
        found.append(f"tag {tag!r} does not match [project] version {version!r}")
    license_text = project.get("license", {}).get("text", "")
    if license_text != "Apache-2.0" or not (root / "LICENSE").read_text().lstrip().startswith("Apache License"):
        found.append("[project] license must be Apache-2.0 with its full text in LICENSE")
    for classifier in project.get("classifiers", []):
        kind, _, value = classifier.partition(" :: ")
        if kind == "Operating System" and not value.startswith(OS_PREFIXES):
            found.append(f"classifier {classifier!r}: the registry knows only {', '.join(OS_PREFIXES)}")
        if kind == "Environment" and value not in ACCELERATORS:
            found.append(f"classifier {classifier!r}: the registry knows only {sorted(ACCELERATORS)}")
    if not comfy.get("PublisherId"):
        found.append("[tool.comfy] PublisherId is empty")
    if not comfy.get("DisplayName"):
        found.append("[tool.comfy] DisplayName is empty")
    requires = comfy.get("requires-comfyui", "")
    if not requires or not all(COMFY_VERSION_PART.match(p.strip()) for p in requires.split(",")):
        found.append(f"[tool.comfy] requires-comfyui {requires!r} is not a version range like '>=0.3.64'")
    try:
        width, height = png_size(root / ICON)
        if width > ICON_MAX[0] or height > ICON_MAX[1]:
            found.append(f"{ICON} is {width}x{height}; the registry allows at most {ICON_MAX[0]}x{ICON_MAX[1]}")
    except (OSError, ValueError) as exc:
        found.append(f"{ICON}: {exc}")
    if publishing:
        if not project.get("urls", {}).get("Repository", "").startswith("https://"):
            found.append("[project.urls] Repository is not set (run with --repository)")
        if not comfy.get("Icon", "").endswith("/" + ICON):
            found.append(f"[tool.comfy] Icon is not the URL of {ICON} (run with --raw-base)")
    return found


def fill_urls(root: Path, repository: str, raw_base: str) -> None:
    """Write ``[project.urls] Repository`` and ``[tool.comfy] Icon`` where they are missing or empty."""
    path = root / "pyproject.toml"
    text = path.read_text()
    data = tomllib.loads(text)
    if not data["project"].get("urls", {}).get("Repository"):
        if "urls" in data["project"]:
            raise SystemExit("pyproject.toml has a [project.urls] table without Repository: add it by hand")
        text = text.replace("\n[tool.comfy]", f'\n[project.urls]\nRepository = "{repository}"\n\n[tool.comfy]', 1)
    if not data["tool"]["comfy"].get("Icon"):
        text, count = re.subn(r'(?m)^Icon = ""', f'Icon = "{raw_base.rstrip("/")}/{ICON}"', text, count=1)
        if count != 1:
            raise SystemExit('pyproject.toml: [tool.comfy] has no `Icon = ""` line to fill in')
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    parser.add_argument("--check", action="store_true", help="only check the rules; change nothing")
    parser.add_argument("--repository", help="public URL of the repository being published")
    parser.add_argument("--raw-base", help="URL under which the published commit's files are served")
    parser.add_argument("--tag", help="the pushed tag (vX.Y.Z) that triggered publishing, if any")
    args = parser.parse_args(argv)
    publishing = not args.check
    if publishing:
        if not (args.repository and args.raw_base):
            parser.error("--repository and --raw-base are needed to publish (or use --check)")
        fill_urls(args.root, args.repository, args.raw_base)
    found = problems(args.root, publishing=publishing, tag=args.tag or None)
    for line in found:
        print(f"registry metadata: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
