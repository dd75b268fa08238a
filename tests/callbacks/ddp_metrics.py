"""Measure margins, width, Hessian trace and eigenvalues with 1 or 2 CPU processes; write the numbers.

    python tests/callbacks/ddp_metrics.py --devices 2 --out DIR

Lightning's DDP launcher re-runs this file for rank 1. No training (``limit_train_batches=0``):
both runs measure the same initial model at fit end and again through ``measure_now`` (the
boosting orchestrator's path). Shards are uneven on purpose: 1347 training objects; margins in
batches of 500 (rank 0 gets 2, rank 1 gets 1), width in 13 full batches of 100 (7 / 6),
Hessian on 3 seeded batches of 100 (2 / 1), and ``collect_margins`` over the DataModule's
DistributedSampler shards, which pad 1347 to 1348.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks import (  # noqa: E402
    GradientNormWidth,
    HessianEigenvalues,
    HessianTrace,
    PerSampleMargins,
    collect_margins,
)
from datamodules import DigitsDataModule  # noqa: E402
from models import MarginClassifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(val_fraction=0.25, batch_size=100, eval_batch_size=500)
    model = MarginClassifier(num_classes=10, input_shape=(1, 8, 8), backbone="small_cnn",
                             backbone_kwargs={"width": 2}, head_seed=0)
    margins = PerSampleMargins(every_n_epochs=None)  # saves under trainer.log_dir (= --out): a broadcast
    width = GradientNormWidth(every_n_epochs=None)
    trace = HessianTrace(every_n_epochs=None, probes=8, num_batches=3, batch_size=100, chunk_size=4)
    eigs = HessianEigenvalues(every_n_epochs=None, k=2, max_iter=12, num_batches=3, batch_size=100)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_epochs=1, limit_train_batches=0, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=args.out, callbacks=[margins, width, trace, eigs])
    trainer.fit(model, dm)
    width_round = width.measure_now(trainer, model, tag="round0")["width"]
    margins.measure_now(trainer, model, tag="round0")
    sampler_margins = collect_margins(model, dm.train_eval_dataloader(), dm.num_train)
    # one batch in all: rank 1 measures nothing and only joins the collectives
    lone = PerSampleMargins(every_n_epochs=None, save=False, batch_size=2000)
    lone.measure_now(trainer, model, tag="lone")
    lone_trace = HessianTrace(every_n_epochs=None, probes=4, num_batches=1, batch_size=100, per_layer=False)
    lone_trace = lone_trace.measure_now(trainer, model, tag="lone")["trace"].value
    if trainer.is_global_zero:
        torch.save(sampler_margins, os.path.join(args.out, "sampler_margins.pt"))
        torch.save(lone.margins, os.path.join(args.out, "lone_margins.pt"))
        fit_end = {h["metric"]: h["value"] for cb in (width, trace, eigs) for h in cb.history if h["tag"] == "fit_end"}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"world_size": trainer.world_size, "lone_trace": lone_trace, "fit_end": fit_end, "width_round0": width_round.value,
                       "margin_files": sorted(os.listdir(os.path.join(args.out, "margins"))),
                       "records": [h for h in trace.history if h["metric"] == "hessian/trace"]}, f, default=str)


if __name__ == "__main__":
    main()
