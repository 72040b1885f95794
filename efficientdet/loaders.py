"""Batching (:func:`collater`) and the train / val DataLoaders of a project (:func:`create_dataloaders`)."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from efficientdet.augment import Mosaic, build_transform
from efficientdet.coco import ProjectLike
from efficientdet.dataset import CocoDataset
from efficientdet.transforms import Sample


def _float_tensor(value: Any) -> torch.Tensor:
    """A numpy array or a tensor as a float32 tensor (no copy where it already is one)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def collater(batch: Sequence[Sample]) -> Dict[str, Any]:
    """Stack samples of one size into a batch (the published ``collater(data)``).

    Each sample's 'img' (``[S, S, 3]``, HWC) and 'annot' (``[M, 5]``) may be numpy arrays or tensors (the
    published ``Resizer`` returns tensors).

    Returns:
        ``{'img': Tensor[B, 3, S, S] float32 (NCHW), 'annot': Tensor[B, M_max, 5] float32
        (x1, y1, x2, y2, label), rows beyond an image's boxes filled with -1, M_max >= 1,
        'scale': list[float], 'image_id': list[int]}``.

    Raises:
        ValueError: empty batch or images of different sizes (no resizing transform).
    """
    if not batch:
        raise ValueError("collater: empty batch")
    shapes = {tuple(sample["img"].shape) for sample in batch}
    if len(shapes) != 1:
        raise ValueError(f"collater: images of different sizes {sorted(shapes)}; use a Resizer/RandomScaleCrop")
    images = torch.stack([_float_tensor(s["img"]) for s in batch], dim=0)
    annots = [_float_tensor(s["annot"]).reshape(-1, 5) for s in batch]
    max_boxes = max(1, max(len(a) for a in annots))
    padded = torch.full((len(batch), max_boxes, 5), -1.0, dtype=torch.float32)
    for i, annot in enumerate(annots):
        if len(annot):
            padded[i, :len(annot)] = annot
    return {"img": images.permute(0, 3, 1, 2).contiguous(), "annot": padded,
            "scale": [float(s.get("scale", 1.0)) for s in batch],
            "image_id": [s.get("image_id", -1) for s in batch]}


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders: a worker leaves a stop to the main process. It ignores SIGINT (Ctrl+C
    reaches the whole process group) and a SIGTERM from anyone but the main process (one to the group); a
    SIGTERM from the main process (its shutdown of the workers) still ends it, as in PyTorch's own worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps PyTorch's handling
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def end_on_sigterm_from_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=end_on_sigterm_from_parent, daemon=True).start()


class DataBundle(NamedTuple):
    """Datasets and loaders made by :func:`create_dataloaders`."""

    train_set: CocoDataset
    val_set: CocoDataset
    train_loader: DataLoader
    val_loader: DataLoader


def create_dataloaders(project: ProjectLike, data_path: Union[str, Path], input_size: int, batch_size: int,
                       num_workers: int = 0, flip: bool = True, scale_jitter: bool = False,
                       jitter_range: Tuple[float, float] = (0.1, 2.0),
                       sampler: Optional[Callable[[CocoDataset, bool], Sampler]] = None, seed: Optional[int] = None,
                       skip_missing: bool = False, pin_memory: bool = False,
                       val_batch_size: Optional[int] = None, skip_bad_images: bool = False,
                       verify_images: bool = True, progress: bool = True, *, vflip: float = 0.0,
                       mosaic: float = 0.0, hsv_h: float = 0.0, hsv_s: float = 0.0, hsv_v: float = 0.0,
                       affine_scale: float = 0.0, affine_translate: float = 0.0,
                       affine_rotate: float = 0.0) -> DataBundle:
    """Train and val sets of ``data_path/project.project_name`` and their DataLoaders.

    Train: ``project.train_set`` with normalise, [flip], [scale jitter + crop] or resize, and the augmentations
    of :mod:`efficientdet.augment` whose setting (``vflip`` … ``affine_rotate``, keyword only) is above 0 (mosaic
    filled with ``project.mean``); shuffled (by ``torch.Generator().manual_seed(seed)`` when ``seed`` is set);
    ``drop_last=True`` as published.
    Val: ``project.val_set`` with normalise + resize, in order, every image (``drop_last=False``).
    ``sampler(dataset, train) -> Sampler`` replaces shuffling for both loaders, e.g.
    ``lambda ds, train: DistributedSampler(ds, shuffle=train, seed=seed or 0)`` (the caller calls its
    ``set_epoch``). Call ``train_set.set_epoch(epoch)`` each epoch for a new augmentation stream with
    ``seed`` set.

    Both sets check their image files when built (``verify_images``, header and tail of each file, before
    the first training step) and raise a ValueError naming the first bad file; ``skip_bad_images`` leaves
    bad images out instead (logged, counted in ``skipped``) and replaces images that fail to decode later
    (:meth:`CocoDataset.__getitem__`); ``skip_missing`` leaves out missing files only. ``progress``: tqdm
    bars for the checks of large sets.

    Raises:
        FileNotFoundError / ValueError: from :class:`CocoDataset`; bad sizes or a train set smaller than
        one batch.
    """
    if int(input_size) <= 0 or int(batch_size) <= 0 or int(num_workers) < 0:
        raise ValueError(f"create_dataloaders: need input_size > 0, batch_size > 0, num_workers >= 0, got "
                         f"{input_size}, {batch_size}, {num_workers}")
    root = Path(data_path) / project.project_name
    train_tf = build_transform(input_size, project.mean, project.std, train=True, flip=flip,
                               scale_jitter=scale_jitter, jitter_range=jitter_range, vflip=vflip, hsv_h=hsv_h,
                               hsv_s=hsv_s, hsv_v=hsv_v, affine_scale=affine_scale,
                               affine_translate=affine_translate, affine_rotate=affine_rotate)
    val_tf = build_transform(input_size, project.mean, project.std, train=False)
    checks = dict(skip_missing=skip_missing, skip_bad_images=skip_bad_images, verify_images=verify_images,
                  progress=progress)
    train_set = CocoDataset(root, project.train_set, project, transform=train_tf, seed=seed,
                            mosaic=Mosaic(mosaic, input_size, fill=project.mean) if mosaic else None, **checks)
    val_set = CocoDataset(root, project.val_set, project, transform=val_tf, seed=seed, **checks)
    train_sampler = sampler(train_set, True) if sampler is not None else None
    val_sampler = sampler(val_set, False) if sampler is not None else None
    if train_sampler is None and len(train_set) < batch_size:
        raise ValueError(f"{train_set.annotation_file}: {len(train_set)} images, fewer than one batch of "
                         f"{batch_size} (the training loader drops incomplete batches)")
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=True, collate_fn=collater,
                              num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                              worker_init_fn=ignore_stop_signals)
    val_loader = DataLoader(val_set, batch_size=val_batch_size or batch_size, shuffle=False, sampler=val_sampler,
                            drop_last=False, collate_fn=collater, num_workers=num_workers, pin_memory=pin_memory,
                            worker_init_fn=ignore_stop_signals)
    return DataBundle(train_set, val_set, train_loader, val_loader)
