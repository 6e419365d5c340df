"""Where the tests find the real Omniglot zips, and a generator of fake ones.

Real data lookup, first hit wins (the folder must hold images_background_small1.zip):
  1. $THERIA_OMNIGLOT_DIR;
  2. <a>/shared/data/omniglot for <a> = the repository's parent, then each folder above it
     (the project keeps it at ../shared/data/omniglot next to the main checkout; a git
     worktree deeper down finds the same folder).
Without it, the real-data tests skip and say where they looked.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MARKER = "images_background_small1.zip"


def candidate_dirs() -> list[Path]:
    out = []
    if os.environ.get("THERIA_OMNIGLOT_DIR"):
        out.append(Path(os.environ["THERIA_OMNIGLOT_DIR"]))
    out += [a / "shared" / "data" / "omniglot" for a in REPO.parents]
    return out


def omniglot_dir() -> Path | None:
    for d in candidate_dirs():
        if (d / MARKER).is_file():
            return d
    return None


def require_omniglot() -> Path:
    """The real data folder, or a pytest skip naming where it was looked for."""
    d = omniglot_dir()
    if d is None:
        tried = ", ".join(str(p) for p in candidate_dirs()[:3])
        pytest.skip(
            f"real Omniglot not found: no {MARKER} in $THERIA_OMNIGLOT_DIR or "
            f"<parent>/shared/data/omniglot ({tried}, ...); set THERIA_OMNIGLOT_DIR to the folder "
            "holding the official zips"
        )
    return d


def glyph_png(a: int, c: int, k: int, size: int = 105) -> bytes:
    """A black square on white whose position encodes (alphabet a, character c); drawer k
    shifts it by a pixel. 105×105 binary ("1" mode) PNG like the real files."""
    img = Image.new("1", (size, size), 1)
    x0, y0 = 8 + 24 * (c % 4) + k % 2, 8 + 24 * (a % 4)
    img.paste(0, (x0, y0, x0 + 16, y0 + 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path: Path, set_name: str, alphabets: dict[str, int], n_drawers: int = 4,
             offset: int = 0) -> Path:  # fmt: skip
    """<path> in the official layout: <set_name>/<alphabet>/characterNN/<id>_<drawer>.png,
    with directory entries like the real zips. `offset` shifts the (a, c) codes so two sets
    can share or not share images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{set_name}/", "")
        for a, (alphabet, n_chars) in enumerate(alphabets.items()):
            zf.writestr(f"{set_name}/{alphabet}/", "")
            for c in range(n_chars):
                d = f"{set_name}/{alphabet}/character{c + 1:02d}/"
                zf.writestr(d, "")
                for k in range(n_drawers):
                    png = glyph_png(a + offset, c, k)
                    zf.writestr(f"{d}{100 * (a + offset) + c:04d}_{k + 1:02d}.png", png)
    return path


def make_folder(root: Path, alphabets: dict[str, int], n_drawers: int = 4,
                offset: int = 0) -> Path:  # fmt: skip
    """The same content unzipped: <root>/<alphabet>/characterNN/<id>_<drawer>.png."""
    for a, (alphabet, n_chars) in enumerate(alphabets.items()):
        for c in range(n_chars):
            d = root / alphabet / f"character{c + 1:02d}"
            d.mkdir(parents=True)
            for k in range(n_drawers):
                (d / f"{100 * (a + offset) + c:04d}_{k + 1:02d}.png").write_bytes(
                    glyph_png(a + offset, c, k)
                )
    return root
