"""benchmarks/bench_accuracy.py: the Mask R-CNN adapter's contract and the report table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pep_model import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_accuracy")


def _target(n_boxes: int, crowd_last: bool) -> dict:
    masks = torch.zeros(n_boxes, 64, 64, dtype=torch.uint8)
    boxes = []
    for i in range(n_boxes):
        masks[i, 8 * i : 8 * i + 20, 10:40] = 1
        boxes.append([10.0, 8.0 * i, 40.0, 8.0 * i + 20])
    boxes.append([5.0, 5.0, 5.0, 30.0])  # degenerate: zero width
    masks = torch.cat([masks, torch.zeros(1, 64, 64, dtype=torch.uint8)])
    crowd = torch.zeros(n_boxes + 1, dtype=torch.bool)
    crowd[n_boxes - 1] = crowd_last
    return {
        "labels": torch.ones(n_boxes + 1, dtype=torch.int64),
        "boxes": torch.tensor(boxes),
        "masks": masks,
        "iscrowd": crowd,
    }


@pytest.mark.parametrize("width", ["matched", "torchvision"])
def test_mask_rcnn_adapter_trains_and_predicts_like_pep(bench, width):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_classes=2"])
    torch.manual_seed(0)
    model = bench.MaskRCNNAdapter(cfg, max_dets=7, width=width)
    # matched: FPN and heads as wide as PEP's (tiny: 64); torchvision: its own 256
    fpn = cfg.model.fpn_channels if width == "matched" else 256
    assert model.model.backbone.out_channels == fpn
    assert model.model.roi_heads.mask_predictor.conv5_mask.out_channels == fpn
    assert model.model.roi_heads.box_predictor.cls_score.in_features == 4 * fpn
    # anchors scale with the config's object scales (tiny: 48 / 96 -> 16..256)
    assert model.anchor_sizes == [16, 32, 64, 128, 256]
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    losses = model.train()(images, [_target(3, True), _target(2, False)])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())

    model.eval()
    model.model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        preds = model(images)
    for pred in preds:
        assert pred["masks"].dtype == torch.bool and pred["masks"].shape[1:] == (64, 64)
        assert len(pred["labels"]) == len(pred["scores"]) == len(pred["masks"]) <= 7


def test_table_shows_mean_and_spread_over_seeds_and_na_for_missing_sizes(bench):
    def run(model, seed, ap):
        metrics = {k: ap for k in bench.COLUMNS}
        metrics["segm/APl"] = -1.0  # no large objects in the val split
        return {
            "model": model,
            "seed": seed,
            "metrics": metrics,
            "train_s": 10.0 * seed,
            "infer_ms": 5.0,
            "params_m": 11.7,
        }

    text = bench.table(
        [run("pep", 1, 0.30), run("pep", 2, 0.40), run("maskrcnn", 1, 0.2)],
        ["pep", "maskrcnn"],
        100,
        "Mask R-CNN (torchvision, 64-wide)",
    )
    pep_row = next(line for line in text.splitlines() if line.startswith("| PEP (both)"))
    assert "| 1,2 | 0.350 ± 0.071 |" in pep_row and "| n/a |" in pep_row
    assert "| 15 ± 7 |" in pep_row
    assert "| Mask R-CNN (torchvision, 64-wide) | 1 | 0.200 |" in text

    # a raised detection limit: every AP column is read at it
    raised = [run("pep", 1, 0.30)]
    raised[0]["metrics"] = {k + "@400": 0.5 for k in bench.COLUMNS} | raised[0]["metrics"]
    text = bench.table(raised, ["pep"], 400)
    assert text.splitlines()[0].startswith("| model | seeds | segm/AP@400 | segm/AP50@400 |")
    assert "| PEP (both) | 1 | 0.500 | 0.500 | 0.500 |" in text


def test_recall_table_reads_visibility_bins_and_counts_at_the_detection_limit(bench):
    def run(model, seed, lo, suffix=""):
        metrics = {
            f"segm/R50{suffix}": 0.5, f"segm/R50_vis_hi{suffix}": 0.6,
            f"segm/R50_vis_mid{suffix}": 0.4, f"segm/R50_vis_lo{suffix}": lo,
            "segm/n_vis_hi": 238.0, "segm/n_vis_mid": 53.0, "segm/n_vis_lo": 24.0,
            "segm/duplicates_per_img_thr0.3": 0.25 * seed, "segm/false_merges_per_img_thr0.3": 0.1,
        }  # fmt: skip
        return {"model": model, "seed": seed, "metrics": metrics}

    text = bench.recall_table(
        [run("pep", 1, 0.1), run("pep", 2, 0.3), run("maskrcnn", 1, 0.2)], ["pep", "maskrcnn"], 100
    )
    lines = text.splitlines()
    assert lines[0] == (
        "| model | seeds | R50 | vis>0.9 (n=238) | vis 0.5-0.9 (n=53) | vis<0.5 (n=24) "
        "| duplicates/img | false merges/img |"
    )
    assert lines[2] == (
        "| PEP (both) | 1,2 | 0.500 ± 0.000 | 0.600 ± 0.000 | 0.400 ± 0.000 | 0.200 ± 0.141 "
        "| 0.38 ± 0.18 | 0.10 ± 0.00 |"
    )
    assert lines[3].startswith("| Mask R-CNN | 1 | 0.500 |")
    raised = bench.recall_table([run("pep", 1, 0.1, suffix="@400")], ["pep"], 400)
    assert "| R50@400 | vis>0.9@400 (n=238) |" in raised
    assert "| PEP (both) | 1 | 0.500 | 0.600 | 0.400 | 0.100 | 0.25 | 0.10 |" in raised


def test_report_reprints_the_tables_and_loss_terms_of_a_saved_run(bench, tmp_path, capsys):
    def run(model, seed, ap, loss):
        return {
            "model": model,
            "seed": seed,
            "metrics": {k: ap for k in bench.COLUMNS},
            "train_s": 10.0,
            "infer_ms": 5.0,
            "params_m": 11.7,
            "losses": [{"loss": 2 * loss, "loss_mask": loss}, {"loss": loss, "loss_mask": 0.5}],
        }

    saved = tmp_path / "results.json"
    saved.write_text(
        json.dumps(
            {
                "args": {"max_dets": 100},
                "maskrcnn_label": "Mask R-CNN (torchvision, 64-wide)",
                "runs": [
                    run("pep", 1, 0.1, 1.0),
                    run("pep", 2, 0.3, 3.0),
                    run("maskrcnn", 1, 0.2, 4.0),
                ],
            }
        )
    )
    bench.main(bench.get_args_parser().parse_args(["--report", str(saved)]))
    out = capsys.readouterr().out
    _assert_report(out)

    # the same runs split over two --out files (a run continued with --models / --seeds)
    whole = json.loads(saved.read_text())
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(
        json.dumps({**whole, "args": {"max_dets": 100, "seeds": [1, 2]}, "runs": whole["runs"][:2]})
    )
    second.write_text(
        json.dumps({**whole, "args": {"max_dets": 100, "seeds": [1]}, "runs": whole["runs"][2:]})
    )
    bench.main(bench.get_args_parser().parse_args(["--report", str(first), str(second)]))
    _assert_report(capsys.readouterr().out)

    with pytest.raises(SystemExit, match="pep seed 1 is in both"):
        bench.main(bench.get_args_parser().parse_args(["--report", str(first), str(saved)]))
    second.write_text(json.dumps({**whole, "args": {"max_dets": 400}, "runs": []}))
    with pytest.raises(SystemExit, match="differ in max_dets"):
        bench.main(bench.get_args_parser().parse_args(["--report", str(first), str(second)]))


def _assert_report(out: str) -> None:
    assert "| PEP (both) | 1,2 | 0.200 ± 0.141 |" in out
    # files from before recall by visibility: its table is there, every cell n/a
    assert "| model | seeds | R50 | vis>0.9 | vis 0.5-0.9 | vis<0.5 |" in out
    assert "| PEP (both) | 1,2 | n/a | n/a | n/a | n/a | n/a | n/a |" in out
    assert "| Mask R-CNN (torchvision, 64-wide) | 1 | 0.200 |" in out
    # first / last epoch, mean over seeds: pep loss (2+6)/2 -> (1+3)/2, loss_mask 2 -> 0.5
    assert "| pep | loss | 4.000 | 2.000 |" in out and "| pep | loss_mask | 2.000 | 0.500 |" in out
    assert "| maskrcnn | loss_mask | 4.000 | 0.500 |" in out


def test_save_dir_writes_pep_checkpoints_that_load_and_score_the_same(
    bench, tiny_shards, tiny_overrides, tmp_path, capsys
):
    from pep_model import load_checkpoint
    from pipeline import experiment

    out, save_dir = tmp_path / "results.json", tmp_path / "models"
    argv = ["--data", str(tiny_shards), "--work-dir", str(tmp_path), "--models", "baseline"]
    argv += ["--seeds", "1", "--epochs", "1", "--threads", "1", "--out", str(out)]
    argv += ["--save-dir", str(save_dir)]
    for override in tiny_overrides:
        argv += ["--set", override]
    bench.main(bench.get_args_parser().parse_args(argv))
    capsys.readouterr()

    assert sorted(p.name for p in save_dir.iterdir()) == ["baseline-seed1.pt"]
    model, cfg = load_checkpoint(save_dir / "baseline-seed1.pt")
    assert (cfg.model.excavate, cfg.model.purify) == (False, False)
    torch.manual_seed(1)  # the untrained model of that run: the saved weights are trained ones
    untrained = bench.build("baseline", cfg, 100, "matched").state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, untrained[k])]
    assert any(k.startswith("mask_feature.") for k in changed)
    splits = experiment.resolve_data(str(tiny_shards), cfg, tmp_path)
    metrics, _ = bench.evaluate_model(model, splits, 100)
    (run,) = json.loads(out.read_text())["runs"]
    assert metrics["segm/AP"] == pytest.approx(run["metrics"]["segm/AP"], abs=1e-9)
    # the val ground truth is the generator's annotations.json: every object has a visibility
    gt = json.loads(Path(splits.val_annotations).read_text())["annotations"]
    bins = [run["metrics"][f"segm/n_vis_{b}"] for b in ("hi", "mid", "lo")]
    assert sum(bins) == sum(not a["iscrowd"] for a in gt) > 0
    assert 0.0 <= run["metrics"]["segm/R50_vis_hi"] <= 1.0


def test_budget_plans_whole_epochs_and_keeps_the_schedule_shape(bench):
    assert bench.budget_epochs(100.0, 24.0) == 4
    assert bench.budget_epochs(400.0, 57.2) == 7  # 6.99 epochs fit: nearest, not floored
    assert bench.budget_epochs(400.0, 62.0) == 6
    assert bench.budget_epochs(100.0, 140.0) == 1  # the epoch already done
    # a shape of lr x0.1 after 4 of 5 epochs (0.8) -> after 8 of 10, after 2 of 3
    assert bench.scaled_milestones([4], 5, 10) == [8]
    assert bench.scaled_milestones([4], 5, 3) == [2]
    assert bench.scaled_milestones([3], 4, 1) == [1]

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.warmup_iters=2"])
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = bench.build_lr_scheduler(optimizer, cfg, iters_per_epoch=3)
    for _ in range(3):  # the first epoch, on the config's schedule
        optimizer.step()
        scheduler.step()
    scheduler, planned = bench.replan_schedule(optimizer, cfg, iters=3, epochs=10)
    assert planned == [8]
    lrs = []
    for _ in range(3 * 9):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # continues at iteration 3 (warm-up done) at the full lr, drops at epoch 8 (iteration 24)
    assert lrs[0] == pytest.approx(1.0) and lrs[24 - 3 - 1] == pytest.approx(1.0)
    assert lrs[24 - 3] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1)


def test_equal_time_gives_mask_rcnns_training_time_to_every_model_and_plots_curves(
    bench, tiny_shards, tiny_overrides, tmp_path, capsys
):
    out = tmp_path / "results.json"
    argv = ["--data", str(tiny_shards), "--work-dir", str(tmp_path)]
    argv += ["--models", "baseline", "maskrcnn", "--seeds", "1", "--epochs", "2"]
    argv += ["--threads", "1", "--budget-s", "maskrcnn", "--out", str(out)]
    for override in tiny_overrides:
        argv += ["--set", override]
    bench.main(bench.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    mrcnn, baseline = saved["runs"]  # Mask R-CNN first: its time is the budget
    assert mrcnn["model"] == "maskrcnn" and mrcnn["budget_s"] is None and mrcnn["epochs"] == 2
    assert baseline["budget_s"] == pytest.approx(mrcnn["train_s"])
    assert f"budget {mrcnn['train_s']:.0f} s: {baseline['epochs']} epochs" in printed
    for run in saved["runs"]:  # one evaluation per epoch, training time growing
        assert [p["epoch"] for p in run["curve"]] == list(range(1, run["epochs"] + 1))
        times = [p["train_s"] for p in run["curve"]]
        assert times == sorted(times) and times[-1] == pytest.approx(run["train_s"])
        assert run["metrics"] == run["curve"][-1]["metrics"]
        assert len(run["losses"]) == run["epochs"]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    replot = tmp_path / "again.png"
    bench.main(bench.get_args_parser().parse_args(["--report", str(out), "--plot", str(replot)]))
    assert replot.stat().st_size > 1000


def test_budget_needs_seconds_or_mask_rcnn(bench):
    with pytest.raises(SystemExit, match="seconds or 'maskrcnn'"):
        bench.main(bench.get_args_parser().parse_args(["--budget-s", "ten"]))
    with pytest.raises(SystemExit, match="needs maskrcnn"):
        bench.main(
            bench.get_args_parser().parse_args(["--budget-s", "maskrcnn", "--models", "pep"])
        )


def test_train_evaluates_every_nth_epoch_and_the_last(bench, tiny_shards, tiny_config):
    from pep_model import build_model

    cfg = tiny_config("train.epochs=3", "model.excavate=false", "model.purify=false")
    rows = bench.read_rows(tiny_shards / "train", 4)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    calls = []

    def evaluate(m):
        calls.append(1)
        return {"segm/AP": 0.0}

    _, history, curve = bench.train(model, rows, cfg, 1, evaluate=evaluate, eval_every=2)
    assert len(history) == 3  # one loss record per epoch: the table's "epochs"
    assert [point["epoch"] for point in curve] == [2, 3] and len(calls) == 2
