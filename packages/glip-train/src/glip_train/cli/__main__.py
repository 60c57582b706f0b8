"""``python -m glip_train.cli ...`` (also under ``torchrun``): the same as ``glip ...``."""
import sys

from . import main

sys.exit(main())
