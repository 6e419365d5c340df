"""Headless-Chromium screenshots of TensorBoard's Scalars and HParams tabs for a log directory:
the check that a sweep opens as a researcher expects (runs named by their overrides; train,
val, sanity and perf groups; one HParams table with time, memory and sanity columns).

    python -m theria.train -m algo=fomaml,maml,imaml seed=0,1 task=markov model=transformer \\
        steps=60 eval_every=10 sanity_every=20 val_tasks=8 test_tasks=16 \\
        hydra.sweep.dir=outputs/tb_demo
    python experiments/tensorboard_screenshot.py outputs/tb_demo docs/tensorboard.png

Needs `chromium` on PATH (Debian: apt-get install chromium) and tensorboard. Writes one PNG:
the Scalars tab above the HParams tab, reduced to a 256-colour palette (a few hundred KB).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The Scalars tab filtered to the groups a comparison reads first (TensorBoard orders groups
# alphabetically: hp_metric, imaml, inner, lr, perf, ...), and the HParams table.
TABS = ("scalars&tagFilter=%5E(train%7Cval%7Cperf%7Csanity)%2F", "hparams")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200 and r.read().strip() not in (b"", b"[]"):  # runs loaded
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"TensorBoard listed no runs at {url} in {timeout_s:.0f} s")
        time.sleep(0.5)


def screenshot(logdir: Path, out: Path, width: int = 1400, height: int = 1000,
               budget_ms: int = 20000) -> Path:  # fmt: skip
    """Starts TensorBoard on `logdir`, shoots each tab of TABS with headless Chromium, stacks
    them into `out` (PNG, palette) and stops TensorBoard."""
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    port = _free_port()
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
         "--host", "127.0.0.1", "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(f"{base}/data/runs", 120)
        shots = []
        with tempfile.TemporaryDirectory() as tmp:
            for tab in TABS:
                png = Path(tmp) / f"{tab.split('&')[0]}.png"
                subprocess.run(
                    [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                     "--hide-scrollbars", f"--window-size={width},{height}",
                     f"--virtual-time-budget={budget_ms}", f"--screenshot={png}",
                     f"{base}/#{tab}"],
                    check=True, capture_output=True, timeout=300,
                )  # fmt: skip
                shots.append(Image.open(png).convert("RGB"))
        sheet = Image.new("RGB", (width, sum(s.height for s in shots)), "white")
        y = 0
        for s in shots:
            sheet.paste(s, (0, y))
            y += s.height
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.quantize(colors=256).save(out, optimize=True)
        return out
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logdir", type=Path)
    ap.add_argument("out", type=Path, nargs="?", default=Path("docs/tensorboard.png"))
    args = ap.parse_args()
    out = screenshot(args.logdir, args.out)
    print(f"{out}: {out.stat().st_size / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
