"""`python -m trainer train|sample|memorization ...`: the same commands as `flowcurate train|sample|memorization`."""

import sys

from trainer.train import main

sys.exit(main())
