"""The README's Toy2D picture: run ``toy_boost.yaml`` and save the last member's final
``boundary/margins`` image (decision boundary and margin level sets, with and without gaps).

    python experiments/toy_boundary.py     # about 20 s on 2 CPU cores; writes docs/figures/toy_boundary.png

The image is the one the ``DecisionBoundary`` callback logs to TensorBoard, read back from the
events file of ``round_<T>/version_0``, byte for byte.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python experiments/toy_boundary.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "figures" / "toy_boundary.png"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "toy_boost"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lightning_app", "fit", "--config", "toy_boost.yaml",
                        f"--boosting.rounds={args.rounds}", f"--boosting.run_dir={run_dir}"],
                       cwd=tmp, env=env, check=True)
        seconds = time.perf_counter() - started
        events = EventAccumulator(str(run_dir / f"round_{args.rounds}" / "version_0"),
                                  size_guidance={"images": 0}).Reload()
        image = events.Images("boundary/margins")[-1]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(image.encoded_image_string)
    print(f"wrote {out} (round {args.rounds}, step {image.step}; the run took {seconds:.0f} s)")


if __name__ == "__main__":
    main()
