"""utils/training/distributed.py and the sharded evaluation of utils/evaluation/runner.py: ranks that agree on
every step, and a validation mAP computed in shards that equals the one-process evaluation."""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from efficientdet.synthetic import make_shape_dataset
from tests.conftest import project_yaml
from utils.evaluation.records import detections_to_coco
from utils.evaluation.runner import evaluate_detector, run_detector_on_set, score_gathered
from utils.inference.postprocess import Detections


class GroundTruthDetector:
    """Stands in for utils.inference.detector.Detector: per image, its ground-truth boxes shifted a little
    plus one false box, with scores from a small set (ties across images make the order of the records
    matter to COCOeval). Records the paths it was given."""

    def __init__(self, ann_file: Path) -> None:
        data = json.loads(ann_file.read_text())
        names = {image["id"]: image["file_name"] for image in data["images"]}
        self.boxes: Dict[str, List] = {name: [] for name in names.values()}
        for ann in data["annotations"]:
            self.boxes[names[ann["image_id"]]].append((ann["category_id"] - 1, ann["bbox"]))
        self.seen: List[str] = []

    def detect(self, paths):
        found = []
        for path in paths:
            name = Path(path).name
            self.seen.append(name)
            rng = np.random.default_rng(int(Path(name).stem))
            rows = [(c, [x + 3 * rng.random(), y, x + w, y + h], [0.3, 0.6, 0.9][rng.integers(3)])
                    for c, (x, y, w, h) in self.boxes[name]]
            rows.append((int(rng.integers(2)), [0.0, 0.0, 40.0, 40.0], 0.6))
            found.append(Detections(np.array([r[1] for r in rows], np.float32), np.array([r[0] for r in rows]),
                                    np.array([r[2] for r in rows], np.float32), ["" for _ in rows]))
        return found


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return {"root": root, **make_shape_dataset(root, num_train=0, num_val=7, size=128, seed=3)}


def test_shards_split_the_set_in_stride_order(shapes):
    detector = GroundTruthDetector(shapes["val"])
    names = [image["file_name"] for image in json.loads(shapes["val"].read_text())["images"]]
    ids = {}
    for rank in range(3):
        ids[rank], _ = run_detector_on_set(detector, shapes["root"] / "val", shapes["val"], batch_size=2,
                                           progress=False, shard=(rank, 3))
    assert detector.seen == names[0::3] + names[1::3] + names[2::3]
    assert ids == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}
    with pytest.raises(ValueError, match="shard rank 3"):
        run_detector_on_set(detector, shapes["root"] / "val", shapes["val"], shard=(3, 3))


def test_gathered_shards_score_as_one_process(shapes):
    obj_list = ["rectangle", "circle"]
    single, single_records = evaluate_detector(GroundTruthDetector(shapes["val"]), shapes["root"] / "val",
                                               shapes["val"], obj_list, batch_size=3)
    assert 0.0 < single["AP"] < 1.0 and single["num_detections"] == len(single_records)
    shards = []
    for rank in range(3):
        image_ids, found = run_detector_on_set(GroundTruthDetector(shapes["val"]), shapes["root"] / "val",
                                               shapes["val"], batch_size=2, progress=False, shard=(rank, 3))
        shards.append(detections_to_coco(image_ids, found, obj_list))
    for order in ([0, 1, 2], [2, 0, 1]):  # the order the shards arrive in does not matter
        metrics, records = score_gathered(shapes["val"], [shards[i] for i in order], obj_list)
        assert records == single_records
        assert {k: metrics[k] for k in ("AP", "AP50", "AR100")} == {k: single[k] for k in ("AP", "AP50", "AR100")}
    with pytest.raises(ValueError, match="image id 99"):
        score_gathered(shapes["val"], [[dict(shards[0][0], image_id=99)]], obj_list)


# --- two gloo processes on the CPU --------------------------------------------------------------------------

POISON_WEIGHTS_AT = 2  # rank 1's 2nd optimizer step leaves a NaN weight (on rank 1 only)
POISON_LOSS_AT = 4     # rank 1's 4th training forward gives a NaN loss (on rank 1 only)


