"""`python -m trainer train|sample ...`: the same commands as `flowcurate train|sample`."""

import sys

from trainer.train import main

sys.exit(main())
