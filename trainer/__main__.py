"""`python -m flowcurate.trainer train|sample|memorization ...`: the same commands as `flowcurate train|sample|memorization`."""

import sys

from flowcurate.trainer.cli import main

sys.exit(main())
