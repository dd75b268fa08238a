"""Train a Bezier curve with 2 CPU processes (DDP, gloo); every rank writes what it ended with.

    python tests/models/connectivity/ddp_curve.py --out DIR

Lightning's DDP launcher re-runs this file for rank 1. Endpoints are two small MLP
``MarginClassifier`` checkpoints written by rank 0 before the fit (rank 1 waits for them).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules import DigitsDataModule  # noqa: E402
from models import CurveClassifier, MarginClassifier  # noqa: E402
from models.connectivity import evaluate_point  # noqa: E402


def endpoints(out: str) -> tuple[str, str]:
    paths = [os.path.join(out, f"end{i}.ckpt") for i in (0, 1)]
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for seed, path in enumerate(paths):
            torch.manual_seed(seed)
            m = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="mlp",
                                 backbone_kwargs={"width": 12, "depth": 1}, head_seed=seed)
            tmp = path + ".tmp"
            torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, tmp)
            os.replace(tmp, path)
    while not all(os.path.exists(p) for p in paths):
        time.sleep(0.1)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    a, b = endpoints(args.out)
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, eval_batch_size=200, augment=False)
    model = CurveClassifier(a, b, curve="bezier", num_bends=1, val_t=[0.5], grid_points=3, bn_batches=2,
                            num_classes=10, input_shape=[1, 8, 8])
    init = [p.detach().clone() for p in model.curve.bends]
    drawn = []
    original = model.sample_t
    model.sample_t = lambda: drawn.append(original()) or drawn[-1]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=args.out)
    trainer.fit(model, dm)
    rank = trainer.global_rank
    dm.setup("fit")
    model.eval()
    buffers = model._buffers_at(0.5)  # the same reset the validation used
    full = evaluate_point(model, {n: p.detach() for n, p in model.curve.point(0.5).items()}, dm.val_dataloader(),
                          buffers)
    torch.save([p.detach() for p in model.curve.bends], os.path.join(args.out, f"bends{rank}.pt"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.world_size, "t": drawn,
                   "moved": max(float((p - q).abs().max()) for p, q in zip(model.curve.bends, init)),
                   "logged_val_acc": float(trainer.callback_metrics["val/acc_t0.50"]),
                   "full_val_acc": full["acc"], "num_val": len(dm.val_dataloader().dataset)}, f)


if __name__ == "__main__":
    main()
