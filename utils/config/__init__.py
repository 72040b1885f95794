"""Settings, read in one place: the project YAML (:mod:`.project`: ``load_project`` -> typed ``ProjectConfig``),
the command-line arguments every script shares (:mod:`.cli`), and the device (:mod:`.device`: ``select_device``)."""