def _poison_rank(rank: int) -> None:
    """Test-only fault injection in this worker process: on rank 1, a NaN weight after its
    ``POISON_WEIGHTS_AT``-th optimizer step and a NaN loss at its ``POISON_LOSS_AT``-th training forward."""
    from utils.training.parts import ModelWithLoss

    if rank != 1:
        return
    real_step, real_forward = torch.optim.AdamW.step, ModelWithLoss.forward
    calls = {"step": 0, "forward": 0}

    def step(self, *args, **kwargs):  # the run's optimizer (AdamW, the default)
        result = real_step(self, *args, **kwargs)
        calls["step"] += 1
        if calls["step"] == POISON_WEIGHTS_AT:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    def forward(self, images, annotations):
        cls_loss, reg_loss, outputs = real_forward(self, images, annotations)
        if self.model.training:
            calls["forward"] += 1
            if calls["forward"] == POISON_LOSS_AT:
                cls_loss = cls_loss * float("nan")
        return cls_loss, reg_loss, outputs

    torch.optim.AdamW.step, ModelWithLoss.forward = step, forward


def _worker(rank: int, world: int, port: int, argv: List[str], out: str) -> None:
    import torch.distributed as dist

    import train
    from utils.evaluation.runner import evaluate_detector as evaluate
    from utils.inference.detector import Detector
    from utils.inference.postprocess import EVAL_THRESHOLDS
    from utils.training.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        _poison_rank(rank)
        trainer = Trainer(train.parse_args(argv))
        code = trainer.run()
        dump = {"code": code, "step": trainer.state.step, "skipped": trainer.state.skipped_steps,
                "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
                "optimizer": trainer.optimizer.state_dict()["state"]}
        # Untrained, the model finds nothing above the evaluator's 0.05: bias the class output to 0.5. Rank 1's
        # BatchNorm statistics are made very different: validation must evaluate rank 0's model everywhere.
        with torch.no_grad():
            trainer.model.classifier.header.pointwise_conv.conv.bias.zero_()
            if rank == 1:
                for name, buffer in trainer.model.named_buffers():
                    if name.endswith("running_var"):
                        buffer.mul_(50.0)
        dump["metrics"] = trainer.validate()
        if rank == 0:
            model, project, root = trainer.model, trainer.project, trainer.data_root
            detector = Detector(model, project, input_size=trainer.input_size, device="cpu",
                                threshold=EVAL_THRESHOLDS.score, iou_threshold=EVAL_THRESHOLDS.iou)
            single, records = evaluate(detector, root / "val", root / "annotations" / "instances_val.json",
                                       project.obj_list, batch_size=trainer.batch_size)
            dump["single"], dump["detections"] = single["AP"], len(records)
        dump["failure"] = _val_map_failure(trainer, rank)
        torch.save(dump, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _val_map_failure(trainer, rank: int) -> str:
    """The error each rank raises when an image of rank 1's share is missing (none may be left waiting)."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        data = json.loads((trainer.data_root / "annotations" / "instances_val.json").read_text())
        (trainer.data_root / "val" / data["images"][1]["file_name"]).unlink()
    dist.barrier()
    try:  # the mAP part of validation (the loss part reads the val images through the data loaders)
        trainer._val_map(trainer.model)
    except (ValueError, FileNotFoundError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ranks_agree_on_bad_steps_and_validate_in_shards(tmp_path):
    """Rank 1 alone meets a non-finite weight (step 2) and a non-finite loss (step 4): both ranks undo and skip
    both steps and end with identical weights and optimizer state; the val mAP evaluated in shards on both
    ranks equals rank 0's one-process evaluation of the same model."""
    data = tmp_path / "datasets" / "tiny"
    make_shape_dataset(data, num_train=8, num_val=4, size=128, seed=1)
    (tmp_path / "tiny.yml").write_text(project_yaml("tiny", ["rectangle", "circle"]))
    argv = ["-c", "0", "-p", str(tmp_path / "tiny.yml"), "--data_path", str(tmp_path / "datasets"),
            "--input_size", "128", "-n", "0", "--saved_path", str(tmp_path / "ckpt"), "--log_path",
            str(tmp_path / "logs"), "--device", "cpu", "--batch_size", "4", "--num_epochs", "3", "--lr", "1e-3",
            "--save_interval", "0", "--val_interval", "3", "--val_map"]
    context = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, 2, port, argv, str(tmp_path))) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # 8 images, 2 per rank per step: 2 steps an epoch, 6 in 3 epochs, of which steps 2 and 4 are undone.
    assert [(d["code"], d["step"], d["skipped"]) for d in ranks] == [(0, 4, 2), (0, 4, 2)]
    for name, value in ranks[0]["params"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, ranks[1]["params"][name]), name
    for index, state in ranks[0]["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(value, ranks[1]["optimizer"][index][key]), (index, key)

    assert ranks[0]["detections"] > 0
    assert ranks[0]["metrics"]["mAP"] == ranks[0]["single"]
    assert ranks[1]["metrics"] == ranks[0]["metrics"]
    assert ranks[1]["failure"].startswith("FileNotFoundError: image not found")
    assert ranks[0]["failure"] == "ValueError: validation mAP: rank 1: " + ranks[1]["failure"]


def test_agreed_batches_stop_together():
    """One process: its own error is raised as it is; another rank's failure (the verdict and-ed to False)
    stops this one at the same batch with a ValueError saying so."""
    from utils.training.distributed import agreed_batches

    def failing():
        yield 1
        raise FileNotFoundError("image not found: val/3.jpg")

    assert list(agreed_batches([1, 2, 3], lambda ok: ok)) == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="val/3.jpg"):
        list(agreed_batches(failing(), lambda ok: ok))
    verdicts = iter([True, False])  # the other rank fails at the second batch
    seen = []
    with pytest.raises(ValueError, match="another process of this run stopped on bad data"):
        for batch in agreed_batches([1, 2, 3], lambda ok: ok and next(verdicts)):
            seen.append(batch)
    assert seen == [1]


