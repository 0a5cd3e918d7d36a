"""`python -m pipeline ...` = `flowcurate run ...`: the Beam curation pipeline."""

import sys

from pipeline.run import main

sys.exit(main())
