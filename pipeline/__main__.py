"""`python -m flowcurate.pipeline ...` = `flowcurate run ...`: the Beam curation pipeline."""

import sys

from flowcurate.pipeline.run import main

sys.exit(main())
