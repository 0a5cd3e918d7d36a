"""The Beam curation pipeline behind `flowcurate run` (see README.md)."""

import logging


class _NoApitoolsWarning(logging.Filter):
    # apache_beam logs this on import when the optional GCP client libraries are absent: noise for
    # every local run (installing the `gcp` extra is what Dataflow users do anyway)
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_NoApitoolsWarning())
