"""`python -m flowcurate.pipeline ...` = `flowcurate run ...`: the Beam curation pipeline."""

import sys

from flowcurate.pipeline.cli import main

sys.exit(main())
