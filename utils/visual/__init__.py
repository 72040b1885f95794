"""What people look at: detections drawn on images (:mod:`.draw`) and training curves saved as images (:mod:`.plot`)."""
