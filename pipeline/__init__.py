"""The Beam curation pipeline behind `flowcurate run` (see README.md)."""

import logging


class _QuietBeamNoise(logging.Filter):
    # apache_beam logs the first on import when the optional GCP client libraries are absent (noise for
    # every local run; Dataflow users install the `gcp` extra anyway), and the second for every
    # ParDo that has tagged outputs and a dead-letter output (with_exception_handling) at once
    NOISE = ("apitools not found", "Tags ")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(self.NOISE) and ("apitools" in msg or "not declared in type hints" in msg))


logging.getLogger().addFilter(_QuietBeamNoise())
