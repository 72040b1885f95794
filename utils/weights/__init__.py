"""Weights in and out: loading any checkpoint we know into a detector, with clear errors (:mod:`.loading`:
``load_weights``, ``read_checkpoint``), training checkpoints written atomically and found again (:mod:`.checkpoints`),
pretrained downloads with checksums (:mod:`.download`), and the official TensorFlow checkpoints: the reader
(:mod:`.tf_checkpoint`, with :mod:`.crc32c`) and the weight mapping onto our layout (:mod:`.tf_convert`)."""
