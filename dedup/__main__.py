"""`python -m flowcurate.dedup`: the standalone SSCD dedup command (the same as `flowcurate dedup`)."""

import sys

from flowcurate.dedup.cli import main

sys.exit(main())
