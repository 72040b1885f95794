"""torch.hub entry points::

    model = torch.hub.load("OWNER/REPO", "efficientdet_d0", pretrained=True)         # from GitHub
    model = torch.hub.load("path/to/clone", "efficientdet_d0", source="local")       # from a clone
    detector = torch.hub.load("path/to/clone", "detector", compound_coef=0, source="local")
    detections = detector.detect("img.jpg")

``efficientdet_d0`` … ``efficientdet_d7x`` return an ``EfficientDet`` in eval mode; ``detector`` returns a
``utils.inference.Detector`` (pre-processing, network, post-processing). Pretrained weights are the published
COCO checkpoints, downloaded into the clone's ``weights/`` when missing. A thin layer over
``utils.weights.pretrained``: nothing heavy is imported before an entry is called.
"""
dependencies = ["torch", "numpy", "cv2", "yaml", "tqdm"]

_DOC = """EfficientDet {name} (``-c {c}``) in eval mode.

    Args:
        pretrained: load the published COCO checkpoint ``efficientdet-d{c}.pth`` (downloaded into ``weights/``
            when missing; ``weights=PATH`` loads a local file instead, ``weights_dir`` / ``url`` / ``progress``
            change the download). With ``num_classes`` other than 90 the COCO weights are loaded and the heads'
            output layers re-initialised (logged).
        num_classes: class count of the classifier (90: COCO, the published layout).
        **kwargs: ``ratios``, ``scales`` (anchors), ``pool_padding``, ``weights``, ``weights_dir``, ``url``,
            ``progress`` (see ``utils.weights.pretrained.build_pretrained``).
    """


def _entry(compound_coef: int, name: str):
    def entry(pretrained: bool = False, num_classes: int = 90, **kwargs):
        from utils.weights.pretrained import build_pretrained

        return build_pretrained(compound_coef, pretrained=pretrained, num_classes=num_classes, **kwargs)

    entry.__name__ = entry.__qualname__ = f"efficientdet_{name.lower()}"
    entry.__doc__ = _DOC.format(name=name, c=compound_coef)
    return entry


efficientdet_d0 = _entry(0, "D0")
efficientdet_d1 = _entry(1, "D1")
efficientdet_d2 = _entry(2, "D2")
efficientdet_d3 = _entry(3, "D3")
efficientdet_d4 = _entry(4, "D4")
efficientdet_d5 = _entry(5, "D5")
efficientdet_d6 = _entry(6, "D6")
efficientdet_d7 = _entry(7, "D7")
efficientdet_d7x = _entry(8, "D7x")


def detector(compound_coef: int = 0, pretrained: bool = True, project: str = "coco", **kwargs):
    """A ``utils.inference.Detector`` of D{compound_coef} for ``project`` (default COCO, 90 classes).

    ``pretrained``: the published COCO checkpoint (downloaded when missing) or ``weights=PATH`` (a checkpoint
    of the project's class count); ``pretrained=False``: random weights. ``weights_dir``, ``url``,
    ``progress`` change the download; every other keyword goes to ``Detector`` (``device``, ``threshold``,
    ``iou_threshold``, ``mode``, ``float16``, ``input_size``, ``nms``, ``clip_to_image``).
    """
    from utils.inference import Detector

    if pretrained:
        return Detector.from_pretrained(compound_coef, project=project, **kwargs)
    from backbone import build_model
    from utils.config.project import load_project

    config = load_project(project)
    return Detector(build_model(compound_coef, config), config, **kwargs)
