"""Render the dashboards' panels to PNG from a real Prometheus (no Grafana server needed).

Each dashboard becomes one PNG: every panel's queries are run over the last minutes with
Prometheus's query_range API and plotted in the panel's place.

    python grafana/render.py --prometheus http://127.0.0.1:9090 [--minutes 10] [--out grafana/screenshots]
    python grafana/render.py --demo 3      # start the emulator, the gateway and Prometheus, send
                                           # varied traffic for 3 minutes, then render

Needs matplotlib (pip install -e '.[render]') and, for --demo, Debian's prometheus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent


def render(prometheus: str, minutes: float, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    written = []
    for path in sorted((HERE / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        panels = board["panels"]
        rows = max(p["gridPos"]["y"] // 8 for p in panels) + 1
        fig, axes = plt.subplots(rows, 2, figsize=(14, 3.6 * rows), squeeze=False)
        for ax in axes.flat:
            ax.set_visible(False)
        for panel in panels:
            ax = axes[panel["gridPos"]["y"] // 8][panel["gridPos"]["x"] // 12]
            ax.set_visible(True)
            ax.set_title(panel["title"], fontsize=10)
            for target in panel["targets"]:
                for series in _range(prometheus, target["expr"], start, end, step):
                    xs = [(float(t) - end) / 60 for t, _ in series["values"]]
                    ys = [float(v) for _, v in series["values"]]
                    ax.plot(xs, ys, label=_legend(target.get("legendFormat", ""), series["metric"]))
            ax.set_xlabel("minutes ago", fontsize=8)
            ax.tick_params(labelsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left")
        fig.suptitle(board["title"], fontsize=13)
        fig.tight_layout()
        target = out / f"{path.stem}.png"
        fig.savefig(target, dpi=80)
        plt.close(fig)
        written.append(target)
    return written


def _range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    resp = httpx.get(
        prometheus + "/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=30,
    ).json()
    if resp.get("status") != "success":
        raise RuntimeError(f"{expr}: {resp}")
    return list(resp["data"]["result"])


def _legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt[:50] or "value"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prometheus", help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=10, help="time range to plot")
    parser.add_argument(
        "--demo", type=float, metavar="MINUTES", help="run a demo with this much traffic first"
    )
    parser.add_argument("--out", default=str(HERE / "screenshots"))
    args = parser.parse_args()
    if args.demo:
        sys.path.insert(0, str(HERE.parent))
        from tests.observability import observed_gateway

        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise SystemExit("--demo needs Debian's prometheus (apt-get install -y prometheus)")
        with (
            tempfile.TemporaryDirectory() as tmp,
            observed_gateway(Path(tmp), prometheus, seconds=args.demo * 60, scrape="2s") as (url, _, _),
        ):
            written = render(url, args.demo, Path(args.out))
    elif args.prometheus:
        written = render(args.prometheus, args.minutes, Path(args.out))
    else:
        parser.error("give --prometheus URL or --demo MINUTES")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