BAD_IMAGE_AT = 3  # rank 1's 3rd training sample cannot be read


def _bad_data_worker(rank: int, world: int, port: int, argv: List[str], out: str) -> None:
    """One rank of a 2-process gloo run in which rank 1 alone meets an unreadable image mid-epoch (test-only
    patch of CocoDataset.__getitem__); writes the error each rank raised."""
    import torch.distributed as dist

    import train
    from efficientdet.dataset import CocoDataset
    from utils.training.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    if rank == 1:
        real, calls = CocoDataset.__getitem__, {"n": 0}

        def getitem(self, index):
            calls["n"] += 1
            if calls["n"] == BAD_IMAGE_AT and self.set_name == "train":
                raise ValueError("train/bad.jpg: cannot decode the image")
            return real(self, index)

        CocoDataset.__getitem__ = getitem
    try:
        trainer = Trainer(train.parse_args(argv))
        try:
            trainer.run()
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        (Path(out) / f"error{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_bad_data_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 alone cannot read an image in its share of an epoch: both ranks stop at that batch, each with one
    line (rank 1 names the file), instead of rank 0 waiting in a collective until the timeout."""
    data = tmp_path / "datasets" / "tiny"
    make_shape_dataset(data, num_train=8, num_val=4, size=128, seed=1)
    (tmp_path / "tiny.yml").write_text(project_yaml("tiny", ["rectangle", "circle"]))
    argv = ["-c", "0", "-p", str(tmp_path / "tiny.yml"), "--data_path", str(tmp_path / "datasets"),
            "--input_size", "128", "-n", "0", "--saved_path", str(tmp_path / "ckpt"), "--log_path",
            str(tmp_path / "logs"), "--device", "cpu", "--batch_size", "4", "--num_epochs", "2",
            "--save_interval", "0"]
    context = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    workers = [context.Process(target=_bad_data_worker, args=(rank, 2, port, argv, str(tmp_path)))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    errors = [(tmp_path / f"error{rank}.txt").read_text() for rank in range(2)]
    assert errors[1].startswith("train/bad.jpg: cannot decode the image"), errors[1]
    assert errors[0].startswith("another process of this run stopped on bad data"), errors[0]
    assert all("\n" not in e for e in errors)
