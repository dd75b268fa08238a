"""glibc malloc tuning (``marginboost.tune_malloc``) against glibc's defaults, on CPU.

Each run is a fresh process, with ``MARGINBOOST_MALLOC_TUNING=1`` (what ``lightning fit`` does)
or ``=0`` (glibc's defaults); the two alternate over ``--repeats`` runs. A run times
``--steps`` SGD steps of a ``MarginClassifier`` on random images after ``--warmup`` steps, then
an evaluation pass over ``--eval-images`` images in batches of ``--eval-batch-size``, and reports
wall time, the kernel's share of the CPU time (``sys``: page faults of fresh memory), minor page
faults and the process's peak resident memory. Printed: each side's medians and the ratios
default / tuned of the wall times (above 1: tuning is faster).

    python bench/bench_allocator.py                                  # Fashion-MNIST-sized small_cnn
    python bench/bench_allocator.py --shape 3 32 32 --backbone resnet18 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from marginboost import tune_malloc
    from models import MarginClassifier

    tuned = tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MarginClassifier(num_classes=10, input_shape=tuple(args.shape), backbone=args.backbone,
                             backbone_kwargs={"width": args.width} if args.width else {})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(args.batch_size, *args.shape)
    y = torch.randint(0, 10, (args.batch_size,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def measured(fn, n: int) -> dict:
        before, faults, wall = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(n):
            fn()
        after = os.times()
        return {"wall": time.perf_counter() - wall, "user": after.user - before.user,
                "sys": after.system - before.system,
                "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}

    model.train()
    for _ in range(args.warmup):
        step()
    train = measured(step, args.steps)
    images = torch.randn(args.eval_images, *args.shape)

    def evaluate() -> None:
        with torch.inference_mode():
            for chunk in images.split(args.eval_batch_size):
                model(chunk)

    model.eval()
    evaluate()  # warm-up
    evaluation = measured(evaluate, 2)
    return {"tuned": tuned, "train": train, "eval": evaluation, "threads": torch.get_num_threads(),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_side(args: argparse.Namespace, tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    env["MARGINBOOST_MALLOC_TUNING"] = "1" if tuned else "0"
    argv = [sys.executable, __file__, "--child", *sys.argv[1:]]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--width", type=int, default=8, help="backbone width (0: the backbone's default)")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-images", type=int, default=10_000)
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"machine  : {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"{platform.libc_ver()[0]} {platform.libc_ver()[1]}")
    print(f"settings : {vars(args)}")
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(args.repeats):
        for tuned in (False, True) if r % 2 == 0 else (True, False):
            out = run_side(args, tuned)
            if out["tuned"] != tuned:
                raise SystemExit(f"tuning={tuned} was asked for but the child reports {out['tuned']} "
                                 "(not glibc, or LD_PRELOAD brings another allocator)")
            runs[tuned].append(out)
            print(f"repeat {r}: {'tuned  ' if tuned else 'default'} train {out['train']['wall']:6.2f} s "
                  f"(sys {out['train']['sys']:5.2f} s, {out['train']['faults']:8d} faults)   "
                  f"eval {out['eval']['wall']:6.2f} s (sys {out['eval']['sys']:5.2f} s)   "
                  f"peak RSS {out['max_rss_mb']:6.0f} MB   threads {out['threads']}", flush=True)

    def med(tuned: bool, part: str, key: str) -> float:
        return statistics.median(o[part][key] for o in runs[tuned])

    for part in ("train", "eval"):
        print(f"{part:5s}: default {med(False, part, 'wall'):.2f} s (sys {med(False, part, 'sys'):.2f} s), "
              f"tuned {med(True, part, 'wall'):.2f} s (sys {med(True, part, 'sys'):.2f} s)")
    rss = {t: statistics.median(o["max_rss_mb"] for o in runs[t]) for t in (False, True)}
    print(f"RATIO train wall default/tuned = {med(False, 'train', 'wall') / med(True, 'train', 'wall'):.3f}")
    print(f"RATIO eval  wall default/tuned = {med(False, 'eval', 'wall') / med(True, 'eval', 'wall'):.3f}")
    print(f"RATIO peak RSS tuned/default   = {rss[True] / rss[False]:.3f}")


if __name__ == "__main__":
    main()
