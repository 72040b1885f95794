"""Drawing: boxes and labels change the right pixels; one stable colour per class."""
from __future__ import annotations

import numpy as np
import webcolors

from utils.visual.draw import MAX_LUMA, color_for_class, draw_detections, line_thickness, palette


def test_palette_is_css3_deterministic_and_not_too_light():
    colors = palette()
    css3 = {tuple(reversed(tuple(webcolors.name_to_rgb(n)))) for n in webcolors.names("css3")}
    assert len(colors) >= 50 and len(set(colors)) == len(colors)
    assert set(colors) <= css3
    assert all(0.114 * b + 0.587 * g + 0.299 * r <= MAX_LUMA for b, g, r in colors)
    assert (255, 255, 255) not in colors


def test_colors_stable_per_class_and_distinct_for_neighbours():
    first = [color_for_class(i) for i in range(90)]
    assert first == [color_for_class(i) for i in range(90)]
    assert all(first[i] != first[i + 1] for i in range(89))
    assert len(set(first[:20])) == 20


def test_drawing_marks_box_border_with_class_color():
    image = np.zeros((200, 300, 3), np.uint8)
    boxes = np.array([[50.0, 60.0, 150.0, 160.0], [200.0, 20.0, 280.0, 90.0]], np.float32)
    out = draw_detections(image, boxes, np.array([3, 7]), np.array([0.9, 0.5], np.float32), ["cat", ""])
    assert np.count_nonzero(image) == 0  # the input is not modified
    assert out.shape == image.shape and out.dtype == np.uint8
    # Left border of box 0 at mid-height and bottom border of box 1 have the class colour.
    assert tuple(int(v) for v in out[110, 50]) == color_for_class(3)
    assert tuple(int(v) for v in out[90, 240]) == color_for_class(7)
    # Inside the boxes (away from labels) and far outside nothing changes.
    assert np.count_nonzero(out[100:150, 70:140]) == 0
    assert np.count_nonzero(out[180:, :40]) == 0
    # A label was drawn above box 0 (filled with its colour).
    assert np.count_nonzero(out[40:58, 52:80]) > 0


def test_thickness_scales_with_image_size():
    assert line_thickness(np.zeros((100, 100, 3), np.uint8)) == 1
    assert line_thickness(np.zeros((1080, 1920, 3), np.uint8)) > line_thickness(np.zeros((480, 640, 3), np.uint8))


def test_no_detections_copies_image():
    image = np.full((32, 32, 3), 9, np.uint8)
    out = draw_detections(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0), [])
    assert np.array_equal(out, image) and out is not image
